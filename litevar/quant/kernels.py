"""Activation rounding for the int8 runtime: the input quantization is on the critical path of every int8 GEMM.

Two implementations with the same grid (``q = clamp(round(x / scale) + zero)``, ties to even):
- :func:`quantize_static`: ATen's one-pass quantize kernel, its bytes reinterpreted as uint8/int8 without a copy;
- :func:`adaln_quantize`: LayerNorm, AdaLN modulation and rounding fused in one compiled CPU kernel
  (``torch.compile``), so the block's normalised activation is written once, as 8 bit. Used only where
  compilation works here (checked once, with a warning otherwise); ``LITEVAR_COMPILE=0`` turns it off.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .primitives import QuantSpec


def quantize_static(x2d: torch.Tensor, scale: float, zero_point: int, spec: QuantSpec) -> torch.Tensor:
    """``x`` on the static grid ``(scale, zero_point)`` as int8 (symmetric, 8 bits) or uint8 (asymmetric, up to 8)."""
    if (spec.bits == 8 or not spec.symmetric) and hasattr(torch, "quantize_per_tensor"):
        qdtype, dtype = (torch.qint8, torch.int8) if spec.symmetric else (torch.quint8, torch.uint8)
        packed = torch.quantize_per_tensor(x2d.float(), scale, zero_point, qdtype)
        # The quantized tensor's storage holds exactly the integers: view it instead of int_repr()'s copy.
        q = torch.empty(0, dtype=dtype, device=x2d.device).set_(packed.untyped_storage(), 0, packed.shape,
                                                                  packed.stride())
        return q if (spec.bits == 8 and not spec.symmetric) else q.clamp_(spec.qmin, spec.qmax)  # u8 spans uint8
    dtype = torch.int8 if spec.symmetric else torch.uint8
    q = torch.round(x2d.float() * (1.0 / scale)).add_(zero_point).clamp_(spec.qmin, spec.qmax)  # x untouched
    return q.to(dtype)


def _adaln_quantize_grid(x: torch.Tensor, scale_unit: torch.Tensor, shift: torch.Tensor, inv_scale: torch.Tensor,
                         zero: torch.Tensor, qmin: int, qmax: int, eps: float) -> torch.Tensor:
    """LayerNorm, AdaLN scale and shift, then the rounded and clamped grid values, still in float32."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * scale_unit.float() + shift.float()
    return torch.clamp(torch.round(h * inv_scale) + zero, qmin, qmax)


# One function (code object) per output type: torch.compile keeps a bounded number of variants per code object.
# Called directly, they are the eager reference of the compiled kernels.
def _adaln_quantize_int8(x, scale_unit, shift, inv_scale, zero, qmin: int, qmax: int, eps: float):
    return _adaln_quantize_grid(x, scale_unit, shift, inv_scale, zero, qmin, qmax, eps).to(torch.int8)


def _adaln_quantize_uint8(x, scale_unit, shift, inv_scale, zero, qmin: int, qmax: int, eps: float):
    return _adaln_quantize_grid(x, scale_unit, shift, inv_scale, zero, qmin, qmax, eps).to(torch.uint8)


_failed: list[str] = []  # set once a compiled call failed: the unfused path from then on


@functools.cache
def _compiled() -> dict[bool, object] | None:
    """The compiled fused kernels by signedness, or None where compilation does not work (no C++ compiler,
    unsupported build)."""
    if os.environ.get("LITEVAR_COMPILE", "1") == "0" or not hasattr(torch, "compile"):
        return None
    try:
        kernels = {signed: torch.compile(fn, dynamic=True, fullgraph=True)
                   for signed, fn in ((True, _adaln_quantize_int8), (False, _adaln_quantize_uint8))}
        x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
        one = torch.ones(2, 1, 16, dtype=torch.bfloat16)
        args = (one, one * 0, torch.tensor(4.0), torch.tensor(128.0), 0, 255, 1e-6)
        with torch.no_grad():
            if not torch.equal(kernels[False](x, *args), _adaln_quantize_uint8(x, *args)):
                raise RuntimeError("compiled result differs from eager")
        return kernels
    except Exception as err:  # any failure means: use the unfused ATen path
        warnings.warn(f"fused AdaLN+quantize kernel unavailable ({type(err).__name__}: {str(err)[:200]}); "
                      "using the unfused path", stacklevel=2)
        return None


def _dispatch_mode_active() -> bool:
    """A TorchDispatchMode (e.g. the FLOP counter) is active: compiled code refuses to run under it, and that
    refusal must not switch the fused kernel off for the rest of the process."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def fused_adaln_available() -> bool:
    return _compiled() is not None and not _failed


def adaln_quantize(x: torch.Tensor, scale_unit: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, spec: QuantSpec, eps: float) -> torch.Tensor | None:
    """``quantize(LN(x) * scale_unit + shift)`` in one pass (LayerNorm without affine, computed in float32),
    or None when the fused kernel is unavailable or does not apply.

    Args:
        x: [B, L, C] activations. scale_unit, shift: [B, 1, C] modulation (``unit + scale``, ``shift``).
        scale, zero: 0-d tensors, the static grid of this call. spec: 8-bit activation spec.
    """
    if x.device.type != "cpu" or spec.bits != 8 or torch.is_grad_enabled() or _dispatch_mode_active():
        return None
    kernels = _compiled()
    if kernels is None or _failed:
        return None
    try:
        return kernels[spec.symmetric](x.contiguous(), scale_unit, shift, 1.0 / scale, zero, spec.qmin, spec.qmax, eps)
    except Exception as err:  # e.g. too many shape variants: stay correct on the unfused path
        _failed.append(f"{type(err).__name__}: {str(err)[:200]}")
        warnings.warn(f"fused AdaLN+quantize kernel failed ({_failed[0]}); using the unfused path", stacklevel=2)
        return None
