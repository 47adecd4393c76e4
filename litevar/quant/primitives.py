"""Affine quantization as pure tensor functions: ranges -> (scale, zero point) -> integers -> floats.

Conventions: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x_hat = (q - zero_point) * scale``.
Symmetric grids are restricted (``-(2^(b-1)-1) .. 2^(b-1)-1``, zero point 0) so that they are sign-symmetric;
asymmetric grids are ``0 .. 2^b-1`` with an integer zero point that represents 0.0 exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "token", "group")
_EPS = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized.

    Args:
        bits: 2 to 8.
        symmetric: zero point 0 and a sign-symmetric grid, else an asymmetric grid with a zero point.
        granularity: "tensor" (one range), "channel" (one per row of a weight [N, K], i.e. per output channel),
            "token" (one per row of an activation [..., K]) or "group" (``group_size`` consecutive values of
            the last dimension).
        group_size: for "group" only.

    Example:
        >>> QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64).levels
        16
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError("group_size is required for granularity 'group' and only for it")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity != "group":
        return x
    if x.shape[-1] % spec.group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by group_size {spec.group_size}")
    return x.unflatten(-1, (x.shape[-1] // spec.group_size, spec.group_size))


def minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of ``x`` at the spec's granularity, shaped to broadcast against ``x`` (grouped view for "group")."""
    x = _grouped(x, spec).float()
    if spec.granularity == "tensor":
        lo, hi = torch.aminmax(x)
        return lo.view([1] * x.dim()), hi.view([1] * x.dim())
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    return lo, hi


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) float32 tensors mapping [lo, hi] onto the spec's integer grid (0 always representable)."""
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi).div(spec.qmax).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    scale = (hi - lo).div(spec.qmax - spec.qmin).clamp_min(_EPS)
    zero_point = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer grid values of ``x`` as float32 (``x`` grouped by the caller for "group")."""
    return torch.round(x.float() / scale + zero_point).clamp_(spec.qmin, spec.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero_point) * scale


def fake_quant(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None,
               hi: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x`` in its dtype; the range is ``x``'s own (dynamic) unless given (static).

    Example:
        >>> fake_quant(torch.tensor([[0.0, 0.4, 1.0]]), QuantSpec(bits=2, symmetric=False, granularity="token"))
        tensor([[0.0000, 0.3333, 1.0000]])
    """
    if lo is None or hi is None:
        lo, hi = minmax(x, spec)
    scale, zero_point = qparams(lo, hi, spec)
    grouped = _grouped(x, spec)
    out = dequantize(quantize(grouped, scale, zero_point, spec), scale, zero_point)
    return out.reshape(x.shape).to(x.dtype)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid values as float32, scale, zero_point) of a weight [N, K] at its min-max range.

    Example:
        >>> q, s, z = quantize_weight(torch.randn(4, 8), QuantSpec(bits=8))
        >>> q.shape, s.shape
        (torch.Size([4, 8]), torch.Size([4, 1]))
    """
    lo, hi = minmax(w, spec)
    scale, zero_point = qparams(lo, hi, spec)
    return quantize(_grouped(w, spec), scale, zero_point, spec).reshape(w.shape), scale, zero_point


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when equal)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
