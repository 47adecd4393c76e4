"""Token sampling from guided logits: top-k, top-p, multinomial, and the Gumbel "more smooth" features.

The random draws happen in upstream order on the given generator(s), so a seed gives upstream's tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Rng = torch.Generator | Sequence[torch.Generator] | None


def _filter_sorted_top_k_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> bool:
    """Top-k then top-p using only the k sorted survivors instead of sorting the whole vocabulary.

    Upstream sorts all V logits ascending; after top-k the -inf entries come first and add exact zeros to
    the cumulative sum, so the nucleus is decided by the k survivors in ascending order alone. Returns
    False (nothing changed) when a row has ties at the k-th value, where more than k entries survive.
    """
    vals_Blk, idx_Blk = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=True)
    survivors = (logits_BlV >= vals_Blk[..., -1:]).sum(dim=-1)
    if not bool((survivors == top_k).all()):
        return False
    ascending = vals_Blk.flip(-1)
    remove = ascending.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    logits_BlV.fill_(-torch.inf).scatter_(-1, idx_Blk.flip(-1), ascending.masked_fill_(remove, -torch.inf))
    return True


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k (ties kept) and outside the top-p nucleus to -inf, in place."""
    if 0 < top_k < logits_BlV.shape[-1] and top_p > 0 and _filter_sorted_top_k_(logits_BlV, top_k, top_p):
        return logits_BlV
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, logits_BlV.shape[-1]), dim=-1, largest=True, sorted=False)[0]
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1.amin(dim=-1, keepdim=True), -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        remove_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        logits_BlV.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -torch.inf)
    return logits_BlV


def _per_row(rng: Rng, rows: int) -> list[torch.Generator] | None:
    if rng is None or isinstance(rng, torch.Generator):
        return None
    if len(rng) != rows:
        raise ValueError(f"got {len(rng)} generators for {rows} rows")
    return list(rng)


def multinomial_rows(probs_BlV: torch.Tensor, rng: Rng) -> torch.Tensor:
    """One token per position [B, l]; a single generator draws rows in order (upstream), a list one per row."""
    B, l, V = probs_BlV.shape
    per_row = _per_row(rng, B)
    if per_row is None:
        return torch.multinomial(probs_BlV.view(-1, V), 1, replacement=True, generator=rng).view(B, l)
    return torch.stack([torch.multinomial(probs_BlV[b], 1, replacement=True, generator=g).view(l)
                        for b, g in enumerate(per_row)])


def _exponential_like(x_BlV: torch.Tensor, rng: Rng) -> torch.Tensor:
    per_row = _per_row(rng, x_BlV.shape[0])
    if per_row is None:
        return torch.empty_like(x_BlV).exponential_(generator=rng)
    return torch.stack([torch.empty_like(x_BlV[b]).exponential_(generator=g) for b, g in enumerate(per_row)])


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float, rng: Rng, smooth_ratio: float | None = None,
                  codebook_VC: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample token indices [B, l] from float32 guided logits (modified in place).

    With ``smooth_ratio`` (the scale's k/(K-1)), also return upstream's "more smooth" token features
    [B, l, C]: a Gumbel softmax of the filtered logits times ``1 + ratio`` at temperature
    ``max(0.27 (1 - 0.95 ratio), 0.005)``, mixed over the codebook. Its noise is drawn after the multinomial.
    """
    filter_top_k_top_p_(logits_BlV, top_k, top_p)
    idx_Bl = multinomial_rows(logits_BlV.softmax(dim=-1), rng)
    if smooth_ratio is None:
        return idx_Bl, None
    tau = max(0.27 * (1 - smooth_ratio * 0.95), 0.005)
    gumbels = -_exponential_like(logits_BlV, rng).log()
    soft_BlV = ((logits_BlV.mul(1 + smooth_ratio) + gumbels) / tau).softmax(dim=-1)
    return idx_Bl, soft_BlV @ codebook_VC.unsqueeze(0)
