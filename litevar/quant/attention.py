"""LiteVAR's 8-bit attention, simulated: Q and K per (batch, head, token), V per (batch, head, channel), all
asymmetric with dynamic ranges, and the softmax output on the static grid [0, 1) with step 1/256.

The KV cache keeps full-precision keys and values (quantized on use, as in LiteVAR). There is no CPU kernel for
8-bit activation x activation matmuls in PyTorch, so this is fake quantization (quality only, not speed).
"""
from __future__ import annotations

import torch

from ..attention.context import AttnContext
from .primitives import QuantSpec, fake_quant

SOFTMAX_LEVELS = 256  # static softmax scale 1/256: probabilities in {0, 1/256, ..., 255/256}


class QuantAttnProcessor:
    """Dense attention with quantized QK^T and PV inputs (``bits`` for Q/K/V; the softmax grid is fixed).

    Example:
        >>> pipe.var.set_attn_processor(QuantAttnProcessor(8))  # doctest: +SKIP
    """

    def __init__(self, bits: int = 8) -> None:
        self.spec = QuantSpec(bits, False, "token")

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        q, k, v = attn.project_qkv(x_BLC)
        if ctx.kv_caches is not None:
            k, v = ctx.kv_caches[attn.block_idx].append(k, v)
        q, k = fake_quant(q.float(), self.spec), fake_quant(k.float(), self.spec)
        v = fake_quant(v.float().transpose(-1, -2), self.spec).transpose(-1, -2)  # per channel over tokens
        logits = q @ k.transpose(-1, -2) * attn.softmax_scale
        if ctx.attn_bias is not None:
            logits = logits + ctx.attn_bias
        probs = torch.softmax(logits, dim=-1)
        probs = torch.round(probs * SOFTMAX_LEVELS).clamp_(0, SOFTMAX_LEVELS - 1) / SOFTMAX_LEVELS
        return attn.project_out((probs @ v).to(x_BLC.dtype))
