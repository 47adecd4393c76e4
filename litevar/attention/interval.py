"""Layout for the compiled windowed-attention kernel: kept keys as contiguous intervals per tile of queries.

A window plan keeps, for every query, a few runs of consecutive keys (a band per key scale in raster geometry,
a run per window row in 2-D geometry). Queries are taken in tiles of :data:`TILE` consecutive positions; a tile
computes scores over the union of its queries' runs (``unions``) and each query weighs only its own runs
(``ranges``, in lanes counted along the tile's unions). Built once per (layer, query scale) from the keep mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 4  # must equal TQ in csrc/interval_attention.cpp
LANES = 16  # score vector width of the kernel: a union run is computed in whole vectors


def _runs(keep_NL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of True along the last dim of [N, L]: (row, start, end) each [runs], in row then start order."""
    edges = torch.diff(F.pad(keep_NL.to(torch.int8), (1, 1)), dim=-1)
    rows, starts = (edges == 1).nonzero(as_tuple=True)
    ends = (edges == -1).nonzero(as_tuple=True)[1]
    return rows, starts, ends


def _offsets(rows: torch.Tensor, n: int) -> torch.Tensor:
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return offsets


@dataclass
class IntervalLayout:
    """Interval lists of one (layer, query scale) for ``torch.ops.litevar.interval_attention``.

    Attributes:
        queries, keys: the plan block's shape (a call must match it).
        tile_offsets: int64 [heads * tiles + 1], tile (h, t)'s union runs are ``unions[tile_offsets[h*tiles+t]:...]``.
        unions: int32 [n, 2] key runs (start, end) of the tiles.
        query_offsets: int64 [heads * queries + 1] into ``ranges``.
        ranges: int32 [m, 2] a query's kept lanes (start, end) along its tile's unions.
        max_lanes: the longest tile (keys summed over its unions).
        score_lanes: scores the kernel computes per batch row (whole vectors of :data:`LANES` per union run).
        kept_pairs: query-key pairs the kernel weighs per batch row, summed over heads (union keys x tile rows).
    """

    queries: int
    keys: int
    tile_offsets: torch.Tensor
    unions: torch.Tensor
    query_offsets: torch.Tensor
    ranges: torch.Tensor
    max_lanes: int
    score_lanes: int
    kept_pairs: int

    @classmethod
    def from_mask(cls, keep_HlL: torch.Tensor) -> "IntervalLayout":
        """From a keep mask [heads, queries, keys] (True = kept); every query must keep at least one key."""
        keep_HlL = keep_HlL.cpu().bool()
        H, l, L = keep_HlL.shape
        if not bool(keep_HlL.any(dim=-1).all()):
            raise ValueError("a window plan left a query with no key to attend to")
        tiles = -(-l // TILE)
        padded = torch.zeros(H, tiles * TILE, L, dtype=torch.bool)
        padded[:, :l] = keep_HlL
        union_HtL = padded.view(H, tiles, TILE, L).any(dim=2)
        u_rows, u_starts, u_ends = _runs(union_HtL.view(H * tiles, L))
        lane_HtL = union_HtL.to(torch.int32).cumsum(-1) - 1  # lane of each union key within its tile
        q_rows, q_starts, q_ends = _runs(keep_HlL.view(H * l, L))
        tile_of = (q_rows // l) * tiles + (q_rows % l) // TILE
        lanes = lane_HtL.view(H * tiles, L)
        ranges = torch.stack([lanes[tile_of, q_starts], lanes[tile_of, q_ends - 1] + 1], dim=1)
        lengths = u_ends - u_starts
        per_tile = union_HtL.sum(dim=-1)
        return cls(queries=l, keys=L,
                   tile_offsets=_offsets(u_rows, H * tiles),
                   unions=torch.stack([u_starts, u_ends], dim=1).to(torch.int32).contiguous(),
                   query_offsets=_offsets(q_rows, H * l),
                   ranges=ranges.to(torch.int32).contiguous(),
                   max_lanes=int(per_tile.max()),
                   score_lanes=TILE * int(((lengths + LANES - 1) // LANES * LANES).sum()),
                   kept_pairs=TILE * int(per_tile.sum()))

    def flops_per_row(self, head_dim: int) -> int:
        """Multiply-adds x 2 of one batch row: q.k over whole score vectors, then weights x values."""
        return 2 * head_dim * (self.score_lanes + self.kept_pairs)


def interval_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                       layout: IntervalLayout) -> torch.Tensor:
    """Attention of ``q`` over its kept key intervals (the compiled kernel); [B, H, l, c] like dense SDPA."""
    if q_BHlc.shape[2] != layout.queries or k_BHLc.shape[2] != layout.keys:
        raise ValueError(f"interval layout is for {layout.queries} queries x {layout.keys} keys, the call has "
                         f"{q_BHlc.shape[2]} x {k_BHLc.shape[2]}")
    return torch.ops.litevar.interval_attention(
        q_BHlc, k_BHLc, v_BHLc, layout.tile_offsets, layout.unions, layout.query_offsets, layout.ranges,
        float(scale), layout.max_lanes, layout.flops_per_row(q_BHlc.shape[-1]))
