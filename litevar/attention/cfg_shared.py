"""Attention sharing across the two classifier-free-guidance halves (ASC, LiteVAR).

Rows are [conditional B; unconditional B]. Two variants, each switched on per (layer, scale) by a schedule
(executed by :class:`~litevar.attention.processor.ComposedAttnProcessor`):
- ``map``: the unconditional half reuses the conditional attention probabilities with its own values
  (what LiteVAR's code does): QK^T and softmax run for the conditional half only.
- ``output``: the unconditional half reuses the conditional attention output after the projection and skips its
  q/k/v, attention and projection (the "/2" of LiteVAR's FLOP count). Its keys/values of shared scales are never
  computed, so once a layer shares outputs it must share them for every later scale (the schedule is checked).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .probe import generate_with_processor
from .dense import DenseAttnProcessor

MODES = ("map", "output")


@dataclass
class SharingSchedule:
    """Which (layer, scale) share attention across the CFG halves.

    Args:
        mode: "map" or "output".
        shared: bool [depth, K]; for "output" every row must be a suffix (off ... off, on ... on).

    Example:
        >>> SharingSchedule.everywhere("output", depth=2, scales=3).shared.all().item()
        True
    """

    mode: str
    shared: torch.Tensor

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown sharing mode {self.mode!r}; use one of {MODES}")
        self.shared = torch.as_tensor(self.shared, dtype=torch.bool)
        if self.shared.dim() != 2:
            raise ValueError(f"the sharing schedule must be [depth, scales], got {list(self.shared.shape)}")
        if self.mode == "output":
            suffix = self.shared.flip(1).cummin(dim=1).values.flip(1)
            if not torch.equal(suffix, self.shared):
                raise ValueError("an output-sharing schedule must, per layer, share every scale after the first "
                                 "shared one (the unconditional keys/values of shared scales are never computed)")

    @classmethod
    def everywhere(cls, mode: str, depth: int, scales: int) -> "SharingSchedule":
        return cls(mode, torch.ones(depth, scales, dtype=torch.bool))

    @classmethod
    def from_similarity(cls, mode: str, similarity: torch.Tensor, min_similarity: float) -> "SharingSchedule":
        """Share where the measured cond/uncond output similarity is at least ``min_similarity`` (for "output",
        from the first scale after which it stays there). NaN (no unconditional rows there: a guidance schedule
        dropped them) counts as shared: there is nothing to compute for them."""
        shared = (similarity >= min_similarity) | similarity.isnan()
        if mode == "output":
            shared = shared.flip(1).cummin(dim=1).values.flip(1)
        return cls(mode, shared)

    def to_state(self) -> dict:
        return {"mode": self.mode, "shared": self.shared.int().tolist()}


class _SimilarityProbe:
    """Dense attention that records the cosine similarity of the cond and uncond attention outputs."""

    def __init__(self, depth: int, scales: int) -> None:
        self.sums = torch.zeros(depth, scales, dtype=torch.float64)
        self.counts = torch.zeros(depth, scales, dtype=torch.float64)
        self.dense = DenseAttnProcessor()

    def __call__(self, attn, x_BLC, ctx):
        y = self.dense(attn, x_BLC, ctx)
        if ctx.scale_index is not None and ctx.cfg_batch is not None:  # sampling with CFG
            B = ctx.cfg_batch
            cos = F.cosine_similarity(y[:B].float(), y[B:].float(), dim=-1)
            self.sums[attn.block_idx, ctx.scale_index] += cos.double().sum().item()
            self.counts[attn.block_idx, ctx.scale_index] += cos.numel()
        return y


def measure_cfg_similarity(pipe, samples: int = 32, batch_size: int = 16, seed: int = 0, progress: bool = True,
                           **sampling) -> torch.Tensor:
    """Mean cosine similarity [depth, K] of the cond and uncond attention outputs (after the projection) per
    layer and scale, over ``samples`` generations (classes in turn, image i with seed ``seed + i``)."""
    cfg = pipe.config.var
    probe = _SimilarityProbe(cfg.depth, len(cfg.patch_nums))
    generate_with_processor(pipe, probe, samples, batch_size, seed, "cfg similarity", progress, **sampling)
    return torch.where(probe.counts > 0, probe.sums / probe.counts.clamp_min(1), torch.nan)
