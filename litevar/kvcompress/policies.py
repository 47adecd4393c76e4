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
- ``scalekv``: drafter and refiner layers (ScaleKV): the least attention-selective layers (calibrated) are
  drafters with ``drafter_share`` times a refiner's budget, the total kept equal to the uniform budget; queries at
  the centres of a 4 x 4 grid of the current scale observe, SnapKV's pooled selection.

Every policy can ``merge`` evicted keys instead of discarding them: each evicted value is averaged into the kept
slot of its most similar key, weighted by cumulative attention (HACK's merge, whose exact rule is unpublished).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.kv_compressed import SelectionContext

POLICIES = ("hack", "h2o", "snapkv", "streaming", "pyramidkv", "ams", "scalekv")
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
                 shared_rows: bool = False, merge: bool = False) -> None:
        self.budget, self.heads, self.depth = budget, heads, depth
        self.n_obs, self.sink_scales, self.shared_rows, self.merge = observation, sink_scales, shared_rows, merge

    def groups(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        return [(torch.arange(self.heads), self.budget)]

    def observation(self, n_queries: int, device) -> torch.Tensor:
        """Observation queries of the current scale: ``n_obs`` spread evenly (all when the scale is smaller)."""
        if n_queries <= self.n_obs:
            return torch.arange(n_queries, device=device)
        return torch.linspace(0, n_queries - 1, self.n_obs, device=device).round().long()

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return _top(ctx.scores, ctx.budget)

    def merges(self, ctx: SelectionContext) -> bool:
        """Whether this group's evicted keys are merged into the kept ones (else discarded)."""
        return self.merge

    def describe(self) -> dict:
        return {"policy": self.name, "budget": self.budget, "observation": self.n_obs,
                "cfg": "shared" if self.shared_rows else "per-row", "merge": self.merge}


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

    def _window(self, ctx: SelectionContext) -> torch.Tensor:
        """bool [rows, g, n]: the observation queries' own keys."""
        return ctx.positions >= ctx.positions.max() - min(self.n_obs, ctx.budget) + 1

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        rows, g, n = ctx.scores.shape
        pooled = F.avg_pool1d(ctx.scores.reshape(rows * g, 1, n), self.pool, stride=1, padding=self.pool // 2,
                              count_include_pad=False).view(rows, g, n)
        return _top(pooled + FORCED * self._window(ctx), ctx.budget)


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
        contextual: which heads are contextual. contextual_share: B_C / B_S. max_len: the most tokens a head
            can hold (the pyramid without its last scale; no budget exceeds it; None: no cap). Others as
            :class:`Policy`.
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

    def merges(self, ctx: SelectionContext) -> bool:
        return self.merge and self._is_contextual(ctx)  # HACK merges on contextual heads only

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if self._is_contextual(ctx):
            return _top(ctx.scores, ctx.budget)
        scale = ctx.scale_of[ctx.positions]
        forced = (scale < self.sink_scales) | (scale == ctx.scale)
        return _top(ctx.scores + FORCED * forced, ctx.budget)

    def describe(self) -> dict:
        return {**super().describe(), "alpha": round(float(self.contextual.float().mean()), 4),
                "budget_structural": self.budget_s, "budget_contextual": self.budget_c}


class ScaleKV(SnapKV):
    """Drafter/refiner layers: ``selectivity`` [depth, scales] from :func:`litevar.kvcompress.heads.measure_heads`.

    Layers are ranked by their selectivity z-scored within each scale, averaged over the scales with history; the
    lowest ``round(drafters * depth)`` (at least 1) are drafters. ScaleKV labels (layer, scale) pairs and varies
    budgets per scale; here a layer keeps one label and one budget, so its cache is allocated once at that budget.

    Args:
        selectivity: per (layer, scale), NaN where there is no history. drafters: share of drafter layers.
        drafter_share: a drafter's budget over a refiner's. max_len: the most tokens a head can hold (None: no cap).
    """

    name = "scalekv"
    grid = 4  # observation queries: the centres of a grid x grid partition of the current scale

    def __init__(self, budget: int, heads: int, depth: int, selectivity: torch.Tensor, drafters: float = 0.1,
                 drafter_share: float = 4.0, max_len: int | None = None, **kwargs) -> None:
        super().__init__(budget, heads, depth, **kwargs)
        values = torch.as_tensor(selectivity, dtype=torch.float64)[:, 1:]
        z = (values - values.mean(dim=0)) / values.std(dim=0, unbiased=False).clamp_min(1e-12)
        self.drafter = torch.zeros(depth, dtype=torch.bool)
        self.drafter[z.mean(dim=1).argsort(stable=True)[:max(1, round(drafters * depth))]] = True
        n_d, cap = int(self.drafter.sum()), max_len or 2 ** 62
        total = depth * budget
        self.budget_d = max(1, min(round(drafter_share * total / (n_d * drafter_share + depth - n_d)), cap))
        rest = (total - n_d * self.budget_d) / (depth - n_d) if depth > n_d else budget
        self.budget_r = max(1, min(round(rest), cap))

    def groups(self, layer: int) -> list[tuple[torch.Tensor, int]]:
        return [(torch.arange(self.heads), self.budget_d if self.drafter[layer] else self.budget_r)]

    def observation(self, n_queries: int, device) -> torch.Tensor:
        side = math.isqrt(n_queries)
        if side < self.grid or side * side != n_queries:
            return super().observation(n_queries, device)
        centre = ((torch.arange(self.grid, device=device) * 2 + 1) * side) // (2 * self.grid)
        return (centre.view(-1, 1) * side + centre.view(1, -1)).flatten()

    def _window(self, ctx: SelectionContext) -> torch.Tensor:
        begin = int((ctx.scale_of < ctx.scale).sum())
        n_new = int((ctx.scale_of == ctx.scale).sum())
        window = torch.zeros(ctx.scale_of.numel(), dtype=torch.bool, device=ctx.positions.device)
        window[begin + self.observation(n_new, ctx.positions.device)] = True
        return window[ctx.positions]

    def describe(self) -> dict:
        return {**super().describe(), "drafters": torch.nonzero(self.drafter).flatten().tolist(),
                "budget_drafter": self.budget_d, "budget_refiner": self.budget_r}


CLASSES = {cls.name: cls for cls in (HACK, H2O, SnapKV, Streaming, PyramidKV, AMS, ScaleKV)}
