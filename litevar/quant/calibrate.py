"""Calibration data for quantization, gathered on the real KV-cached sampling path.

Every Linear of interest records, per token group (scale) and per CFG half, the exact per-channel min/max of
its input and a uniform random sample of input rows (reservoir by random priority, so the sample does not
depend on how calls are batched). Methods derive their statistics from these; the cond/uncond mix of the
rows is a parameter (PTQ4ARVG's distribution-guided calibration chooses it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..jobs import JobList
from .groups import TokenGroups
from .layers import linear_layers


@dataclass
class InputStats:
    """Calibration statistics of one Linear's input (K channels, G scale groups, 2 CFG halves).

    ``lo``/``hi`` [2, G, K]: per-channel min/max. ``rows[half][g]``: sampled input rows [n, K] (float32).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    rows: list[list[torch.Tensor]]
    keys: list[list[torch.Tensor]] = field(repr=False)

    def sample(self, groups=None, cond_share: float | None = None) -> torch.Tensor:
        """Sampled rows of the given scale groups (default all), both halves, or mixed at ``cond_share``."""
        groups = range(len(self.rows[0])) if groups is None else groups
        halves = [torch.cat([self.rows[h][g] for g in groups]) for h in (0, 1)]
        if cond_share is None:
            return torch.cat(halves)
        total = min(len(halves[0]), len(halves[1]))
        n_cond = round(cond_share * total)
        return torch.cat((halves[0][:n_cond], halves[1][:total - n_cond]))

    def channel_range(self, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) [K] over the given groups and both halves."""
        idx = slice(None) if groups is None else list(groups)
        return self.lo[:, idx].amin(dim=(0, 1)), self.hi[:, idx].amax(dim=(0, 1))


class _Recorder:
    def __init__(self, K: int, groups: TokenGroups, rows_per_group: int, generator: torch.Generator) -> None:
        G = groups.n_groups
        self.groups, self.cap, self.gen = groups, rows_per_group, generator
        self.lo = torch.full((2, G, K), torch.inf)
        self.hi = torch.full((2, G, K), -torch.inf)
        self.rows = [[torch.empty(0, K) for _ in range(G)] for _ in range(2)]
        self.keys = [[torch.empty(0) for _ in range(G)] for _ in range(2)]
        self.batch: int | None = None  # images of the generation being recorded

    def __call__(self, module, args) -> None:
        x = args[0].detach().float()
        if x.dim() == 2:  # the class conditioning (AdaLN inputs): counted with the first scale
            x = x.unsqueeze(1)
        B2, L, K = x.shape
        # the sampler runs [conditional; unconditional] rows, or only the conditional ones where CFG output sharing
        # or a guidance schedule leaves the unconditional rows out
        half_rows = B2 if self.batch is not None and B2 == self.batch else B2 // 2
        ids = self.groups.ids(L)
        present = ids.unique().tolist()
        for half, part in enumerate((x[:half_rows], x[half_rows:])):
            if part.numel() == 0:
                continue
            for g in present:
                rows = (part if len(present) == 1 else part[:, ids == g]).reshape(-1, K)
                self.lo[half, g] = torch.minimum(self.lo[half, g], rows.amin(0))
                self.hi[half, g] = torch.maximum(self.hi[half, g], rows.amax(0))
                self._offer(half, g, rows)

    def _offer(self, half: int, g: int, rows: torch.Tensor) -> None:
        """Keep the ``cap`` rows with the smallest random keys among those kept so far and ``rows``."""
        keys = torch.rand(len(rows), generator=self.gen)
        if len(rows) > self.cap:  # only the new rows with the cap smallest keys can be kept: copy just those
            keys, pick = torch.topk(keys, self.cap, largest=False)
            rows = rows[pick]
        keys = torch.cat((self.keys[half][g], keys))
        keep = keys.argsort()[:self.cap]
        self.keys[half][g], self.rows[half][g] = keys[keep], torch.cat((self.rows[half][g], rows))[keep]

    def stats(self) -> InputStats:
        return InputStats(self.lo, self.hi, self.rows, self.keys)


@torch.no_grad()
def collect_input_stats(pipe, types, samples: int = 32, seed: int = 100000, batch_size: int = 16,
                        rows_per_group: int = 256, progress: bool = True, **sampling) -> dict[str, InputStats]:
    """Generate ``samples`` images (classes in turn, image i with seed ``seed + i``) with the model's sampling
    settings and record the inputs of its Linears of the given types.

    Example:
        >>> stats = collect_input_stats(pipe, ["fc1"], samples=8)  # doctest: +SKIP
        >>> stats["blocks.0.ffn.fc1"].sample().shape  # doctest: +SKIP
    """
    var = pipe.var
    groups = TokenGroups(var.cfg.patch_nums, "scale")
    gen = torch.Generator().manual_seed(seed)
    recorders, handles = {}, []
    for name, module in linear_layers(var, types).items():
        recorders[name] = _Recorder(module.weight.shape[1], groups, rows_per_group, gen)
        handles.append(module.register_forward_pre_hook(recorders[name]))
    if not recorders:  # nothing to record (every layer kept in 16 bit or filtered out): skip the generations
        return {}
    try:
        jobs = JobList(range(pipe.num_classes), samples=samples, seed=seed)
        for chunk in tqdm(jobs.chunks(batch_size), desc="calibration", disable=not progress):
            labels, seeds = jobs.batch(chunk)
            for rec in recorders.values():
                rec.batch = len(labels)
            pipe.generate(labels, seed=seeds, progress=False, **sampling)
    finally:
        for handle in handles:
            handle.remove()
    return {name: rec.stats() for name, rec in recorders.items()}
