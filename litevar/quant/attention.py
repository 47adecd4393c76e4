"""LiteVAR's 8-bit attention, simulated: Q and K per (batch, head, token), V per (batch, head, channel), all
asymmetric with dynamic ranges, and the softmax output on the static grid [0, 1) with step 1/256.

It is the ``precision`` component of a model's attention (:mod:`litevar.attention.components`): the one
attention processor quantizes q/k/v after the KV cache (which keeps its own storage: quantized on use, as in
LiteVAR) and the probabilities inside whichever kernel computes them, so it composes with window plans (the
gathered kernel computes only kept pairs) and CFG sharing. There is no CPU kernel for 8-bit activation x
activation matmuls in PyTorch, so this is fake quantization (quality only, not speed).
"""
from __future__ import annotations

import torch

from .primitives import QuantSpec, fake_quant

SOFTMAX_LEVELS = 256  # static softmax scale 1/256: probabilities in {0, 1/256, ..., 255/256}


class AttnPrecision:
    """Quantized QK^T and PV inputs (``bits`` for Q/K/V; the softmax grid is fixed).

    Example:
        >>> p = AttnPrecision(8)
        >>> float(p.quantize_probs(torch.tensor([0.5, 0.0012])).mul(SOFTMAX_LEVELS)[1])
        0.0
    """

    def __init__(self, bits: int = 8) -> None:
        self.bits = bits
        self.spec = QuantSpec(bits, False, "token")

    def quantize_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """float32 fake-quantized q, k (per token) and v (per channel over tokens)."""
        q, k = fake_quant(q.float(), self.spec), fake_quant(k.float(), self.spec)
        v = fake_quant(v.float().transpose(-1, -2), self.spec).transpose(-1, -2)
        return q, k, v

    @staticmethod
    def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
        return torch.round(probs * SOFTMAX_LEVELS).clamp_(0, SOFTMAX_LEVELS - 1) / SOFTMAX_LEVELS
