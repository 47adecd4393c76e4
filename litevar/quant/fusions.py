"""Transforms that quantization applies to the model's structure: AdaLN folds and fused int8 fast paths.

- :func:`fold_adaln_input`: make an AdaLN's output ``(X - shift) / scale`` by editing the modulation Linear's
  rows and the norm's ``unit`` (used by SmoothQuant, GPS, OS+ folding).
- :func:`install_int8_fusions`: where a block's Linears run on int8 kernels with static ranges, replace the
  norm before ``mat_qkv``/``fc1`` by :class:`QuantizingNorm` (LayerNorm, modulation and quantization in one
  kernel, writing the 8-bit input) and the FFN by :class:`Int8GeluFFN` (GELU and fc2's input quantization in
  fc1's GEMM epilogue). Both fall back to the plain computation where their kernel does not apply.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.var import FFN, ModulatedNorm
from .kernels import adaln_quantize
from .layers import branch_norms
from .runtime import Int8Linear, onednn_int8_available


@torch.no_grad()
def fold_adaln_input(norm: ModulatedNorm, ada_lin: nn.Linear, rows: tuple[int, int], shift: torch.Tensor,
                     scale: torch.Tensor) -> None:
    """``LN(x) * (unit + s) + b  ->  LN(x) * (unit + s) / scale + (b - shift) / scale`` by editing the rows of the
    modulation Linear that produce ``s`` (chunk ``rows[0]``) and ``b`` (chunk ``rows[1]``)."""
    C = norm.width
    weight, bias = ada_lin.weight, ada_lin.bias
    scale32, shift32 = scale.float().to(weight.device), shift.float().to(weight.device)
    for chunk, subtract in ((rows[0], None), (rows[1], shift32)):
        r = slice(chunk * C, (chunk + 1) * C)
        weight[r] = (weight[r].float() / scale32[:, None]).to(weight.dtype)
        b = bias[r].float() if subtract is None else bias[r].float() - subtract
        bias[r] = (b / scale32).to(bias.dtype)
    unit32 = torch.ones(C, device=weight.device) if norm.unit is None else norm.unit.float()
    norm.unit = (unit32 / scale32).to(weight.dtype)


class QuantizingNorm(ModulatedNorm):
    """A :class:`ModulatedNorm` whose output, where its consumer is a static int8 Linear on oneDNN, is that
    Linear's 8-bit input from one fused kernel (the consumer's forward takes integer inputs as they are)."""

    def __init__(self, norm: ModulatedNorm, consumer: Int8Linear) -> None:
        super().__init__(norm.width, norm.eps)
        self.unit = norm.unit
        self.__dict__["consumer"] = consumer  # not a child: its state belongs to the Linear

    def forward(self, x_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        consumer = self.consumer
        if x_BLC.dim() == 3 and x_BLC.device.type == "cpu":
            group = consumer.act.groups.call_group(x_BLC.shape[-2])
            if group is not None:
                _, _, scales, zeros = consumer._cached_qparams()
                q = adaln_quantize(x_BLC, self.scale_unit(scale), shift, scales[group], zeros[group],
                                   consumer.act.spec, self.eps)
                if q is not None:
                    return q
        return super().forward(x_BLC, scale, shift)


class Int8GeluFFN(FFN):
    """The FFN with GELU and fc2's input quantization fused into fc1's int8 GEMM (teacher forcing, which spans
    several token groups, runs unfused)."""

    def __init__(self, ffn: nn.Module) -> None:
        nn.Module.__init__(self)
        self.fc1, self.fc2 = ffn.fc1, ffn.fc2

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        out = self.fc1.gelu_into(x_BLC, self.fc2)
        return out if out is not None else super().forward(x_BLC)


def _static_int8(module) -> bool:
    return isinstance(module, Int8Linear) and module.act.static


def install_int8_fusions(var: nn.Module) -> int:
    """Install the fused int8 paths where they apply (oneDNN int8 kernels present, static ranges); the count."""
    if not onednn_int8_available():
        return 0
    installed = 0
    for block in var.blocks:
        norms = branch_norms(block)
        for name, consumer in ((norms["attn"][0], block.attn.mat_qkv), (norms["ffn"][0], block.ffn.fc1)):
            norm = getattr(block, name)
            if _static_int8(consumer) and type(norm) is ModulatedNorm:
                setattr(block, name, QuantizingNorm(norm, consumer))
                installed += 1
        if _static_int8(block.ffn.fc1) and _static_int8(block.ffn.fc2) and not isinstance(block.ffn, Int8GeluFFN):
            block.ffn = Int8GeluFFN(block.ffn)
            installed += 1
    return installed
