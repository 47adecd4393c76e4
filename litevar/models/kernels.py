"""Optional fused CPU kernels, chosen by explicit capability checks with the plain PyTorch path as fallback."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn


@functools.cache
def onednn_bf16_linear_available() -> bool:
    """oneDNN (mkldnn) can run bf16 Linear with a fused pointwise epilogue on this CPU."""
    mkldnn = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported") and bool(mkldnn._is_mkldnn_bf16_supported()))


def fused_linear_gelu_tanh(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``gelu_tanh(linear(x))`` in one oneDNN call (saves a full pass over the 4C-wide activation), or None
    when not applicable: only a plain bf16 ``nn.Linear`` on CPU at inference (a replaced module, e.g. a
    quantized one, always runs through its own forward; so does a Linear with hooks, e.g. during calibration)."""
    if (type(linear) is not nn.Linear or linear._forward_pre_hooks or linear._forward_hooks
            or x.device.type != "cpu" or x.dtype != torch.bfloat16
            or linear.weight.dtype != torch.bfloat16 or torch.is_grad_enabled()
            or not onednn_bf16_linear_available()):
        return None
    return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "tanh")
