"""The dense attention processor: exactly the released model's attention (the oracle)."""
from __future__ import annotations

import torch

from .dispatch import sdpa
from .context import AttnContext


class DenseAttnProcessor:
    """Full attention over every cached and current token (block-causal mask when teacher-forced)."""

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        q, k, v = attn.project_qkv(x_BLC)
        if ctx.kv_caches is not None:
            k, v = ctx.kv_caches[attn.block_idx].append(k, v)
        out_BHLc = sdpa(q, k, v, attn.softmax_scale, ctx.attn_bias)
        return attn.project_out(out_BHLc)
