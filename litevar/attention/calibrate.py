"""Window calibration for MDWA: measure where attention mass lies on real KV-cached generations, then choose
per (layer, head, query scale, key scale) the smallest window that holds a threshold of each block's mass.

One calibration run serves every threshold and both geometries: for each block it keeps a histogram of
attention mass by the window width each (query, key) pair needs (:func:`needed_width`), so a plan for any
threshold is a cumulative sum away.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..files import error_cause, reading, write_atomic
from .probe import generate_with_processor
from .context import AttnContext
from .dense import DenseAttnProcessor
from .windows import DROP, FULL, GEOMETRIES, PlanError, WindowPlan, needed_width

PLAN_VERSION = 1


def model_identity(var) -> dict[str, Any]:
    """What a plan is tied to: the shape, and a digest of the VAR weights rounded to bf16 (so the same model
    loaded in fp32 or bf16 matches)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(var.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    cfg = var.cfg
    return {"patch_nums": list(cfg.patch_nums), "depth": cfg.depth, "heads": cfg.heads, "width": cfg.width,
            "num_classes": cfg.num_classes, "weights_bf16_sha256": digest.hexdigest()[:16]}


class AttentionStats:
    """Attention mass histograms by needed window width, per geometry and (query scale k, key scale j).

    ``hist[geometry][(k, j)]`` is float64 [depth, heads, max_width + 1]; ``queries[layer, k]`` counts the
    query rows seen (each holds mass 1 before the floor), for the block-share drop rule.

    Args:
        patch_nums, depth, heads: the model's shape.
        prob_floor: probabilities below this count as zero (LiteVAR: 0.003), so noise does not widen windows.
    """

    def __init__(self, patch_nums, depth: int, heads: int, prob_floor: float = 0.003) -> None:
        self.patch_nums = tuple(patch_nums)
        self.depth, self.heads, self.prob_floor = depth, heads, prob_floor
        K = len(self.patch_nums)
        self.hist = {g: {(k, j): torch.zeros(depth, heads, self._max(g, k, j) + 1, dtype=torch.float64)
                         for k in range(K) for j in range(k + 1)} for g in GEOMETRIES}
        self.queries = torch.zeros(depth, K, dtype=torch.float64)
        self.begins = [sum(p * p for p in self.patch_nums[:j]) for j in range(K)]

    def _max(self, geometry: str, k: int, j: int) -> int:
        return int(needed_width(geometry, self.patch_nums[k], self.patch_nums[j]).max())

    def add(self, layer: int, k: int, probs_BHlL: torch.Tensor) -> None:
        """Accumulate the attention probabilities of the queries of scale ``k`` over keys of scales 0..k."""
        p = probs_BHlL.float()
        p = torch.where(p >= self.prob_floor, p, torch.zeros((), dtype=p.dtype)).sum(dim=0).double().cpu()
        self.queries[layer, k] += probs_BHlL.shape[0] * probs_BHlL.shape[2]
        for j in range(k + 1):
            n_j = self.patch_nums[j]
            block_HlJ = p[:, :, self.begins[j]:self.begins[j] + n_j * n_j].reshape(self.heads, -1)
            for geometry in GEOMETRIES:
                need = needed_width(geometry, self.patch_nums[k], n_j).reshape(1, -1).long().expand(self.heads, -1)
                self.hist[geometry][(k, j)][layer].scatter_add_(1, need, block_HlJ)

    def plan(self, geometry: str, threshold: float, drop_share: float = 0.02, full_query_scales: int = 3,
             kept_key_scales: int = 3, model: dict | None = None) -> WindowPlan:
        """The smallest window per block holding ``threshold`` of the block's mass; blocks holding less than
        ``drop_share`` of their queries' mass are dropped; windows covering the whole block become FULL."""
        if not 0 < threshold <= 1:
            raise PlanError(f"threshold must be in (0, 1], got {threshold}")
        if not 0 <= drop_share < 1:
            raise PlanError(f"drop_share must be in [0, 1), got {drop_share}")
        K = len(self.patch_nums)
        windows = torch.full((self.depth, self.heads, K, K), FULL, dtype=torch.int32)
        for (k, j), hist in self.hist[geometry].items():
            if k < full_query_scales or j < kept_key_scales:
                continue
            block_mass = hist.sum(dim=-1)
            cumulative = hist.cumsum(dim=-1)
            enough = cumulative >= threshold * block_mass.unsqueeze(-1) * (1 - 1e-12)
            width = enough.to(torch.int8).argmax(dim=-1).to(torch.int32).clamp_min(1)
            width = torch.where(width >= hist.shape[-1] - 1, torch.full_like(width, FULL), width)
            share = block_mass / self.queries[:, k].clamp_min(1).unsqueeze(-1)
            windows[:, :, k, j] = torch.where(share < drop_share, torch.full_like(width, DROP), width)
            windows[:, :, k, j] = torch.where(block_mass == 0, torch.full_like(width, DROP), windows[:, :, k, j])
        meta = {"threshold": threshold, "drop_share": drop_share, "prob_floor": self.prob_floor,
                "calibration_queries": self.queries.sum().item()}
        return WindowPlan(self.patch_nums, windows, geometry, full_query_scales, kept_key_scales, model, meta)


class CalibrationAttnProcessor:
    """Dense attention with explicit probabilities, recorded into :class:`AttentionStats` (KV-cached only)."""

    def __init__(self, stats: AttentionStats) -> None:
        self.stats = stats
        self.dense = DenseAttnProcessor()

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if ctx.kv_caches is None:
            return self.dense(attn, x_BLC, ctx)
        q, k, v = attn.project_qkv(x_BLC)
        k, v = ctx.kv_caches[attn.block_idx].append(k, v)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * attn.softmax_scale).softmax(dim=-1)
        self.stats.add(attn.block_idx, ctx.scale_index, probs)
        return attn.project_out((probs @ v.float()).to(v.dtype))


def collect_stats(pipe, samples: int = 64, batch_size: int = 16, seed: int = 0, prob_floor: float = 0.003,
                  progress: bool = True, **sampling) -> AttentionStats:
    """Generate ``samples`` images (classes in turn, image i with seed ``seed + i``) and record attention mass.

    Example:
        >>> stats = collect_stats(pipe, samples=32)  # doctest: +SKIP
        >>> plan = stats.plan("raster", 0.95, model=model_identity(pipe.var))  # doctest: +SKIP
    """
    cfg = pipe.config.var
    stats = AttentionStats(cfg.patch_nums, cfg.depth, cfg.heads, prob_floor)
    generate_with_processor(pipe, CalibrationAttnProcessor(stats), samples, batch_size, seed, "calibrate", progress,
                            **sampling)
    return stats


def save_plan(plan: WindowPlan, path: str | Path) -> None:
    payload = {"litevar_window_plan": PLAN_VERSION, **plan.to_state()}
    write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(payload)))


def _check_plan_state(state: dict[str, Any]) -> None:
    """Refuse plan fields of the wrong type before they are built into a :class:`WindowPlan` (its own checks
    cover shapes and values); ``windows`` must hold integers, which ``torch.tensor(..., int32)`` would not check."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    patch_nums = state.get("patch_nums")
    if not isinstance(patch_nums, list) or not patch_nums or not all(is_int(p) and p >= 1 for p in patch_nums):
        raise PlanError("patch_nums must be a list of positive integers")
    if not all(is_int(state.get(key)) for key in ("full_query_scales", "kept_key_scales")):
        raise PlanError("full_query_scales and kept_key_scales must be integers")
    if not isinstance(state.get("geometry"), str):
        raise PlanError(f"geometry must be one of {GEOMETRIES}")
    model, meta = state.get("model"), state.get("meta")
    if not (model is None or isinstance(model, dict)) or not isinstance(meta, dict):
        raise PlanError("model must be an object or null, and meta an object")
    windows = torch.tensor(state.get("windows"))
    if windows.dtype != torch.int64 or windows.dim() != 4:
        raise PlanError(f"windows must be integers [depth, heads, K, K], got {windows.dtype} {list(windows.shape)}")
    if windows.numel() and int(windows.max()) > torch.iinfo(torch.int32).max:
        raise PlanError("window widths must fit in 32 bits")


def load_plan(path: str | Path, var=None) -> WindowPlan:
    """Read a plan file; with ``var``, refuse a plan calibrated on another model."""
    path = Path(path)
    advice = "make a new one with `litevar calibrate-attention`"
    if not path.is_file():
        raise PlanError(f"window plan {path} not found; {advice}")
    with reading(path, PlanError, "window plan", advice):
        try:
            raw = json.loads(path.read_text())
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise PlanError(f"window plan {path} is not valid JSON ({error_cause(err)}); {advice}") from None
        version = raw.pop("litevar_window_plan", None) if isinstance(raw, dict) else None
        if isinstance(version, bool) or version != PLAN_VERSION:
            raise PlanError(f"{path} is not a litevar window plan (version {PLAN_VERSION}); {advice}")
        _check_plan_state(raw)
        plan = WindowPlan.from_state(raw)
    if var is not None:
        plan.check_model(model_identity(var))
    return plan
