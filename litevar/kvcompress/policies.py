"""KV-cache eviction policies on one compaction API (:class:`~litevar.attention.kv_compressed.CompressedKVCache`).

A policy gives each layer its head groups and budgets (``groups``), the observation queries whose attention
scores the candidates (``observation``), and which candidates to keep (``select``). Budgets are in tokens per
(row, head): ``(1 - ratio)`` of the whole pyramid on average, where ``ratio`` is the share removed.

- ``hack``: head-aware (HACK). Contextual heads keep the top keys by the attention of 32 queries sampled evenly
  from the current scale; structural heads keep the first two scales and the newest scale, then the top-scoring
  rest. Budgets ``B = alpha * B_C + (1 - alpha) * B_S`` with ``B_C = contextual_share * B_S``.
- ``h2o``: heavy hitters: attention of every query, accumulated over all scales so far.
- ``snapkv``: the last ``observation`` queries of the scale, scores average-pooled along the keys; those
  queries' own keys always kept.
- ``streaming``: the first ``sink_scales`` scales as sinks, then the most recent tokens.
- ``pyramidkv``: SnapKV's selection with per-layer budgets falling linearly (1.5 B at the first layer to
  0.5 B at the last).
- ``ams``: scale-level: the coarsest ``sink_scales`` scales, then whole scales from the newest back; the scale
  that does not fit whole is filled by attention score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.kv_compressed import SelectionContext

POLICIES = ("hack", "h2o", "snapkv", "streaming", "pyramidkv", "ams")
FORCED = 1e9  # a score above any attention mass: the key is kept whatever the others score


def _top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` highest scores along the last dim, in ascending candidate order."""
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


class Policy:
    """Base: one head group per layer with the average budget; subclasses override the parts they change.

    Args:
        budget: average tokens kept per (row, head). heads, depth: the model's. observation: queries that score.
        sink_scales: first scales treated as sinks (streaming, ams) or always kept (hack structural heads).
        shared_rows: use the conditional rows' selection for both CFG halves (else each row selects its own).
    """

    name = "base"

    def __init__(self, budget: int, heads: int, depth: int, observation: int = 32, sink_scales: int = 2,
                 shared_rows: bool = False) -> None:
        self.budget, self.heads, self.depth = budget, heads, depth
        self.n_obs, self.sink_scales, self.shared_rows = observation, sink_scales, shared_rows

    def groups(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        return [(torch.arange(self.heads), self.budget)]

    def observation(self, n_queries: int, device) -> torch.Tensor:
        """Observation queries of the current scale: ``n_obs`` spread evenly (all when the scale is smaller)."""
        if n_queries <= self.n_obs:
            return torch.arange(n_queries, device=device)
        return torch.linspace(0, n_queries - 1, self.n_obs, device=device).round().long()

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return _top(ctx.scores, ctx.budget)

    def describe(self) -> dict:
        return {"policy": self.name, "budget": self.budget, "observation": self.n_obs,
                "cfg": "shared" if self.shared_rows else "per-row"}


class H2O(Policy):
    name = "h2o"

    def observation(self, n_queries: int, device) -> torch.Tensor:
        return torch.arange(n_queries, device=device)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return _top(ctx.history, ctx.budget)


class SnapKV(Policy):
    name = "snapkv"
    pool = 7

    def observation(self, n_queries: int, device) -> torch.Tensor:
        return torch.arange(max(0, n_queries - self.n_obs), n_queries, device=device)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        rows, g, n = ctx.scores.shape
        pooled = F.avg_pool1d(ctx.scores.reshape(rows * g, 1, n), self.pool, stride=1, padding=self.pool // 2,
                              count_include_pad=False).view(rows, g, n)
        window = ctx.positions >= ctx.positions.max() - min(self.n_obs, ctx.budget) + 1
        return _top(pooled + FORCED * window, ctx.budget)


class PyramidKV(SnapKV):
    name = "pyramidkv"

    def groups(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        share = 1.5 - layer / max(self.depth - 1, 1)
        return [(torch.arange(self.heads), max(1, round(self.budget * share)))]


class Streaming(Policy):
    name = "streaming"

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        sinks = ctx.scale_of[ctx.positions] < self.sink_scales
        return _top(ctx.positions.float() + FORCED * sinks, ctx.budget)


class AMS(Policy):
    name = "ams"

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        scale = ctx.scale_of[ctx.positions]
        coarse = scale < self.sink_scales
        # whole scales from the newest back; within the scale cut by the budget, the best-attended keys
        return _top(FORCED * coarse + scale.float() + ctx.scores.clamp(0, 0.999), ctx.budget)


class HACK(Policy):
    """Head-aware budgets: ``contextual`` is bool [depth, heads] from :func:`litevar.kvcompress.heads.classify`.

    Args:
        contextual: which heads are contextual. contextual_share: B_C / B_S. max_len: the whole pyramid's tokens
            (no head's budget exceeds it; None: no cap). Others as :class:`Policy`.
    """

    name = "hack"

    def __init__(self, budget: int, heads: int, depth: int, contextual: torch.Tensor, contextual_share: float = 0.25,
                 max_len: int | None = None, **kwargs) -> None:
        super().__init__(budget, heads, depth, **kwargs)
        max_len = max_len or 2 ** 62
        self.contextual = torch.as_tensor(contextual, dtype=torch.bool)
        alpha = float(self.contextual.float().mean())
        # B = alpha B_C + (1 - alpha) B_S with B_C = share * B_S, but no head keeps more than the whole pyramid:
        # what a capped structural head cannot use goes to the contextual heads (ratio 0 keeps everything)
        self.budget_s = max(1, min(round(budget / (alpha * contextual_share + 1 - alpha)), max_len))
        rest = (budget - (1 - alpha) * self.budget_s) / alpha if alpha > 0 else 0
        self.budget_c = max(1, min(round(max(rest, contextual_share * self.budget_s)), max_len))

    def groups(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        mask = self.contextual[layer]
        groups = []
        if (~mask).any():
            groups.append((torch.nonzero(~mask).flatten(), self.budget_s))
        if mask.any():
            groups.append((torch.nonzero(mask).flatten(), self.budget_c))
        return groups

    def _is_contextual(self, ctx: SelectionContext) -> bool:
        mask = self.contextual[ctx.layer]
        return bool(mask.any()) and (ctx.group == 1 or not bool((~mask).any()))

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if self._is_contextual(ctx):
            return _top(ctx.scores, ctx.budget)
        scale = ctx.scale_of[ctx.positions]
        forced = (scale < self.sink_scales) | (scale == ctx.scale)
        return _top(ctx.scores + FORCED * forced, ctx.budget)

    def describe(self) -> dict:
        return {**super().describe(), "alpha": round(float(self.contextual.float().mean()), 4),
                "budget_structural": self.budget_s, "budget_contextual": self.budget_c}


CLASSES = {cls.name: cls for cls in (HACK, H2O, SnapKV, Streaming, PyramidKV, AMS)}
