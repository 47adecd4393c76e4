"""HACK's offline head classification: structural (diagonal) vs contextual (vertical) heads.

For each (layer, head), the attention probabilities of the last scale's queries over all keys are measured on
calibration generations; the statistic is the column-wise variance (over queries) summed over key columns.
A contextual head sends every query to the same few columns (each column is nearly constant: low variance); a
structural head follows the query's position (a column is hot for a few queries only: high variance). All
depth x heads heads are ranked globally and the lowest-variance fraction ``alpha`` is contextual.

The calibration file (``litevar calibrate-kv``) stores the variances, the default ``alpha`` (the largest gap of
the sorted log-variances, within [0.1, 0.9]) and the model identity; another model's file is refused.
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


class HeadFileError(ValueError):
    """A head-classification file that cannot be read or does not fit the model."""


def column_variance(probs_BHlL: torch.Tensor) -> torch.Tensor:
    """[B, H]: per head, the variance over queries of each key column's probability, summed over columns."""
    return probs_BHlL.float().var(dim=2, unbiased=False).sum(dim=-1)


class _VarianceProbe:
    """Dense attention that records, at the last scale, the summed column variance of each head's probabilities."""

    def __init__(self, depth: int, heads: int, last_scale: int) -> None:
        self.sums = torch.zeros(depth, heads, dtype=torch.float64)
        self.count = torch.zeros(depth, dtype=torch.float64)
        self.last_scale = last_scale
        self.dense = DenseAttnProcessor()

    def __call__(self, attn, x_BLC, ctx):
        if ctx.kv_caches is None or ctx.scale_index != self.last_scale:
            return self.dense(attn, x_BLC, ctx)
        q, k, v = attn.project_qkv(x_BLC)
        k, v = ctx.kv_caches[attn.block_idx].append(k, v)
        probs = (q.float() @ k.float().transpose(-1, -2) * attn.softmax_scale).softmax(dim=-1)  # [B, H, l, L]
        variance = column_variance(probs)
        self.sums[attn.block_idx] += variance.double().sum(dim=0).cpu()
        self.count[attn.block_idx] += variance.shape[0]
        return attn.project_out(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.softmax_scale))


def measure_head_variance(pipe, samples: int = 16, batch_size: int = 8, seed: int = 100000,
                          progress: bool = True) -> torch.Tensor:
    """Mean summed column variance [depth, heads] of the last scale's attention over ``samples`` generations
    (classes in turn, image i with seed ``seed + i``)."""
    cfg = pipe.config.var
    probe = _VarianceProbe(cfg.depth, cfg.heads, len(cfg.patch_nums) - 1)
    generate_with_processor(pipe, probe, samples, batch_size, seed, "head variance", progress)
    return (probe.sums / probe.count.clamp_min(1).unsqueeze(1)).float()


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


def save_heads(path: str | Path, variance: torch.Tensor, model: dict[str, Any], samples: int) -> dict[str, Any]:
    payload = {"litevar_kv_heads": HEADS_VERSION, "model": model, "samples": samples,
               "alpha": natural_alpha(variance), "variance": variance.tolist()}
    write_atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(payload)))
    return payload


def load_heads(path: str | Path, identity: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(variance [depth, heads], calibrated alpha) of a file made for the model with ``identity``."""
    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"head classification {path} not found; make one with `litevar calibrate-kv`")
    with reading(path, HeadFileError, "head classification", "make it again with `litevar calibrate-kv`"):
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("litevar_kv_heads") != HEADS_VERSION:
            raise HeadFileError(f"{path} is not a litevar head classification (version {HEADS_VERSION})")
        variance = torch.tensor(raw["variance"], dtype=torch.float32)
        alpha = float(raw["alpha"])
        model = raw["model"]
    if variance.shape != (identity["depth"], identity["heads"]) or not 0 <= alpha <= 1:
        raise HeadFileError(f"{path}: variance {list(variance.shape)} / alpha {alpha} do not fit a model of depth "
                            f"{identity['depth']} with {identity['heads']} heads")
    if model != identity:
        raise HeadFileError(f"{path} was calibrated on another model ({model.get('weights_bf16_sha256')} vs "
                            f"{identity['weights_bf16_sha256']}); run `litevar calibrate-kv` for this one")
    return variance, alpha
