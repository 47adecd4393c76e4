"""Gathered sparse attention: per tile of consecutive queries, gather only the keys some query of the tile keeps.

For a tile, the union of the keys its queries keep (over all heads) is gathered once, then runs the fused SDPA kernel on that short key list with the exact per-query mask. The work is
``tile x gathered keys`` instead of ``tile x all cached keys``, and the FLOP counter counts exactly that, since
it sees the SDPA call on the gathered keys. Equal to dense attention under the same mask up to float rounding
(tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_TILE = 64


@dataclass
class GatheredLayout:
    """Precomputed gather indices and masks of one (layer, query scale).

    Attributes:
        tiles: per tile ``(start, end, runs or index_k or None, bias_1HTk or None)``: no index = no gather (the tile uses
            every key), no bias = every query of the tile keeps every key (plain dense attention).
        kept_pairs: query-key pairs the tiles compute (the sparse work), per head summed.
    """

    tiles: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    kept_pairs: int

    @classmethod
    def from_mask(cls, keep_HlL: torch.Tensor, device: torch.device | str, tile: int = DEFAULT_TILE) -> "GatheredLayout":
        """Build from a keep mask [heads, queries, keys] (True = kept). A tile gathers the keys any of its queries
        keeps in any head (one key list for all heads, copied as contiguous runs: far cheaper than per-head gathers)."""
        H, l, L = keep_HlL.shape
        tiles, pairs = [], 0
        for start in range(0, l, tile):
            end = min(start + tile, l)
            keep_HTL = keep_HlL[:, start:end]
            used_L = keep_HTL.any(dim=1).any(dim=0)
            if bool(keep_HTL.all()):
                tiles.append((start, end, None, None))
                pairs += H * (end - start) * L
                continue
            index_k = used_L.nonzero().flatten()
            bias = torch.zeros(H, end - start, index_k.numel()).masked_fill_(~keep_HTL[:, :, index_k], -math.inf)
            index = None if bool(used_L.all()) else _runs_or_index(index_k, device)
            tiles.append((start, end, index, bias.unsqueeze(0).to(device)))
            pairs += H * (end - start) * index_k.numel()
        return cls(tiles, pairs)


MAX_RUNS = 16


def _runs_or_index(index_k: torch.Tensor, device) -> list[tuple[int, int]] | torch.Tensor:
    """Sorted key indices as contiguous runs [(begin, end), ...] (copied by slices, the cheapest gather on CPU),
    or as an index tensor when they break into more than ``MAX_RUNS`` pieces."""
    breaks = (index_k[1:] != index_k[:-1] + 1).nonzero().flatten() + 1
    if breaks.numel() + 1 > MAX_RUNS:
        return index_k.to(device)
    bounds = [0, *breaks.tolist(), index_k.numel()]
    return [(int(index_k[a]), int(index_k[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


def _gather(x_BHLc: torch.Tensor, index) -> torch.Tensor:
    if isinstance(index, torch.Tensor):
        return x_BHLc[:, :, index]
    if len(index) == 1:
        return x_BHLc[:, :, index[0][0]:index[0][1]]
    return torch.cat([x_BHLc[:, :, a:b] for a, b in index], dim=2)


def gathered_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                       layout: GatheredLayout) -> torch.Tensor:
    """Attention of ``q`` over the kept keys only; [B, H, l, c] like dense SDPA."""
    out = torch.empty_like(q_BHlc)
    for start, end, index_k, bias in layout.tiles:
        q_tile = q_BHlc[:, :, start:end]
        if index_k is None:
            k_g, v_g = k_BHLc, v_BHLc
        else:
            k_g, v_g = _gather(k_BHLc, index_k), _gather(v_BHLc, index_k)
        mask = None if bias is None else bias.to(q_tile.dtype)
        out[:, :, start:end] = F.scaled_dot_product_attention(q_tile, k_g, v_g, attn_mask=mask, scale=scale)
    return out
