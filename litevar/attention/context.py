"""Per-forward state that attention processors read: passed explicitly, never global."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass
class AttnContext:
    """What a processor needs to know about the current forward pass.

    Args:
        attn_bias: additive mask [1, 1, L, L] for a teacher-forced pass (None when KV-cached).
        kv_caches: one cache per block for KV-cached sampling (None for a teacher-forced pass).
        scale_index: the scale being computed in KV-cached sampling.
        cfg_batch: B when rows are [conditional B; unconditional B] (classifier-free guidance), else None.
    """

    attn_bias: torch.Tensor | None = None
    kv_caches: list[KVCache] | None = None
    scale_index: int | None = None
    cfg_batch: int | None = None
