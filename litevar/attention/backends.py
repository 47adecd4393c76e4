"""Which kernel computes attention. Dense SDPA is the oracle every other backend is checked against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
         attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with PyTorch's fused kernel (flash path when there is no mask)."""
    if attn_bias is not None and attn_bias.dtype != q_BHLc.dtype:
        attn_bias = attn_bias.to(q_BHLc.dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=scale)
