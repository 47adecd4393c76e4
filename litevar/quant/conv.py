"""Int8 convolutions for the VQ-VAE decoder on oneDNN's integer kernel (AMX-INT8 where the CPU has it).

The input grid is 8-bit where the CPU has an exact 8-bit dot product and 7-bit (uint8 values 0..127) on x86 CPUs
with AVX2 only, where oneDNN's kernel is exact for such inputs (:func:`~litevar.quant.runtime.conv_activation_bits`).

:class:`Int8Conv2d` keeps symmetric per-output-channel int8 weights, one static asymmetric uint8 grid for its
input (calibrated, see :mod:`litevar.quant.decoder`), a float32 bias, and writes its output in the model dtype.
The input rounding is on the critical path (decoder activations are tens of MB per call): ATen's quantize first
makes a float32 copy of the whole input, so :func:`quantize_activation` runs it over cache-sized chunks (2-3x
faster; a compiled kernel would be 1.3-1.8x faster still, but costs 10-40 s of compiling in every new process).
Without oneDNN (another device, another build) the same integer arithmetic is emulated in float.
:meth:`Int8Conv2d.simulate` is the fake-quant oracle built from :mod:`litevar.quant.primitives` only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import quantize_static
from .primitives import QuantSpec, fake_quant, qparams, quantize_weight
from .runtime import conv_activation_bits

ACT_SPEC = QuantSpec(conv_activation_bits(), False, "tensor")
WEIGHT_SPEC = QuantSpec(8, True, "channel")
ROUND_CHUNK = 2 ** 18  # elements rounded per ATen call: a 1 MiB float32 copy, resident in L2


@functools.cache
def int8_conv_kernel_exact() -> bool:
    """oneDNN's int8 convolution gives the exact integer result on inputs spanning the decoder's input grid
    (:data:`ACT_SPEC`; with 8 bits their u8 x s8 pair sums overflow int16), measured: a
    32-channel 3x3 convolution of random grid values by random int8, against float64."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, ACT_SPEC.qmax + 1, (1, 32, 6, 6), dtype=torch.uint8, generator=gen)
    w = torch.randint(-127, 128, (16, 32, 3, 3), dtype=torch.int8, generator=gen)
    ones, zeros = torch.ones(16), torch.zeros(16, dtype=torch.int64)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    packed = torch.ops.onednn.qconv_prepack(w, ones, 1.0, 0, *geometry, None)
    out = torch.ops.onednn.qconv2d_pointwise(q, 1.0, 0, packed, ones, zeros, None, *geometry, 1.0, 0,
                                             torch.float32, "none", [], None)
    ref = F.conv2d(q.double(), w.double(), None, 1, 1)
    return bool((out.double() - ref).abs().max() == 0)  # |sums| < 2^24: exact in float32


@functools.cache
def onednn_int8_conv_available() -> bool:
    """oneDNN's int8 convolution (``onednn::qconv2d_pointwise``) exists in this PyTorch build and computes exactly
    on this CPU for inputs on :data:`ACT_SPEC`'s grid (checked once on a small convolution)."""
    ops = torch.ops.onednn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "qconv2d_pointwise")
            and hasattr(ops, "qconv_prepack") and int8_conv_kernel_exact())


def quantize_activation(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """``clamp(round(x / scale) + zero, 0, ACT_SPEC.qmax)`` as uint8 in ``x``'s memory format: ATen's quantize
    (:func:`~litevar.quant.kernels.quantize_static`, the grid of the int8 Linears too) over chunks of the memory.

    Example:
        >>> quantize_activation(torch.tensor([-1.0, 0.0, 2.0]), 3 / 255, 85)
        tensor([  0,  85, 255], dtype=torch.uint8)
    """
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last or x.is_contiguous()) or x.numel() <= ROUND_CHUNK:
        return quantize_static(x, scale, zero, ACT_SPEC)
    out = torch.empty_like(x, dtype=torch.uint8)
    src = (x.permute(0, 2, 3, 1) if channels_last else x).reshape(-1)  # views in memory order
    dst = (out.permute(0, 2, 3, 1) if channels_last else out).view(-1)
    for start in range(0, src.numel(), ROUND_CHUNK):
        dst[start:start + ROUND_CHUNK] = quantize_static(src[start:start + ROUND_CHUNK], scale, zero, ACT_SPEC)
    return out


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a convolution (numeric zero padding only).

    Example:
        >>> ConvGeometry.of(nn.Conv2d(8, 8, 3, padding=1)).padding
        (1, 1)
    """

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvGeometry":
        return cls(tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


class Int8Conv2d(nn.Module):
    """A Conv2d computed with integer products: uint8 input on a static grid, int8 weights per output channel.

    Args:
        weight_int8: [O, I/groups, kh, kw] int8. weight_scale: [O] float32. bias: [O] or None.
        input_range: [2] float32, the calibrated (min, max) of the input (0 is always on the grid).
        geometry: stride, padding, dilation and groups, as in the float convolution (zero padding only).
        out_dtype: the output dtype (the model's).

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, padding=1)
        >>> q = Int8Conv2d.from_conv(conv, -1.0, 2.0)
        >>> q(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 8, 8])
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 input_range: torch.Tensor, geometry: ConvGeometry, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_channels, self.in_channels = weight_int8.shape[0], weight_int8.shape[1] * geometry.groups
        self.kernel_size = tuple(weight_int8.shape[2:])
        self.stride, self.padding = tuple(geometry.stride), tuple(geometry.padding)
        self.dilation, self.groups = tuple(geometry.dilation), geometry.groups
        self.register_buffer("weight_int8", weight_int8.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.detach().float().flatten())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("input_range", torch.as_tensor(input_range, dtype=torch.float32).flatten())
        self.out_dtype = out_dtype
        self._packed: tuple | None = None
        self._qparams: tuple[float, int] | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, lo: float, hi: float) -> "Int8Conv2d":
        """Quantize ``conv``'s weights (symmetric int8 per output channel) for inputs calibrated to [lo, hi]."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"Int8Conv2d supports numeric zero padding only, got padding={conv.padding!r} "
                             f"padding_mode={conv.padding_mode!r}")
        weight = conv.weight.detach().float()
        q, scale, _ = quantize_weight(weight.flatten(1), WEIGHT_SPEC)
        return cls(q.reshape(weight.shape).to(torch.int8), scale.flatten(), conv.bias, torch.tensor([lo, hi]),
                   ConvGeometry.of(conv), conv.weight.dtype)

    def weight_nbytes(self) -> int:
        return self.weight_int8.numel() + self.weight_scale.numel() * 4

    def input_qparams(self) -> tuple[float, int]:
        """The input grid (scale, zero point), fixed after calibration: computed once, not per call."""
        if self._qparams is None:
            scale, zero = qparams(self.input_range[0], self.input_range[1], ACT_SPEC)
            self._qparams = (float(scale), int(zero))
        return self._qparams

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this layer's input grid (uint8); :meth:`forward` takes it as is."""
        return quantize_activation(x, *self.input_qparams())

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = self._qparams = None  # derived from the old weights / range
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (an opaque oneDNN tensor: it has no storage)."""
        return {**self.__dict__, "_packed": None}

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` changes the output dtype; scales, range and bias stay float32 (the kernel's)."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.weight_scale.device))
        if probe.dtype.is_floating_point:
            self.out_dtype = probe.dtype
        for name in ("weight_scale", "bias", "input_range"):
            value = getattr(self, name)
            if value is not None and value.dtype != torch.float32:
                setattr(self, name, value.float())
        self._packed = None
        return self

    def _conv_args(self) -> tuple:
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def _packed_weight(self, device: torch.device):
        if self._packed is None or self._packed[0] != device:
            scale, zero = self.input_qparams()
            packed = torch.ops.onednn.qconv_prepack(self.weight_int8, self.weight_scale, scale, zero,
                                                    *self._conv_args(), None)
            self._packed = (device, packed, torch.zeros(self.out_channels, dtype=torch.int64, device=device))
        return self._packed[1], self._packed[2]

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale.view(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x if x.dtype == torch.uint8 else self.quantize(x)
        scale, zero = self.input_qparams()
        if q.device.type == "cpu" and onednn_int8_conv_available():
            packed, w_zero = self._packed_weight(q.device)
            return torch.ops.onednn.qconv2d_pointwise(q, scale, zero, packed, self.weight_scale, w_zero, self.bias,
                                                      *self._conv_args(), 1.0, 0, self.out_dtype, "none", [], None)
        # no integer kernel here: the same products in float32 (exact up to float rounding)
        out = F.conv2d((q.float() - zero) * scale, self.dequantized_weight(), self.bias, *self._conv_args())
        return out.to(self.out_dtype)

    def simulate(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quant oracle: float32 convolution of the fake-quantized input and the dequantized weight."""
        x_hat = fake_quant(x.float(), ACT_SPEC, self.input_range[0], self.input_range[1])
        return F.conv2d(x_hat, self.dequantized_weight(), self.bias, *self._conv_args()).to(self.out_dtype)

    def extra_repr(self) -> str:
        lo, hi = self.input_range.tolist()
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, W8A8, input range [{lo:.4g}, {hi:.4g}]")


class Int8Upsample2x(nn.Module):
    """Nearest 2x upsampling followed by an :class:`Int8Conv2d`, rounding the input before upsampling.

    Nearest upsampling copies values, so rounding first gives the same uint8 tensor from a quarter of the work
    (and a uint8 upsample instead of a bf16 one). Same state-dict keys as the float ``Upsample2x``.

    Example:
        >>> up = Int8Upsample2x(Int8Conv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), -1.0, 1.0))
        >>> up(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 8, 8, 8])
    """

    def __init__(self, conv: Int8Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        q = self.conv.quantize(x_BChw)
        return self.conv(F.interpolate(q, scale_factor=2, mode="nearest"))
