"""Gathered sparse attention: per tile of consecutive queries, gather only the keys some query of the tile keeps.

For a tile, each head gathers the union of the keys its queries keep (padded to the longest head with masked
slots), then runs the fused SDPA kernel on that short key list with the exact per-query mask. The work is
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
        tiles: per tile ``(start, end, index_Hk or None, bias_1HTk or None)``; None means the tile keeps every key
            of every head (plain dense attention, no gather).
        kept_pairs: query-key pairs the tiles compute (the sparse work), per head summed.
    """

    tiles: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]
    kept_pairs: int

    @classmethod
    def from_mask(cls, keep_HlL: torch.Tensor, device: torch.device | str, tile: int = DEFAULT_TILE) -> "GatheredLayout":
        """Build from a keep mask [heads, queries, keys] (True = kept)."""
        H, l, L = keep_HlL.shape
        tiles, pairs = [], 0
        for start in range(0, l, tile):
            end = min(start + tile, l)
            keep_HTL = keep_HlL[:, start:end]
            used_HL = keep_HTL.any(dim=1)
            if bool(used_HL.all()):
                tiles.append((start, end, None, None))
                pairs += H * (end - start) * L
                continue
            width = int(used_HL.sum(dim=1).max())
            # Sorted kept indices first; padding slots point at key 0 and are masked out.
            order = torch.sort((~used_HL).to(torch.int8), dim=1, stable=True).indices[:, :width]
            valid_Hk = torch.gather(used_HL, 1, order)
            index_Hk = torch.where(valid_Hk, order, torch.zeros_like(order))
            keep_HTk = torch.gather(keep_HTL, 2, index_Hk.unsqueeze(1).expand(H, end - start, width)) & valid_Hk.unsqueeze(1)
            bias = torch.zeros(H, end - start, width).masked_fill_(~keep_HTk, -math.inf)
            tiles.append((start, end, index_Hk.to(device), bias.unsqueeze(0).to(device)))
            pairs += H * (end - start) * width
        return cls(tiles, pairs)


def gathered_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                       layout: GatheredLayout) -> torch.Tensor:
    """Attention of ``q`` over the kept keys only; [B, H, l, c] like dense SDPA."""
    B, H, l, c = q_BHlc.shape
    out = torch.empty_like(q_BHlc)
    for start, end, index_Hk, bias in layout.tiles:
        q_tile = q_BHlc[:, :, start:end]
        if index_Hk is None:
            out[:, :, start:end] = F.scaled_dot_product_attention(q_tile, k_BHLc, v_BHLc, scale=scale)
            continue
        gather_BHkc = index_Hk.view(1, H, -1, 1).expand(B, H, -1, c)
        k_g = torch.gather(k_BHLc, 2, gather_BHkc)
        v_g = torch.gather(v_BHLc, 2, gather_BHkc)
        out[:, :, start:end] = F.scaled_dot_product_attention(q_tile, k_g, v_g, attn_mask=bias.to(q_tile.dtype),
                                                              scale=scale)
    return out
