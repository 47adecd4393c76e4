"""Fake-quant modules (simulation at any bit width): the activation quantizer and the quantized Linear.

These compute in floating point on values restricted to the integer grid, so their output is what an integer
kernel with the same parameters computes (up to float rounding); the runtime modules in
:mod:`litevar.quant.runtime` run the same arithmetic on int8 units.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .groups import TokenGroups
from .primitives import QuantSpec, dequantize, fake_quant, qparams, quantize_weight


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(K)`` over the last dimension (Sylvester Hadamard, orthonormal and symmetric), O(K log K).

    Example:
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(hadamard(hadamard(x)), x, atol=1e-6)
        True
    """
    K = x.shape[-1]
    if K & (K - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two width, got {K}")
    y, h = x, 1
    while h < K:
        y = y.reshape(*x.shape[:-1], K // (2 * h), 2, h)
        a, b = y.select(-2, 0), y.select(-2, 1)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(K)


class ActQuantizer(nn.Module):
    """Quantizes a Linear's input: dynamic (its own range per token or per tensor at every call) or static
    (calibrated ranges per token group, see :class:`TokenGroups`).

    Args:
        spec: bits and symmetry; granularity "token" or "tensor".
        groups: None for dynamic quantization; token groups for static ranges (set by :meth:`set_ranges`).

    Example:
        >>> aq = ActQuantizer(QuantSpec(bits=8, symmetric=False, granularity="token"))
        >>> aq(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, spec: QuantSpec, groups: TokenGroups | None = None) -> None:
        super().__init__()
        if spec.granularity not in ("token", "tensor"):
            raise ValueError(f"activations are quantized per token or per tensor, got {spec.granularity!r}")
        if groups is not None and spec.granularity != "tensor":
            raise ValueError("static activation ranges are per tensor within each token group")
        self.spec = spec
        self.groups = groups
        if groups is not None:
            self.register_buffer("lo", torch.zeros(groups.n_groups))
            self.register_buffer("hi", torch.zeros(groups.n_groups))

    @property
    def static(self) -> bool:
        return self.groups is not None

    def set_ranges(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo.copy_(lo)
        self.hi.copy_(hi)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static (scale, zero_point) per group [G]."""
        return qparams(self.lo, self.hi, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            return fake_quant(x, self.spec)
        ids = self.groups.ids(x.shape[-2]) if x.dim() >= 3 else self.lo.new_zeros(1, dtype=torch.long)
        lo = self.lo[ids].unsqueeze(-1)
        hi = self.hi[ids].unsqueeze(-1)
        return fake_quant(x, self.spec, lo, hi)

    def extra_repr(self) -> str:
        kind = f"static per {self.groups.kind} group ({self.groups.n_groups})" if self.static else f"dynamic per {self.spec.granularity}"
        return f"{self.spec.bits} bit {'sym' if self.spec.symmetric else 'asym'}, {kind}"


class QuantLinear(nn.Module):
    """A Linear whose weight is fake-quantized once and whose input is transformed and quantized per call.

    ``y = F.linear(Q_a(T(x)), Q_w(W'), b')`` where ``T(x) = hadamard((x - in_shift) / in_scale)`` (each part
    optional). The float weight ``W'`` and bias ``b'`` must already compensate ``T`` (``W' = W diag(in_scale)``,
    ``b' = b + W in_shift``, rotated with ``W``) so that without quantization the output is unchanged.

    Args:
        weight: the (transformed) float weight [N, K].
        bias: [N] or None.
        w_spec: weight quantization (None: keep the float weight).
        act: input quantizer (None: float input).
        in_shift, in_scale: per-input-channel shift and divisor [K] (online; None when folded elsewhere).
        rotate: apply the Hadamard rotation online.

    Example:
        >>> lin = nn.Linear(16, 4)
        >>> q = QuantLinear.from_linear(lin, QuantSpec(bits=8), None)
        >>> torch.allclose(q(torch.ones(1, 16)), lin(torch.ones(1, 16)), atol=1e-2)
        True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w_spec: QuantSpec | None,
                 act: ActQuantizer | None, in_shift: torch.Tensor | None = None, in_scale: torch.Tensor | None = None,
                 rotate: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.w_spec = w_spec
        if w_spec is not None:
            q, scale, zero_point = quantize_weight(weight.detach().float(), w_spec)
            shaped = q.reshape(weight.shape[0], -1, w_spec.group_size) if w_spec.granularity == "group" else q
            weight = dequantize(shaped, scale, zero_point).reshape(weight.shape).to(weight.dtype)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act
        self.register_buffer("in_shift", in_shift)
        self.register_buffer("in_scale", in_scale)
        self.rotate = rotate

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_spec: QuantSpec | None, act: ActQuantizer | None) -> "QuantLinear":
        return cls(linear.weight, linear.bias, w_spec, act)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``T(x)``: the float input the quantizer sees."""
        if self.in_shift is not None:
            x = x - self.in_shift.to(x.dtype)
        if self.in_scale is not None:
            x = x / self.in_scale.to(x.dtype)
        if self.rotate:
            x = hadamard(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = "float" if self.w_spec is None else f"W{self.w_spec.bits} per {self.w_spec.granularity}"
        parts = [f"in={self.in_features}", f"out={self.out_features}", w]
        parts += [name for name, on in (("shift", self.in_shift is not None), ("smooth", self.in_scale is not None),
                                          ("hadamard", self.rotate)) if on]
        return ", ".join(parts)


__all__ = ["ActQuantizer", "QuantLinear", "hadamard"]
