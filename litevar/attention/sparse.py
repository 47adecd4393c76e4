"""The PyTorch gathered kernel: attention that computes only the kept query-key pairs of a window plan (which
kernel runs a call is decided in :mod:`litevar.attention.dispatch`).

Each tile of queries attends only to the keys some query of the tile keeps.

A :class:`GatheredLayout` is built once per (layer, query scale) from the plan's keep mask. Queries are cut into
tiles of T consecutive raster positions; for each (head, tile) the union of its kept keys is listed, padded with
masked slots to the longest list of its head group, with an additive -inf mask for the pairs outside the window.
A call gathers those keys with one ``index_select`` per chunk and runs two batched matmuls and a softmax. Chunks
(batch rows x head group) are sized so that their scores stay in cache: one large chunk runs far slower on CPU.

The work is ``tiles x T x gathered keys`` (padding included), the matmuls run inside ``count_as("attention")``,
so the FLOP counter counts what is computed. Equal to dense attention under the same mask up to float rounding
(tested). Why not CPU SDPA on the gathered keys: its cost does not follow the key count below ~512 keys, and a
compiled FlexAttention with a block mask was slower than dense SDPA on these shapes (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..flops import count_as

TILES = (4, 8, 16, 32, 64)  # 4 and 8 serve small scales (the cost model penalises them: 4x and 2.5x per pair)
CHUNK_BYTES = 1 << 18  # scores of one chunk per thread, in the compute dtype: about a core's L2 share
GROUP_SLACK = 1.25  # heads share a group (one padded key count) while their key counts differ by at most this
TILE_COST = 12  # per-pair overhead of small tiles: cost ~ pairs * (1 + TILE_COST / T), fitted on d16 shapes
DENSE_ABOVE = 0.8  # gathering more than this share of the pairs is slower than the masked dense kernel


@dataclass
class HeadGroup:
    """Heads computed together: their per-tile key lists padded to one length ``keys``."""

    heads: torch.Tensor  # long [g]
    positions: torch.Tensor  # long [g, tiles, keys]: key positions (padding slots point at key 0)
    bias: torch.Tensor  # float32 [g, tiles, T, keys]: 0 kept, -inf not
    keys: int
    _index: dict = field(default_factory=dict, repr=False)
    _bias: dict = field(default_factory=dict, repr=False)

    def index(self, row_stride: int) -> torch.Tensor:
        """Flat gather index into a [rows, heads * row_stride, d] view of the keys."""
        if row_stride not in self._index:
            self._index[row_stride] = (self.heads.view(-1, 1, 1) * row_stride + self.positions).flatten()
        return self._index[row_stride]

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._bias:
            self._bias[dtype] = self.bias.to(dtype)
        return self._bias[dtype]


@dataclass
class GatheredLayout:
    """Gather lists of one (layer, query scale).

    Attributes:
        tile: queries per tile (T).
        tiles: number of tiles (the last one padded).
        groups: head groups; empty when the dense kernel runs (with ``mask``, or none when all is kept).
        kept_pairs: query-key pairs computed, padding included, summed over heads.
        mask: the -inf mask [1, heads, queries, keys] when the dense kernel runs on a sparse plan.
    """

    tile: int
    tiles: int
    groups: list[HeadGroup]
    kept_pairs: int
    mask: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.mask is not None and dtype not in self._masks:
            self._masks[dtype] = self.mask.to(dtype)
        return self._masks.get(dtype)

    @classmethod
    def dense(cls, keep_HlL: torch.Tensor, device: torch.device | str) -> "GatheredLayout":
        """Dense SDPA over every pair: unmasked when everything is kept, else with the plan's -inf mask."""
        H, l, L = keep_HlL.shape
        if bool(keep_HlL.all()):
            return cls(l, 1, [], H * l * L)
        mask = torch.zeros(keep_HlL.shape).masked_fill_(~keep_HlL, -math.inf).unsqueeze(0)
        return cls(l, 1, [], H * l * L, mask.to(device))

    @classmethod
    def from_mask(cls, keep_HlL: torch.Tensor, device: torch.device | str,
                  tile: int | None = None) -> "GatheredLayout":
        """Build from a keep mask [heads, queries, keys] (True = kept); ``tile`` None picks the cheapest of
        :data:`TILES` by ``pairs * (1 + TILE_COST / T)``."""
        H, l, L = keep_HlL.shape
        if bool(keep_HlL.all()):
            return cls.dense(keep_HlL, device)
        if tile is None:
            best = min((cls.from_mask(keep_HlL, device, t) for t in TILES),
                       key=lambda layout: layout.kept_pairs * (1 + TILE_COST / layout.tile))
            return best if best.kept_pairs <= DENSE_ABOVE * H * l * L else cls.dense(keep_HlL, device)
        tiles = math.ceil(l / tile)
        keep = torch.zeros(H, tiles * tile, L, dtype=torch.bool)
        keep[:, :l] = keep_HlL
        keep[:, l:, 0] = True  # padding queries: one harmless key, so their softmax is finite (output dropped)
        keep = keep.view(H, tiles, tile, L)
        used = keep.any(dim=2)  # [H, tiles, L]
        counts = used.sum(dim=-1)  # [H, tiles]
        # used keys first, in key order (a stable sort of "not used")
        order = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices
        groups, pairs = [], 0
        for heads in _group_heads(counts.max(dim=1).values):
            keys = int(counts[heads].max())
            positions = order[heads, :, :keys]
            slot_used = torch.arange(keys).view(1, 1, keys) < counts[heads].unsqueeze(-1)
            kept = torch.gather(keep[heads], 3, positions.unsqueeze(2).expand(-1, -1, tile, -1))
            kept &= slot_used.unsqueeze(2)
            bias = torch.zeros(kept.shape).masked_fill_(~kept, -math.inf)
            positions = torch.where(slot_used, positions, 0)
            groups.append(HeadGroup(heads.to(device), positions.to(device), bias.to(device), keys))
            pairs += len(heads) * tiles * tile * keys
        return cls(tile, tiles, groups, pairs)


def _group_heads(keys_H: torch.Tensor) -> list[torch.Tensor]:
    """Heads sorted by key count, cut where the count grows past ``GROUP_SLACK`` x the group's first."""
    order = torch.argsort(keys_H, stable=True).tolist()
    groups, current = [], [order[0]]
    for h in order[1:]:
        if keys_H[h] > GROUP_SLACK * max(int(keys_H[current[0]]), 1):
            groups.append(current)
            current = []
        current.append(h)
    groups.append(current)
    return [torch.tensor(g) for g in groups]


def _rows_view(x_BHLc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, H * row_stride, c] view of [B, H, L, c] keys without copying the (cache-slice) storage."""
    B, H, L, c = x_BHLc.shape
    s_b, s_h, s_l, s_c = x_BHLc.stride()
    if s_c != 1 or s_l != c or s_h % c:
        x_BHLc = x_BHLc.contiguous()
        s_b, s_h = x_BHLc.stride()[:2]
    row_stride = s_h // c
    return x_BHLc.as_strided((B, H * row_stride, c), (s_b, c, 1)), row_stride


def _as_slice(heads: torch.Tensor) -> slice | torch.Tensor:
    """Consecutive head numbers as a slice (views, written in place), others as an index."""
    first = int(heads[0])
    if torch.equal(heads, torch.arange(first, first + len(heads), device=heads.device)):
        return slice(first, first + len(heads))
    return heads


def gathered_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                       layout: GatheredLayout, probs_fn=None) -> torch.Tensor:
    """Attention of ``q`` over the kept keys only; [B, H, l, c] like dense SDPA. ``probs_fn`` transforms the
    probabilities of the computed pairs (pairs outside the window have probability 0 and stay 0 under it)."""
    if not layout.groups:
        if probs_fn is not None:
            raise ValueError("a dense layout has no explicit probabilities: use explicit_attention")
        return F.scaled_dot_product_attention(q_BHlc, k_BHLc, v_BHLc, attn_mask=layout.mask_as(q_BHlc.dtype),
                                              scale=scale)
    B, H, l, c = q_BHlc.shape
    T, tiles = layout.tile, layout.tiles
    q_tiles = q_BHlc.new_empty(B, H, tiles * T, c)
    torch.mul(q_BHlc, scale, out=q_tiles[:, :, :l])
    q_tiles[:, :, l:] = 0
    q_tiles = q_tiles.view(B, H, tiles, T, c)
    out = torch.empty_like(q_tiles)
    budget = CHUNK_BYTES * torch.get_num_threads()
    k_rows, row_stride = _rows_view(k_BHLc)
    v_rows, v_stride = _rows_view(v_BHLc)
    with count_as("attention"):
        for group in layout.groups:
            index, v_index = group.index(row_stride), group.index(v_stride)
            bias = group.bias_as(q_BHlc.dtype)
            per_head = tiles * T * group.keys * q_BHlc.element_size()
            g, step = len(group.heads), min(len(group.heads), max(1, CHUNK_BYTES // per_head))
            rows = max(1, budget // (step * per_head)) if step == g else 1
            for j0 in range(0, g, step):
                j1 = min(g, j0 + step)
                heads = _as_slice(group.heads[j0:j1])
                span = slice(j0 * tiles * group.keys, j1 * tiles * group.keys)
                for b0 in range(0, B, rows):
                    b1 = min(B, b0 + rows)
                    shape = (b1 - b0, j1 - j0, tiles, group.keys, c)
                    k_g = k_rows[b0:b1].index_select(1, index[span]).view(shape)
                    v_g = v_rows[b0:b1].index_select(1, v_index[span]).view(shape)
                    scores = torch.matmul(q_tiles[b0:b1, heads], k_g.transpose(-1, -2)).add_(bias[j0:j1])
                    probs = torch.softmax(scores, dim=-1)
                    if probs_fn is not None:
                        probs = probs_fn(probs).to(probs.dtype)
                    if isinstance(heads, slice):
                        torch.matmul(probs, v_g, out=out[b0:b1, heads])
                    else:
                        out[b0:b1, heads] = torch.matmul(probs, v_g)
    return out.view(B, H, tiles * T, c)[:, :, :l]
