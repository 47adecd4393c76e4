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


class OneDNNGeluFFN(nn.Module):
    """The FFN with fc1 and the tanh GELU in one oneDNN call where :func:`fused_linear_gelu_tanh` applies (plain
    bf16 Linears on CPU at inference), the plain computation elsewhere. Same children and keys as the FFN."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = ffn.fc1, ffn.fc2

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        h_BLH = fused_linear_gelu_tanh(self.fc1, x_BLC)
        if h_BLH is None:
            h_BLH = torch.nn.functional.gelu(self.fc1(x_BLC), approximate="tanh")
        return self.fc2(h_BLH)


def install_inference_fusions(var: nn.Module) -> None:
    """Replace each block's plain FFN by :class:`OneDNNGeluFFN` (an exact fast path; a no-op where the fused call
    does not apply). Called by the pipeline for inference; quantization installs its own fused FFN over it."""
    from .var import FFN

    for block in var.blocks:
        if type(block.ffn) is FFN:
            block.ffn = OneDNNGeluFFN(block.ffn)
