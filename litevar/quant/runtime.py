"""Real integer execution of quantized Linears: W8A8 on int8 GEMM kernels, weight-only int8/int4.

CPU: oneDNN's int8 matmul (``torch.ops.onednn.qlinear_pointwise``, AMX-INT8 where the CPU has it) with a
per-call scalar activation scale: static ranges per token group (STWQ, or per tensor) fit it exactly, because a
KV-cached call covers one scale. Dynamic per-token activations run the GEMM with scale 1 and rescale rows
after. Elsewhere (CUDA, or no oneDNN) ``torch._int_mm`` computes the same integer products.
The fake-quant :class:`QuantLinear` with the same parameters is the oracle (tests compare them).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
import torch.nn as nn

from .kernels import quantize_static
from .modules import ActQuantizer, QuantLinear
from .primitives import QuantSpec, quantize_weight
from .weight_only import WeightOnlyInt4Linear, WeightOnlyInt8Linear


@functools.cache
def int8_dot_exact() -> bool:
    """The CPU has an exact 8-bit dot product for oneDNN (VNNI or AMX). x86 CPUs with AVX2 only run oneDNN's
    u8 x s8 kernels through ``vpmaddubsw``, which saturates pair sums at int16: measured here (AVX2 EPYC) as
    errors of ~20% of the output range in a few elements. Elsewhere than x86 this is not checked."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def conv_activation_bits() -> int:
    """Bits of the int8 convolutions' uint8 input grid: 8 where the 8-bit dot product is exact; 7 on x86 CPUs
    without one (AVX2's ``vpmaddubsw`` adds two u8 x s8 products in int16: with inputs up to 127 and weights in
    [-127, 127] the pair sum stays within 2 x 127 x 127 < 2^15, so oneDNN's kernel is exact: measured on an AVX2
    EPYC, where 8-bit inputs give wrong sums in almost every output)."""
    return 8 if int8_dot_exact() else 7


@functools.cache
def onednn_int8_available() -> bool:
    """oneDNN int8 Linear kernels exist in this PyTorch build and compute exactly on this CPU."""
    ops = torch.ops.onednn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "qlinear_pointwise")
            and hasattr(ops, "qlinear_prepack") and int8_dot_exact())


def check_int8_execution(config) -> None:
    """Refuse settings the integer kernels cannot run, saying what to change."""
    widths = {(config.w_bits, config.a_bits), *map(tuple, config.overrides.values())}
    bad = sorted(str(w) for w in widths if w not in ((8, 8), (8, None), (4, None)))
    if bad:
        raise ValueError(f"execution 'int8' runs W8A8, W8 and W4 weight-only only; got (w_bits, a_bits) {bad}: "
                         "simulate other widths with execution 'fake'")
    if config.w_bits == 8 and not config.w_symmetric:
        raise ValueError("execution 'int8' needs symmetric 8-bit weights (w_symmetric: true): the int8 kernels have "
                         "no weight zero point")
    if config.w_bits == 4 and (config.w_symmetric or config.w_group_size is None):
        raise ValueError("execution 'int8' runs 4-bit weights as asymmetric groups: set w_symmetric: false and "
                         "w_group_size (32, 64, 128 or 256)")
    if config.a_bits is not None and config.activations == "dynamic" and not config.a_symmetric:
        raise ValueError("execution 'int8' with dynamic activations needs a_symmetric: true (per-token zero points "
                         "have no int8 kernel here); static ranges may be asymmetric")
    if config.online_rotation:
        raise ValueError("the online Hadamard rotation has no integer kernel here; use execution 'fake'")
    if config.w_group_size is not None and config.a_bits is not None:
        raise ValueError("execution 'int8' with activations needs per-channel weights (w_group_size: null)")


def _quantize_per_token(x2d: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x2d.abs().amax(-1, keepdim=True).float().div_(spec.qmax).clamp_min_(1e-8)
    q = torch.round(x2d.float() / scale).clamp_(spec.qmin, spec.qmax).to(torch.int8)
    return q, scale


def _unsigned(q: torch.Tensor, zero: int) -> tuple[torch.Tensor, int]:
    """oneDNN runs signed activations on a reference path (~5 s vs 2 ms for 64 x 1024 x 4096): the same values
    shifted by 128 into uint8, with the zero point shifted too, take its fast (AMX / VNNI) path."""
    if q.dtype == torch.int8:
        return q.view(torch.uint8) ^ 128, zero + 128
    return q, zero


class Int8Linear(nn.Module):
    """W8A8 Linear on int8 kernels: symmetric per-output-channel int8 weights, int8/uint8 activations.

    Args:
        weight_int8: [N, K] int8. weight_scale: [N] float32. bias: [N] or None.
        act: the activation quantizer (static ranges per token group, or dynamic per token; symmetric dynamic).
        out_dtype: dtype of the output (the model's).

    Example:
        >>> ql = QuantLinear(torch.randn(8, 16), None, QuantSpec(8), ActQuantizer(QuantSpec(8, True, "token")))
        >>> Int8Linear.from_quant_linear(ql)(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act: ActQuantizer, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.act = act
        self.out_dtype = out_dtype
        self._packed: tuple | None = None
        self._qparams: tuple | None = None

    @classmethod
    def from_quant_linear(cls, ql: QuantLinear) -> "Int8Linear":
        if ql.rotate or ql.in_shift is not None or ql.in_scale is not None:
            raise ValueError("an online input transform has no int8 kernel; fold it first")
        spec = QuantSpec(8, True, "channel")
        q, scale, _ = quantize_weight(ql.weight.detach().float(), spec)
        return cls(q.to(torch.int8), scale.flatten(), ql.bias, ql.act, ql.weight.dtype)

    def weight_nbytes(self) -> int:
        return self.weight_int8.numel() + self.weight_scale.numel() * 4

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor: it has no storage)."""
        return {**self.__dict__, "_packed": None}

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = self._qparams = None  # derived from the old weights / ranges
        super()._load_from_state_dict(*args, **kwargs)

    def _packed_weight(self, device: torch.device):
        if self._packed is None or self._packed[0] != device:
            packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
            self._packed = (device, packed, torch.zeros(self.out_features, dtype=torch.int64, device=device))
        return self._packed[1], self._packed[2]

    def _gemm(self, q: torch.Tensor, x_scale: float, x_zero: int, bias, out_dtype) -> torch.Tensor:
        """``((q - x_zero) * x_scale) @ (W_int8 * w_scale)^T + bias`` with integer products."""
        if q.device.type == "cpu" and onednn_int8_available():
            q, x_zero = _unsigned(q, x_zero)
            packed, w_zero = self._packed_weight(q.device)
            return torch.ops.onednn.qlinear_pointwise(q, x_scale, x_zero, packed, self.weight_scale, w_zero, bias,
                                                      1.0, 0, out_dtype, "none", [], "")
        if q.dtype == torch.int8:
            deq = torch._int_mm(q, self.weight_int8.t()).float()
        else:  # uint8 with a zero point has no integer kernel here: exact float emulation
            deq = (q.float() - x_zero) @ self.weight_int8.float().t()
        out = deq * (x_scale * self.weight_scale)
        return (out if bias is None else out + bias).to(out_dtype)

    def _cached_qparams(self) -> tuple[list[float], list[int], torch.Tensor, torch.Tensor]:
        """Per-group (scales, zero points) as Python numbers and as tensors; fixed after calibration, so computed
        once rather than per call."""
        if self._qparams is None:
            scale, zero = self.act.qparams()
            self._qparams = (scale.tolist(), [int(z) for z in zero.tolist()], scale, zero.float())
        return self._qparams

    def _static_params(self, tokens: int | None) -> tuple[float, int] | None:
        """This call's (scale, zero point), or None when it spans several token groups."""
        group = 0 if tokens is None else self.act.groups.call_group(tokens)
        if group is None:
            return None
        scales, zeros, _, _ = self._cached_qparams()
        return scales[group], zeros[group]

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int] | None:
        """``(q [M, K], scale, zero)`` for a static call (an integer ``x`` is already on this layer's grid)."""
        params = self._static_params(x.shape[-2] if x.dim() >= 3 else None)
        if params is None:
            return None
        if x.dtype in (torch.int8, torch.uint8):
            return x.reshape(-1, self.in_features), *params
        return quantize_static(x.reshape(-1, self.in_features), *params, self.act.spec), *params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.act.static:
            quantized = self._quantized_input(x)
            if quantized is None:  # a call spanning several token groups (teacher forcing): one GEMM per group
                return self._per_group(x)
            out = self._gemm(*quantized, self.bias, self.out_dtype)
        else:
            q, row_scale = _quantize_per_token(x.reshape(-1, self.in_features), self.act.spec)
            acc = self._gemm(q, 1.0, 0, None, torch.float32)
            out = acc.mul_(row_scale)
            out = (out if self.bias is None else out.add_(self.bias)).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def gelu_into(self, x: torch.Tensor, nxt: "Int8Linear") -> torch.Tensor | None:
        """``nxt(gelu_tanh(self(x)))`` with GELU and ``nxt``'s input quantization fused into this GEMM's epilogue
        (the 4x-wide hidden activation is written once, as 8-bit), or None where that does not apply."""
        if not (x.device.type == "cpu" and onednn_int8_available() and x.dim() >= 3
                and self.act.static and isinstance(nxt, Int8Linear) and nxt.act.static):
            return None
        mine, theirs = self._quantized_input(x), nxt._static_params(x.shape[-2])
        if mine is None or theirs is None:
            return None
        q, scale, zero = mine
        q, zero = _unsigned(q, zero)
        # nxt's input as uint8 even on a symmetric grid (zero point + 128), so nxt's GEMM needs no shift pass
        out_scale, out_zero = theirs[0], theirs[1] + (128 if nxt.act.spec.symmetric else 0)
        packed, w_zero = self._packed_weight(x.device)
        hidden = torch.ops.onednn.qlinear_pointwise(q, scale, zero, packed, self.weight_scale, w_zero, self.bias,
                                                    out_scale, out_zero, torch.uint8, "gelu", [], "tanh")
        out = nxt._gemm(hidden, out_scale, out_zero, nxt.bias, nxt.out_dtype)
        return out.reshape(*x.shape[:-1], nxt.out_features)

    def _per_group(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.act.groups.ids(x.shape[-2])
        out = x.new_empty(*x.shape[:-1], self.out_features)
        scales, zeros, _, _ = self._cached_qparams()
        for group in ids.unique().tolist():
            cols = (ids == group).nonzero().flatten()
            part = x[..., cols, :]
            s, z = scales[group], zeros[group]
            q = quantize_static(part.reshape(-1, self.in_features), s, z, self.act.spec)
            out[..., cols, :] = self._gemm(q, s, z, self.bias, x.dtype).reshape(*part.shape[:-1], self.out_features)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8, act {self.act.extra_repr()}"


def to_runtime(ql: QuantLinear) -> nn.Module:
    """The integer-kernel module computing what ``ql`` simulates (W8A8, or W8/W4 weight-only)."""
    if ql.act is None:
        linear = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None, dtype=ql.weight.dtype)
        linear.weight.data.copy_(ql.weight.data)
        if ql.bias is not None:
            linear.bias.data.copy_(ql.bias.data)
        if ql.w_spec is not None and ql.w_spec.bits == 4:
            return WeightOnlyInt4Linear.from_linear(linear, ql.w_spec.group_size or 128)
        return WeightOnlyInt8Linear.from_linear(linear)
    return Int8Linear.from_quant_linear(ql)
