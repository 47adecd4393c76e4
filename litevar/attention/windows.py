"""Window plans for multi-diagonal windowed attention (MDWA, LiteVAR): which keys each query keeps.

A plan holds one window per (layer, head, query scale k, key scale j <= k): ``FULL`` (the whole block),
``DROP`` (none of it) or a width ``w >= 1``. Queries of the first ``full_query_scales`` scales attend fully,
and keys of the first ``kept_key_scales`` scales are always kept (LiteVAR: 3 and 3, the first 14 tokens).

Geometries (``x``: a query's flattened index in its n_k x n_k scale, ``y``: a key's in its n_j x n_j scale):
- ``raster`` (LiteVAR, faithful): keep ``|x * n_j / n_k - y| < w``, a band in flattened raster order; rows of
  16 tokens make neighbouring rows parallel diagonals.
- ``2d``: keep keys whose row and column both lie within ``w`` of the query's spatially corresponding
  position ``((r + 0.5) n_j / n_k - 0.5, (c + 0.5) n_j / n_k - 0.5)``: a square window.
For both, :func:`needed_width` gives the smallest width that keeps each (query, key) pair, so a window of
width w keeps exactly the pairs with ``needed_width <= w``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

FULL = -1
DROP = 0
GEOMETRIES = ("raster", "2d")


class PlanError(ValueError):
    """A window plan that is malformed or belongs to another model."""


@lru_cache(maxsize=512)
def needed_width(geometry: str, n_k: int, n_j: int) -> torch.Tensor:
    """int32 [n_k^2, n_j^2]: the smallest window width that keeps each (query, key) pair (``floor(dist) + 1``)."""
    if geometry == "raster":
        x = torch.arange(n_k * n_k, dtype=torch.float64).view(-1, 1)
        y = torch.arange(n_j * n_j, dtype=torch.float64).view(1, -1)
        dist = (x * (n_j / n_k) - y).abs()
    elif geometry == "2d":
        r = torch.arange(n_k, dtype=torch.float64)
        centre = (r + 0.5) * (n_j / n_k) - 0.5
        key = torch.arange(n_j, dtype=torch.float64)
        d_1D = (centre.view(-1, 1) - key.view(1, -1)).abs()  # [n_k, n_j] along one axis
        dist = torch.maximum(d_1D.view(n_k, 1, n_j, 1), d_1D.view(1, n_k, 1, n_j)).reshape(n_k * n_k, n_j * n_j)
    else:
        raise PlanError(f"unknown window geometry {geometry!r}; use one of {GEOMETRIES}")
    # 1e-9 keeps exact-integer distances (e.g. the diagonal, 0) on the intended side of the strict '<'.
    return (dist + 1e-9).floor().to(torch.int32) + 1


def max_width(geometry: str, n_k: int, n_j: int) -> int:
    """A width that keeps every pair of the block."""
    return int(needed_width(geometry, n_k, n_j).max())


@dataclass
class WindowPlan:
    """Per (layer, head, query scale, key scale) windows, tied to a model.

    Args:
        patch_nums: the model's pyramid.
        windows: int32 [depth, heads, K, K]; entry [l, h, k, j] for j <= k is FULL, DROP or a width >= 1.
        geometry: "raster" or "2d".
        full_query_scales: queries of scales below this attend fully.
        kept_key_scales: keys of scales below this are always kept (>= 1, so no query loses every key).
        model: identity of the model the plan was calibrated on (config and weights digest), or None.
        meta: calibration settings (threshold, samples, ...), for the record.

    Example:
        >>> plan = WindowPlan.full((1, 2, 3, 4), depth=2, heads=2)
        >>> plan.keep_mask(0, 3).shape, plan.kept_fraction()
        (torch.Size([2, 16, 30]), 1.0)
    """

    patch_nums: tuple[int, ...]
    windows: torch.Tensor
    geometry: str = "raster"
    full_query_scales: int = 3
    kept_key_scales: int = 3
    model: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        K = len(self.patch_nums)
        if self.geometry not in GEOMETRIES:
            raise PlanError(f"unknown window geometry {self.geometry!r}; use one of {GEOMETRIES}")
        if self.windows.dim() != 4 or tuple(self.windows.shape[2:]) != (K, K):
            raise PlanError(f"windows must be [depth, heads, {K}, {K}] for a {K}-scale pyramid, got "
                            f"{list(self.windows.shape)}")
        if not 1 <= self.kept_key_scales <= K or not 0 <= self.full_query_scales <= K:
            raise PlanError(f"kept_key_scales must be in 1..{K} and full_query_scales in 0..{K}, got "
                            f"{self.kept_key_scales} and {self.full_query_scales}")
        self.windows = self.windows.to(torch.int32)
        if bool((self.windows < FULL).any()):
            raise PlanError("window entries must be FULL (-1), DROP (0) or a width >= 1")
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def full(cls, patch_nums, depth: int, heads: int, geometry: str = "raster", **kwargs) -> "WindowPlan":
        """A plan that keeps everything (equal to dense attention)."""
        K = len(patch_nums)
        return cls(tuple(patch_nums), torch.full((depth, heads, K, K), FULL, dtype=torch.int32), geometry, **kwargs)

    @property
    def depth(self) -> int:
        return self.windows.shape[0]

    @property
    def heads(self) -> int:
        return self.windows.shape[1]

    def permute_heads(self, order: torch.Tensor) -> "WindowPlan":
        """This plan for the model with permuted heads: head ``p`` of layer ``l`` gets the windows of head
        ``order[l, p]`` (see :mod:`litevar.kvcompress.reorder`). The model identity is kept: it is the identity of
        the weights as loaded."""
        order = torch.as_tensor(order).long().cpu()
        if tuple(order.shape) != (self.depth, self.heads):
            raise PlanError(f"a head order for this plan must be [{self.depth}, {self.heads}], got {list(order.shape)}")
        windows = self.windows.gather(1, order.view(self.depth, self.heads, 1, 1).expand_as(self.windows))
        return WindowPlan(self.patch_nums, windows, self.geometry, self.full_query_scales, self.kept_key_scales,
                          self.model, dict(self.meta))

    def _block_keep(self, layer: int, k: int, j: int) -> torch.Tensor:
        """bool [heads, n_k^2, n_j^2] for one block."""
        n_k, n_j = self.patch_nums[k], self.patch_nums[j]
        w_H = self.windows[layer, :, k, j]
        if k < self.full_query_scales or j < self.kept_key_scales:
            return torch.ones(self.heads, n_k * n_k, n_j * n_j, dtype=torch.bool)
        need = needed_width(self.geometry, n_k, n_j)
        keep = need.unsqueeze(0) <= w_H.view(-1, 1, 1)
        return keep | (w_H == FULL).view(-1, 1, 1)

    def keep_mask(self, layer: int, k: int) -> torch.Tensor:
        """bool [heads, n_k^2, L_k]: which cached keys (scales 0..k) each query of scale k keeps (cached)."""
        key = (layer, k)
        if key not in self._masks:
            self._masks[key] = torch.cat([self._block_keep(layer, k, j) for j in range(k + 1)], dim=2)
        return self._masks[key]

    def attn_bias(self, layer: int, k: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Additive mask [1, heads, n_k^2, L_k]: 0 where kept, -inf where not (exact masking before softmax)."""
        keep = self.keep_mask(layer, k)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(keep.to(device), zero, torch.tensor(-math.inf, dtype=dtype, device=device)).unsqueeze(0)

    def teacher_forcing_bias(self, layer: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Block-causal mask combined with the plan [1, heads, L, L] for a teacher-forced pass."""
        rows = []
        total = sum(p * p for p in self.patch_nums)
        for k in range(len(self.patch_nums)):
            keep = self.keep_mask(layer, k)
            pad = torch.zeros(self.heads, keep.shape[1], total - keep.shape[2], dtype=torch.bool)
            rows.append(torch.cat([keep, pad], dim=2))
        keep_HLL = torch.cat(rows, dim=1).to(device)
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(keep_HLL, zero, torch.tensor(-math.inf, dtype=dtype, device=device)).unsqueeze(0)

    def kept_pairs(self) -> tuple[int, int]:
        """(kept, dense) query-key pairs of KV-cached sampling, summed over layers, heads and scales."""
        kept = dense = 0
        for layer in range(self.depth):
            for k in range(len(self.patch_nums)):
                mask = self.keep_mask(layer, k)
                kept += int(mask.sum())
                dense += mask.numel()
        return kept, dense

    def kept_fraction(self) -> float:
        kept, dense = self.kept_pairs()
        return kept / dense

    def to_state(self) -> dict[str, Any]:
        return {"patch_nums": list(self.patch_nums), "windows": self.windows.tolist(), "geometry": self.geometry,
                "full_query_scales": self.full_query_scales, "kept_key_scales": self.kept_key_scales,
                "model": self.model, "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "WindowPlan":
        expected = {"patch_nums", "windows", "geometry", "full_query_scales", "kept_key_scales", "model", "meta"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise PlanError(f"not a window plan: expected keys {sorted(expected)}, got {got}")
        return cls(tuple(state["patch_nums"]), torch.tensor(state["windows"], dtype=torch.int32), state["geometry"],
                   state["full_query_scales"], state["kept_key_scales"], state["model"], state["meta"])

    def check_model(self, identity: dict[str, Any]) -> None:
        """Refuse a plan calibrated on another model (pyramid, depth/heads, config or weights differ)."""
        if self.model is None:
            return
        changed = sorted(k for k in self.model.keys() | identity.keys() if self.model.get(k) != identity.get(k))
        if changed:
            raise PlanError(f"this window plan was calibrated on another model (differs in {', '.join(changed)}); "
                            "calibrate one for this model with `litevar calibrate-attention`")
