"""HACK's offline head classification: structural (diagonal) vs contextual (vertical) heads.

For each (layer, head), the attention probabilities of the last scale's queries over all keys are measured on
calibration generations; the statistic is the column-wise variance (over queries) summed over key columns.
A contextual head sends every query to the same few columns (each column is nearly constant: low variance); a
structural head follows the query's position (a column is hot for a few queries only: high variance). All
depth x heads heads are ranked globally and the lowest-variance fraction ``alpha`` is contextual.

The same run measures ScaleKV's attention selectivity of every (layer, scale) with history: the mean share of a
query's attention on its own scale times the mean mass of its top-16 history keys (``selectivity``; drafters are
the least selective layers, see :class:`litevar.kvcompress.policies.ScaleKV`).

The calibration file (``litevar calibrate-kv``) stores the variances, the default ``alpha`` (the largest gap of
the sorted log-variances, within [0.1, 0.9]), the selectivity and the model identity; another model's file is
refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..attention.dense import DenseAttnProcessor
from ..attention.probe import generate_with_processor
from ..files import reading, write_atomic

HEADS_VERSION = 1
SELECTIVITY_TOP = 16  # history keys whose mass measures selectivity (ScaleKV's TopK'; its observation window size)


class HeadFileError(ValueError):
    """A head-classification file that cannot be read or does not fit the model."""


def column_variance(probs_BHlL: torch.Tensor) -> torch.Tensor:
    """[B, H]: per head, the variance over queries of each key column's probability, summed over columns."""
    return probs_BHlL.float().var(dim=2, unbiased=False).sum(dim=-1)


def selectivity(probs_BHlL: torch.Tensor, history: int, top: int = SELECTIVITY_TOP) -> torch.Tensor:
    """[B]: ScaleKV's attention selectivity of one (layer, scale): the mean over heads and queries of the share on
    the query's own scale, times the mean mass of the ``top`` most attended of the first ``history`` keys."""
    probs = probs_BHlL.float()
    own = probs[..., history:].sum(dim=-1).mean(dim=(1, 2))
    past = probs[..., :history].topk(min(top, history), dim=-1).values.sum(dim=-1).mean(dim=(1, 2))
    return own * past


class _AttentionProbe:
    """Dense attention that records the summed column variance of each head's probabilities at the last scale and
    the selectivity of each (layer, scale) with history."""

    def __init__(self, depth: int, heads: int, patch_nums) -> None:
        self.sums = torch.zeros(depth, heads, dtype=torch.float64)
        self.count = torch.zeros(depth, dtype=torch.float64)
        self.selectivity = torch.zeros(depth, len(patch_nums), dtype=torch.float64)
        self.rows = torch.zeros(depth, len(patch_nums), dtype=torch.float64)
        self.begins = [sum(p * p for p in patch_nums[:s]) for s in range(len(patch_nums))]
        self.dense = DenseAttnProcessor()

    def __call__(self, attn, x_BLC, ctx):
        if ctx.kv_caches is None or ctx.scale_index == 0:
            return self.dense(attn, x_BLC, ctx)
        layer, scale = attn.block_idx, ctx.scale_index
        q, k, v = attn.project_qkv(x_BLC)
        k, v = ctx.kv_caches[layer].append(k, v)
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.softmax_scale).softmax(dim=-1)  # [B, H, l, L]
        self.selectivity[layer, scale] += selectivity(probs, self.begins[scale]).double().sum().cpu()
        self.rows[layer, scale] += probs.shape[0]
        if scale == len(self.begins) - 1:
            variance = column_variance(probs)
            self.sums[layer] += variance.double().sum(dim=0).cpu()
            self.count[layer] += variance.shape[0]
        return attn.project_out(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.softmax_scale))


def measure_heads(pipe, samples: int = 16, batch_size: int = 8, seed: int = 100000,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance [depth, heads], selectivity [depth, scales]) over ``samples`` generations (classes in turn, image
    i with seed ``seed + i``): the mean summed column variance of the last scale's attention per head, and the
    mean selectivity per (layer, scale) (NaN at scale 0, which has no history)."""
    cfg = pipe.config.var
    probe = _AttentionProbe(cfg.depth, cfg.heads, cfg.patch_nums)
    generate_with_processor(pipe, probe, samples, batch_size, seed, "head statistics", progress)
    variance = (probe.sums / probe.count.clamp_min(1).unsqueeze(1)).float()
    scale_selectivity = (probe.selectivity / probe.rows).float()  # 0 / 0 = NaN at scale 0
    return variance, scale_selectivity


def measure_head_variance(pipe, samples: int = 16, batch_size: int = 8, seed: int = 100000,
                          progress: bool = True) -> torch.Tensor:
    """The variance half of :func:`measure_heads`."""
    return measure_heads(pipe, samples, batch_size, seed, progress)[0]


def natural_alpha(variance: torch.Tensor, low: float = 0.1, high: float = 0.9) -> float:
    """The contextual fraction at the largest gap of the sorted log-variances (HACK: a long-tailed distribution
    with a natural cut), searched within [low, high]."""
    values = variance.flatten().double().clamp_min(1e-12).log().sort().values
    n = values.numel()
    first, last = max(1, round(low * n)), min(n - 1, round(high * n))
    if last < first:
        return 0.5
    gaps = values[first:last + 1] - values[first - 1:last]
    return (first + int(gaps.argmax())) / n


def classify(variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """bool [depth, heads]: True for the ``alpha`` fraction of heads with the lowest variance (contextual)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    flat = variance.flatten()
    n_contextual = round(alpha * flat.numel())
    contextual = torch.zeros(flat.numel(), dtype=torch.bool)
    contextual[flat.argsort(stable=True)[:n_contextual]] = True
    return contextual.view_as(variance)


def save_heads(path: str | Path, variance: torch.Tensor, model: dict[str, Any], samples: int,
               scale_selectivity: torch.Tensor | None = None) -> dict[str, Any]:
    payload = {"litevar_kv_heads": HEADS_VERSION, "model": model, "samples": samples,
               "alpha": natural_alpha(variance), "variance": variance.tolist()}
    if scale_selectivity is not None:  # NaN (scale 0) is written as null
        payload["selectivity"] = [[None if v != v else v for v in row] for row in scale_selectivity.tolist()]
    write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(payload)))
    return payload


def _read(path: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The raw calibration file at ``path``, checked to be one made for the model with ``identity``."""
    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"head classification {path} not found; make one with `litevar calibrate-kv`")
    with reading(path, HeadFileError, "head classification", "make it again with `litevar calibrate-kv`"):
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("litevar_kv_heads") != HEADS_VERSION:
            raise HeadFileError(f"{path} is not a litevar head classification (version {HEADS_VERSION})")
        model = raw["model"]
    if model != identity:
        raise HeadFileError(f"{path} was calibrated on another model ({model.get('weights_bf16_sha256')} vs "
                            f"{identity['weights_bf16_sha256']}); run `litevar calibrate-kv` for this one")
    return raw


def load_heads(path: str | Path, identity: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(variance [depth, heads], calibrated alpha) of a file made for the model with ``identity``."""
    raw = _read(path, identity)
    with reading(Path(path), HeadFileError, "head classification", "make it again with `litevar calibrate-kv`"):
        variance = torch.tensor(raw["variance"], dtype=torch.float32)
        alpha = float(raw["alpha"])
    if variance.shape != (identity["depth"], identity["heads"]) or not 0 <= alpha <= 1:
        raise HeadFileError(f"{path}: variance {list(variance.shape)} / alpha {alpha} do not fit a model of depth "
                            f"{identity['depth']} with {identity['heads']} heads")
    return variance, alpha


def load_selectivity(path: str | Path, identity: dict[str, Any]) -> torch.Tensor:
    """Selectivity [depth, scales] (NaN at scale 0) of a file made for the model with ``identity``."""
    raw = _read(path, identity)
    if "selectivity" not in raw:
        raise HeadFileError(f"{path} has no scale selectivity (made by an older litevar); run `litevar calibrate-kv` "
                            "again")
    with reading(Path(path), HeadFileError, "head classification", "make it again with `litevar calibrate-kv`"):
        values = torch.tensor([[float("nan") if v is None else v for v in row] for row in raw["selectivity"]])
    if values.shape != (identity["depth"], len(identity["patch_nums"])):
        raise HeadFileError(f"{path}: selectivity {list(values.shape)} does not fit a model of depth "
                            f"{identity['depth']} with {len(identity['patch_nums'])} scales")
    return values
