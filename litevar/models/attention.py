"""VAR self-attention: the weights and a processor slot; the processor decides what is computed."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.context import AttnContext
from ..attention.dense import DenseAttnProcessor

MAX_LOG_SCALE = math.log(100)


class SelfAttention(nn.Module):
    """Multi-head attention with the released key layout.

    ``mat_qkv`` has no bias of its own; the bias is ``cat(q_bias, zero_k_bias, v_bias)``. It is called as a
    module so that replacing it (e.g. by a quantized Linear) takes effect. With ``l2_norm`` q and k are
    l2-normalised and q is scaled per head by ``exp(min(scale_mul_1H11, log 100))``.
    """

    def __init__(self, block_idx: int, width: int, heads: int, l2_norm: bool = True) -> None:
        super().__init__()
        self.block_idx = block_idx
        self.heads = heads
        self.head_dim = width // heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.softmax_scale = 1.0 if l2_norm else 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.processor = DenseAttnProcessor()

    def set_processor(self, processor) -> None:
        self.processor = processor

    def project_qkv(self, x_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, H, L, head_dim], with the l2 normalisation and per-head q scale applied."""
        B, L, C = x_BLC.shape
        qkv = self.mat_qkv(x_BLC) + torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = qkv.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_LOG_SCALE).exp())
            k = F.normalize(k, dim=-1)
        return q, k, v

    def project_out(self, out_BHLc: torch.Tensor) -> torch.Tensor:
        B, H, L, c = out_BHLc.shape
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, H * c))

    def forward(self, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.processor(self, x_BLC, ctx)
