"""A KV cache that holds at most a budget of keys per head group and frees the rest (KV-cache compression).

Heads are split into groups (HACK: structural and contextual heads; one group for the other policies), each with
its own token budget and its own rectangular storage ``[rows, heads of the group, budget, head_dim]`` allocated at
that budget, never at the whole pyramid. At every scale the new keys/values are attended together with the kept
history (a transient concatenation, one layer at a time); then, except at the last scale (whose keys no later
scale reads, so they are never stored), a policy scores the candidates with the real attention probabilities of
observation queries and keeps the best ``budget`` per (row, head). Kept keys keep their original positions, so
position rules (first scales, newest scale) and window plans can be applied to them.

The policy object decides; this module only stores, scores and gathers (see :mod:`litevar.kvcompress`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import Int8KVCache, KVCache


@dataclass
class Candidates:
    """What one head group attends to at this scale: kept history then the new scale.

    Attributes:
        heads: long [g], the model's head indices of the group.
        k, v: [rows, g, n, head_dim] keys/values (history then new tokens).
        positions: long [rows, g, n] original token positions.
    """

    heads: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor


@dataclass
class SelectionContext:
    """What a policy sees when it selects the keys of one head group for the next scale.

    Attributes:
        layer, scale, group: where the selection happens (group: index in the layer's groups).
        scores: float32 [rows, g, n] attention mass of the observation queries on each candidate.
        positions: long [rows, g, n] original positions; scale_of: long [seq_len] scale id per position.
        budget: keys to keep per (row, head).
        history: float32 [rows, g, n] scores accumulated over earlier scales for kept keys (0 for new ones).
    """

    layer: int
    scale: int
    group: int
    scores: torch.Tensor
    positions: torch.Tensor
    scale_of: torch.Tensor
    budget: int
    history: torch.Tensor


def head_index(heads: torch.Tensor) -> slice | torch.Tensor:
    """A slice when ``heads`` is a contiguous range (indexing then gives views, not copies), else ``heads``."""
    first = int(heads[0]) if heads.numel() else 0
    if torch.equal(heads.cpu(), torch.arange(first, first + heads.numel())):
        return slice(first, first + heads.numel())
    return heads


def merged_values(cand: Candidates, index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of the kept candidates ``index`` with every evicted value merged into the kept slot of its most
    similar key (cosine), averaged with weights ``weight`` [rows, g, n] (cumulative attention); and each slot's
    summed weight."""
    rows, g, n, d = cand.v.shape
    kept = index.shape[2]
    keys = torch.nn.functional.normalize(cand.k.float(), dim=-1)
    kept_keys = keys.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    target = (keys @ kept_keys.transpose(-1, -2)).argmax(dim=-1)
    target.scatter_(2, index, torch.arange(kept, device=index.device).expand_as(index))  # kept keys: their own slot
    w = weight.float().clamp_min(1e-6).unsqueeze(-1)
    slots = target.unsqueeze(-1)
    num = torch.zeros(rows, g, kept, d, device=cand.v.device).scatter_add_(2, slots.expand(-1, -1, -1, d),
                                                                           w * cand.v.float())
    den = torch.zeros(rows, g, kept, 1, device=cand.v.device).scatter_add_(2, slots, w)
    return (num / den).to(cand.v.dtype), den.squeeze(-1)


class CompressedKVCache:
    """KV cache of one layer with per-head-group budgets.

    Args:
        rows: batch rows (both CFG halves). heads: attention heads. head_dim, dtype, device: as for KVCache.
        groups: ``[(head indices, budget), ...]`` covering every head once.
        policy: object with ``select(ctx: SelectionContext) -> long [rows, g, budget]`` indices into the
            candidates, ``observation(n_queries, device) -> long index`` of the observation queries,
            ``merges(ctx) -> bool`` (evicted values merged into the kept ones, see :func:`merged_values`) and
            ``shared_rows`` (True: the conditional rows' selection is used for both CFG halves).
        layer: this cache's layer. patch_nums: the pyramid (positions -> scales; the last scale is not stored).
        storage: "model" or "int8" (int8 keys/values, their per-token scales kept with them).
    """

    def __init__(self, rows: int, heads: int, head_dim: int, dtype: torch.dtype, device, groups, policy,
                 layer: int, patch_nums, storage: str = "model") -> None:
        covered = torch.cat([torch.as_tensor(h) for h, _ in groups]).sort().values
        if not torch.equal(covered, torch.arange(heads)):
            raise ValueError(f"the head groups must cover heads 0..{heads - 1} once each, got {covered.tolist()}")
        sizes = [p * p for p in patch_nums]
        stored = sum(sizes[:-1])  # the last scale is attended, never stored
        storage_cls = Int8KVCache if storage == "int8" else KVCache
        self.groups = []
        for heads_g, budget in groups:
            heads_g = torch.as_tensor(heads_g, dtype=torch.long)
            if budget < 1:
                raise ValueError(f"a head group's budget must be >= 1 token, got {budget}")
            cap = min(int(budget), stored)
            self.groups.append({"heads": heads_g.to(device), "index": head_index(heads_g), "budget": cap,
                                "store": storage_cls(rows, len(heads_g), cap, head_dim, dtype, device),
                                "positions": torch.zeros(rows, len(heads_g), cap, dtype=torch.int32, device=device),
                                "history": torch.zeros(rows, len(heads_g), cap, dtype=torch.float32, device=device)})
        self.policy = policy
        self.layer = layer
        self.scale_of = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(sizes)]).to(device)
        self.begins = [sum(sizes[:s]) for s in range(len(sizes))]
        self.last_scale = len(sizes) - 1

    def candidates(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, scale: int, rows: int) -> list[Candidates]:
        """The keys/values each group attends to at ``scale``: its kept history and the new tokens (first
        ``rows`` rows only, as with CFG output sharing)."""
        n = k_BHlc.shape[2]
        new_pos = torch.arange(self.begins[scale], self.begins[scale] + n, device=k_BHlc.device)
        out = []
        for group in self.groups:
            heads, store = group["heads"], group["store"]
            k_new, v_new = k_BHlc[:, group["index"]], v_BHlc[:, group["index"]]
            pos_new = new_pos.view(1, 1, n).expand(rows, len(heads), n)
            if store.length:
                k_old, v_old = store._read(slice(0, rows), store.length)
                k_all, v_all = torch.cat((k_old, k_new), dim=2), torch.cat((v_old, v_new), dim=2)
                pos_all = torch.cat((group["positions"][:rows, :, :store.length].long(), pos_new), dim=2)
            else:
                k_all, v_all, pos_all = k_new, v_new, pos_new
            out.append(Candidates(heads, k_all, v_all, pos_all))
        return out

    @torch.no_grad()
    def commit(self, scale: int, q_BHlc: torch.Tensor, softmax_scale: float, cands: list[Candidates]) -> None:
        """Keep the best ``budget`` candidates of each group for the next scale (nothing is stored after the last
        scale). Scores: softmax probabilities of the policy's observation queries over all candidates."""
        if scale == self.last_scale:
            return
        obs = self.policy.observation(q_BHlc.shape[2], q_BHlc.device)
        for g, (group, cand) in enumerate(zip(self.groups, cands)):
            rows, n = cand.k.shape[0], cand.k.shape[2]
            store = group["store"]
            old = store.length
            history = torch.zeros(rows, len(cand.heads), n, device=cand.k.device)
            history[:, :, :old] = group["history"][:rows, :, :old]
            merge = False
            if n <= group["budget"]:
                index = torch.arange(n, device=cand.k.device).view(1, 1, n).expand(rows, len(cand.heads), n)
            else:
                q_obs = q_BHlc[:rows, group["index"]][:, :, obs].float()
                probs = (q_obs @ cand.k.float().transpose(-1, -2) * softmax_scale).softmax(dim=-1)
                scores = probs.sum(dim=2)
                ctx = SelectionContext(self.layer, scale, g, scores, cand.positions, self.scale_of,
                                       group["budget"], history + scores)
                index = self.policy.select(ctx)
                if self.policy.shared_rows and rows % 2 == 0:  # the conditional rows decide for both halves
                    half = rows // 2
                    index = torch.cat((index[:half], index[:half]))
                history = history + scores
                merge = self.policy.merges(ctx)
            self._store(group, cand, index, history, merge)

    def _store(self, group: dict, cand: Candidates, index: torch.Tensor, history: torch.Tensor, merge: bool) -> None:
        rows, kept = index.shape[0], index.shape[2]
        gather = index.unsqueeze(-1).expand(-1, -1, -1, cand.k.shape[-1])
        k_kept = cand.k.gather(2, gather)
        if merge:
            v_kept, kept_history = merged_values(cand, index, history)
        else:
            v_kept, kept_history = cand.v.gather(2, gather), history.gather(2, index)
        store = group["store"]
        store.length = 0
        store.append_rows(k_kept, v_kept, rows) if rows < store.k.shape[0] else store.append(k_kept, v_kept)
        group["positions"][:rows, :, :kept] = cand.positions.gather(2, index).to(torch.int32)
        group["history"][:rows, :, :kept] = kept_history

    def nbytes(self) -> int:
        """Bytes of the keys/values held now."""
        return sum(group["store"].nbytes() for group in self.groups)

    def reserved_bytes(self) -> int:
        """Bytes allocated: keys/values at each group's budget, with the kept keys' positions and scores."""
        extra = sum(g["positions"].numel() * 4 + g["history"].numel() * 4 for g in self.groups)
        return sum(group["store"].reserved_bytes() for group in self.groups) + extra
