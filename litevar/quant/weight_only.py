"""Weight-only quantized Linear modules for inference: int8 per output channel, int4 per group.

Weights are stored as integers (really 8 or 4 bits each); activations stay in floating point. On CPU the fused
ATen kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) run products of few rows; larger
products, other devices and shapes the kernels reject dequantize the weight and call ``F.linear``.

The int4 grid follows the ATen kernel: ``w = (q - 8) * scale + zero`` with ``q`` in 0..15, ``zero`` the float
value of the middle level, and scales/zeros laid out [K / group_size, N, 2]. The kernel's packed weight layout
depends on the CPU capability ATen dispatches to (AVX512, AVX2, default), so it is detected at run time and
recorded with the weight; a state dict saved under one layout is repacked when loaded under another.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# ATen int4 layouts: name -> (rows per block, whether full blocks pair row r with row r + block/2 in one byte)
ATEN_INT4_LAYOUTS = {"aten_b64_split": (64, True), "aten_b32_split": (32, True), "aten_b32_pairs": (32, False)}


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Divisor for quantizing: an all-equal row/group has scale 0 and quantizes to its zero level."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8_channels(w_NK: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 [N, K], scale [N] in ``dtype``), ``w ~ q * scale[:, None]``."""
    w = w_NK.float()
    scale = (w.abs().amax(dim=1) / 127).to(dtype)
    # quantize against the stored (rounded) scale so that dequantization is consistent with it
    q = torch.round(w / _safe(scale.float())[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def quantize_int4_groups(w_NK: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` inputs: (uint8 [N, K] in 0..15, scales_and_zeros
    [K / group_size, N, 2] in ``dtype``), ``w ~ (q - 8) * scale + zero``."""
    N, K = w_NK.shape
    w = w_NK.float().unflatten(1, (K // group_size, group_size))
    lo, hi = torch.aminmax(w, dim=-1, keepdim=True)
    scale = ((hi - lo) / 15).to(dtype)
    zero = (lo + 8 * scale.float()).to(dtype)
    q = torch.round((w - zero.float()) / _safe(scale.float())).add_(8).clamp_(0, 15)
    scales_and_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return q.flatten(1).to(torch.uint8), scales_and_zeros


def dequantize_int4(q_NK: torch.Tensor, scales_and_zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] that 4-bit values and their group scales/zeros represent, computed in ``dtype``."""
    N, K = q_NK.shape
    groups = scales_and_zeros.shape[0]
    sz_NG12 = scales_and_zeros.to(dtype).transpose(0, 1).unsqueeze(-2)
    w = q_NK.to(dtype).view(N, groups, K // groups)
    return w.sub_(8).mul_(sz_NG12[..., 0]).add_(sz_NG12[..., 1]).view(N, K)


def pack_int4(q_NK: torch.Tensor, packing: str) -> torch.Tensor:
    """uint8 [N, K / 2] holding 4-bit values [N, K]: "nibble" (even k in the low half of a byte) or an ATen layout
    (only the one :func:`aten_int4_packing` reports, on CPU)."""
    if packing == "nibble":
        q = q_NK.to(torch.uint8)
        return q[:, 0::2] | (q[:, 1::2] << 4)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_NK.to(torch.int32).contiguous(), 2)


def unpack_int4(packed: torch.Tensor, packing: str, N: int, K: int) -> torch.Tensor:
    """uint8 [N, K] in 0..15 from a packed weight (any layout, any device)."""
    out = torch.empty(N, K, dtype=torch.uint8, device=packed.device)
    if packing == "nibble":
        pairs = out.view(N, K // 2, 2)
        pairs[..., 0] = packed & 15
        pairs[..., 1] = packed >> 4
        return out
    block, split = ATEN_INT4_LAYOUTS[packing]
    flat = packed.reshape(-1)
    n_full = N // block * block
    # ATen stores rows in blocks, each as K byte-rows of block/2 bytes; a byte of a full block holds rows r and
    # r + block/2 ("split") or rows 2j and 2j+1 ("pairs"); a partial last block always holds neighbouring rows
    full = flat[:n_full * K // 2].view(-1, K, block // 2).transpose(1, 2)
    rows = out[:n_full].view(-1, 2, block // 2, K) if split else out[:n_full].view(-1, block // 2, 2, K).transpose(1, 2)
    rows[:, 0] = full & 15
    rows[:, 1] = full >> 4
    if n_full < N:
        tail = flat[n_full * K // 2:].view(K, (N - n_full) // 2).t()
        rows = out[n_full:].view(-1, 2, K)
        rows[:, 0] = tail & 15
        rows[:, 1] = tail >> 4
    return out


@functools.cache
def aten_int4_packing() -> str | None:
    """The layout ``_convert_weight_to_int4pack_for_cpu`` writes in this process, or None when the int4 CPU ops are
    missing or write a layout this module cannot read back (then the plain path is used)."""
    aten = torch.ops.aten
    if not (hasattr(aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(aten, "_weight_int4pack_mm_for_cpu")):
        return None
    # 144 rows: full blocks and a 16-row tail for both block widths
    probe = torch.randint(0, 16, (144, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    if packed.dtype != torch.uint8 or packed.numel() != probe.numel() // 2:
        return None
    for name in ATEN_INT4_LAYOUTS:
        if torch.equal(unpack_int4(packed, name, 144, 32).int(), probe):
            return name
    return None


def _kernel_ok(x2d: torch.Tensor, max_rows: int) -> bool:
    return x2d.device.type == "cpu" and x2d.dtype in FLOAT_DTYPES and x2d.shape[0] <= max_rows


def _linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


class WeightOnlyInt8Linear(nn.Module):
    """Linear with an int8 weight and one symmetric scale per output channel (``w ~ q * scale``).

    Args:
        weight_int8: int8 [N, K].
        scale: [N] (float); its dtype is the one the weights were quantized against.
        bias: [N] or None.

    ``kernel_max_rows``: inputs of at most this many rows use the fused CPU kernel; more rows dequantize and call
    ``F.linear``. The kernel's time grows linearly with the rows, so past ~32 rows dequantizing is faster
    (1 thread, Xeon with AMX; see benchmarks/bench_weight_only.py).

    Example:
        >>> q = WeightOnlyInt8Linear.from_linear(nn.Linear(64, 32))
        >>> q(torch.randn(2, 5, 64)).shape, q.weight_int8.dtype
        (torch.Size([2, 5, 32]), torch.int8)
    """

    kernel_max_rows = 32

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or scale.shape != weight_int8.shape[:1]:
            raise ValueError(f"expected an int8 weight [N, K] and a scale [N], got {weight_int8.dtype} "
                             f"{tuple(weight_int8.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> WeightOnlyInt8Linear:
        """Quantize a float Linear; scales are kept in ``dtype`` (default: the Linear's weight dtype)."""
        w = linear.weight.detach()
        q, scale = quantize_int8_channels(w, dtype or w.dtype)
        return cls(q, scale, _linear_bias(linear))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this module represents."""
        return (self.weight_int8.float() * self.scale.float()[:, None]).to(dtype)

    def weight_nbytes(self) -> int:
        """Bytes stored for the weight: integers and scales (not the bias)."""
        scale_bytes = self.scale.numel() * self.scale.element_size()
        return self.weight_int8.numel() * self.weight_int8.element_size() + scale_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        scale = self.scale.to(x.dtype)
        if hasattr(torch.ops.aten, "_weight_int8pack_mm") and _kernel_ok(x2d, self.kernel_max_rows):
            y = torch.ops.aten._weight_int8pack_mm(x2d.contiguous(), self.weight_int8, scale)
            if bias is not None:
                y += bias
        else:
            y = F.linear(x2d, self.weight_int8.to(x.dtype) * scale[:, None], bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class WeightOnlyInt4Linear(nn.Module):
    """Linear with a 4-bit weight (two values per byte) and an asymmetric scale/zero per group of inputs.

    Args:
        qweight: uint8 [N, K / 2], packed as ``packing`` says.
        scales_and_zeros: [K / group_size, N, 2] (float).
        bias: [N] or None.
        packing: "nibble", or the ATen layout of this process (:func:`aten_int4_packing`), which the fused CPU
            kernel reads.

    ``kernel_max_rows`` as in :class:`WeightOnlyInt8Linear` (the int4 kernel breaks even at ~64 rows).

    Example:
        >>> q = WeightOnlyInt4Linear.from_linear(nn.Linear(256, 64), group_size=128)
        >>> q(torch.randn(3, 256)).shape, q.qweight.shape
        (torch.Size([3, 64]), torch.Size([64, 128]))
    """

    kernel_max_rows = 64

    def __init__(self, qweight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None = None,
                 packing: str = "nibble") -> None:
        super().__init__()
        groups, N, two = scales_and_zeros.shape
        if (qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[0] != N or two != 2
                or (2 * qweight.shape[1]) % groups):
            raise ValueError(f"expected a uint8 weight [N, K/2] and scales_and_zeros [groups, N, 2], got "
                             f"{qweight.dtype} {tuple(qweight.shape)} and {tuple(scales_and_zeros.shape)}")
        if packing != "nibble" and packing not in ATEN_INT4_LAYOUTS:
            raise ValueError(f"unknown packing {packing!r}; use 'nibble' or one of {list(ATEN_INT4_LAYOUTS)}")
        self.out_features, self.in_features = N, 2 * qweight.shape[1]
        self.group_size = self.in_features // groups
        self.packing = packing
        self.register_buffer("qweight", qweight.contiguous())
        # the ATen kernel reads this buffer by raw strides: a non-contiguous one gives wrong results silently
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    dtype: torch.dtype | None = None) -> WeightOnlyInt4Linear:
        """Quantize a float Linear in groups of ``group_size`` inputs; scales/zeros are kept in ``dtype`` (default:
        the Linear's weight dtype). The ATen layout is used when its kernel can run this weight (CPU, N % 16 == 0)."""
        w = linear.weight.detach()
        N, K = w.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if K % group_size:
            raise ValueError(f"in_features {K} is not divisible by group_size {group_size}; pick a group size "
                             f"from {INT4_GROUP_SIZES} that divides it")
        q, scales_and_zeros = quantize_int4_groups(w, group_size, dtype or w.dtype)
        packing = aten_int4_packing() if w.device.type == "cpu" and N % 16 == 0 else None
        packing = packing or "nibble"
        return cls(pack_int4(q, packing), scales_and_zeros, _linear_bias(linear), packing)

    def int4_values(self) -> torch.Tensor:
        """uint8 [N, K] in 0..15."""
        return unpack_int4(self.qweight, self.packing, self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this module represents (computed in ``dtype``)."""
        return dequantize_int4(self.int4_values(), self.scales_and_zeros, dtype)

    def weight_nbytes(self) -> int:
        """Bytes stored for the weight: packed integers, scales and zeros (not the bias)."""
        sz = self.scales_and_zeros
        return self.qweight.numel() * self.qweight.element_size() + sz.numel() * sz.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.packing == aten_int4_packing() and _kernel_ok(x2d, self.kernel_max_rows):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d.contiguous(), self.qweight, self.group_size,
                                                           self.scales_and_zeros.to(x.dtype).contiguous())
            if bias is not None:
                y += bias
        else:
            y = F.linear(x2d, self.dequantized_weight(x.dtype), bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def get_extra_state(self) -> dict:
        return {"packing": self.packing}

    def set_extra_state(self, state: dict) -> None:
        """Runs after the buffers are loaded: repack a weight saved under another layout into this module's."""
        saved = state["packing"]
        if saved != self.packing:
            q = unpack_int4(self.qweight, saved, self.out_features, self.in_features)
            self.qweight = pack_int4(q.cpu(), self.packing).to(self.qweight.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, packing={self.packing}")
