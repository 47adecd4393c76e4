"""Token groups for static activation quantization (PTQ4ARVG's STWQ).

VAR's sequence has a fixed length and its activation ranges depend on the position's scale, not on the sample,
so static parameters per group of positions can be calibrated offline. A call sees either one scale
(KV-cached sampling: ``pn^2`` tokens) or the whole sequence (teacher forcing); the number of tokens tells which.
"""
from __future__ import annotations

import torch

from ..attention.token_subset import subset_scale

GROUPINGS = ("tensor", "first", "scale")


class TokenGroups:
    """Group id of every position of a VAR pyramid.

    Args:
        patch_nums: the token pyramid.
        kind: "tensor" (one group), "first" (token 0 vs the rest: 2 groups) or "scale" (one group per scale;
            the first scale is token 0).

    Example:
        >>> groups = TokenGroups((1, 2, 3), "scale")
        >>> groups.ids(4).tolist(), groups.ids(14)[:6].tolist()
        ([1, 1, 1, 1], [0, 1, 1, 1, 1, 2])
    """

    def __init__(self, patch_nums: tuple[int, ...], kind: str) -> None:
        if kind not in GROUPINGS:
            raise ValueError(f"token grouping must be one of {GROUPINGS}, got {kind!r}")
        self.kind = kind
        self.patch_nums = tuple(patch_nums)
        scale_of_pos = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)])
        self.seq_len = scale_of_pos.numel()
        if kind == "tensor":
            self.group_of_pos = torch.zeros_like(scale_of_pos)
        elif kind == "first":
            self.group_of_pos = (torch.arange(self.seq_len) > 0).long()
        else:
            self.group_of_pos = scale_of_pos
        self.n_groups = int(self.group_of_pos.max()) + 1
        self._begin = {}
        self._scale_begin = []
        begin = 0
        for p in self.patch_nums:
            self._begin[p * p] = begin
            self._scale_begin.append(begin)
            begin += p * p

    def ids(self, tokens: int) -> torch.Tensor:
        """Group ids [tokens] of a call over ``tokens`` positions (one scale, or the whole sequence; inside
        :func:`~litevar.attention.token_subset.tokens_of_scale`, some tokens of that scale)."""
        subset_of = subset_scale()
        if subset_of is not None:  # a pruned scale never holds position 0 (scale 0 is never pruned)
            return self.group_of_pos[self._scale_begin[subset_of]].expand(tokens)
        if tokens == self.seq_len:
            return self.group_of_pos
        if tokens in self._begin:
            begin = self._begin[tokens]
            return self.group_of_pos[begin:begin + tokens]
        if self.kind == "tensor":
            return self.group_of_pos.new_zeros(tokens)
        raise ValueError(f"a call over {tokens} tokens matches no scale of the pyramid {self.patch_nums} "
                         f"(nor the whole sequence of {self.seq_len}); static token groups need VAR's token layout")

    def call_group(self, tokens: int) -> int | None:
        """The single group of a call, or None when it spans several (teacher forcing)."""
        ids = self.ids(tokens)
        first = int(ids[0])
        return first if bool((ids == first).all()) else None
