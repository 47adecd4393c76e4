"""A FLOP counter that counts the kernels that actually run, bucketed by where they run.

``torch.utils.flop_counter.FlopCounterMode`` misses kernels this project relies on: on CPU
``F.scaled_dot_product_attention`` (with or without a mask, fp32 or bf16) runs
``aten._scaled_dot_product_flash_attention_for_cpu``; the bf16 FFN runs the fused
``mkldnn._linear_pointwise``; int8 GEMMs run ``aten._int_mm``. :class:`FlopCounter` is a
``TorchDispatchMode`` that decomposes composite ops (``linear``, ``matmul``, ``conv2d``, the public SDPA
entry point) until it reaches a kernel with a formula, so it sees the kernel PyTorch chose, even under
``torch.inference_mode`` where composite ops arrive undecomposed.

A FLOP is one multiply or one add: a multiply-accumulate counts 2. A dense kernel counts every pair it
computes (a masked SDPA counts all Lq x Lk pairs, not just the unmasked ones). Later kernels (gathered
sparse attention, FlexAttention with a block mask, oneDNN/torchao int8 ops) add their own formula with
:func:`register_flop_formula`. An op without a formula whose name looks like a matmul, convolution or
attention is listed in ``uncounted`` so nothing is missed silently.

Buckets: ``attention`` (SDPA kernels, and anything run inside ``count_as("attention")``), ``linear``
(matmul-family kernels elsewhere), ``decoder`` (everything inside a module tracked as the decoder: the
VQ-VAE decoder and ``post_quant_conv`` in :func:`litevar.eval.generation_flops.count_generation_flops`),
``other`` (convolutions outside the decoder, e.g. the quantizer's Phi convolutions during sampling).

This module knows nothing of the model: attention kernels register their formulas here, and the per-generation
report, which reads the model's attention context, lives in :mod:`litevar.eval.generation_flops`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

BUCKETS = ("attention", "linear", "decoder", "other")
Formula = Callable[[tuple, dict, Any], int]


@dataclass(frozen=True)
class _Entry:
    fn: Formula
    bucket: str
    prefer_decomposition: bool


FORMULAS: dict[Any, _Entry] = {}
_COUNT_AS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("litevar_count_as", default=())


def register_flop_formula(op, fn: Formula, bucket: str = "linear", prefer_decomposition: bool = False) -> None:
    """Count ``op`` (an ``OpOverload``, or an ``OpOverloadPacket`` for all its overloads) with ``fn``.

    Args:
        op: e.g. ``torch.ops.aten.mm.default`` or ``torch.ops.mylib.gathered_attention``.
        fn: ``fn(args, kwargs, out) -> int`` FLOPs of one call (a multiply-accumulate counts 2).
        bucket: where the FLOPs go outside any ``count_as`` / decoder region: "attention", "linear" or "other".
        prefer_decomposition: a composite op that should be decomposed to the kernel it picks, the formula
            being used only when it cannot be (e.g. the public SDPA entry point).

    Example:
        >>> register_flop_formula(torch.ops.aten.mm.default, lambda args, kwargs, out: 2 * out.numel() * args[0].shape[-1])
    """
    if bucket not in BUCKETS:
        raise ValueError(f"unknown FLOP bucket {bucket!r}; use one of {', '.join(BUCKETS)}")
    FORMULAS[op] = _Entry(fn, bucket, prefer_decomposition)


def formula_for(func) -> _Entry | None:
    """The registered formula of an ``OpOverload`` (its own, else its packet's), or None."""
    entry = FORMULAS.get(func)
    if entry is None:
        entry = FORMULAS.get(getattr(func, "overloadpacket", None))
    return entry


@contextlib.contextmanager
def count_as(bucket: str) -> Iterator[None]:
    """FLOPs of every counted kernel run inside go to ``bucket`` (e.g. an attention backend made of matmuls).

    Example:
        >>> with count_as("attention"):
        ...     scores = torch.randn(2, 3) @ torch.randn(3, 4)
    """
    if bucket not in BUCKETS:
        raise ValueError(f"unknown FLOP bucket {bucket!r}; use one of {', '.join(BUCKETS)}")
    token = _COUNT_AS.set(_COUNT_AS.get() + (bucket,))
    try:
        yield
    finally:
        _COUNT_AS.reset(token)


def run_counted(fn: Callable[[], Any], flops: int, bucket: str = "attention") -> Any:
    """Run ``fn`` (e.g. a higher-order op such as FlexAttention, which dispatch modes cannot trace) outside any
    active :class:`FlopCounter`, and credit it ``flops`` (computed by the caller from what the kernel runs)."""
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    counter = _get_current_dispatch_mode()
    if not isinstance(counter, FlopCounter):
        return fn()
    with _disable_current_modes():
        out = fn()
    counter._add("external", bucket, flops)
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _contraction(a_index: int) -> Formula:
    """2 * output elements * contracted length (the last dim of argument ``a_index``)."""
    def fn(args: tuple, kwargs: dict, out: Any) -> int:
        return 2 * _first_tensor(out).numel() * args[a_index].shape[-1]
    return fn


def _addbmm(args: tuple, kwargs: dict, out: Any) -> int:
    batch1 = args[1]
    return 2 * out.numel() * batch1.shape[0] * batch1.shape[-1]


def _schema_arg(func, args: tuple, kwargs: dict, name: str, default: Any) -> Any:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) and not arg.kwarg_only else default
    return default


def _conv(transposed_index: int | None = None, always_transposed: bool = False) -> Formula:
    """Every multiply-accumulate the dense kernel does (padding included)."""
    def fn(args: tuple, kwargs: dict, out: Any) -> int:
        x, weight = args[0], args[1]
        transposed = always_transposed or (transposed_index is not None and bool(args[transposed_index]))
        per_element = math.prod(weight.shape[1:])
        return 2 * (x.numel() if transposed else _first_tensor(out).numel()) * per_element
    return fn


def _qconv(args: tuple, kwargs: dict, out: Any) -> int:
    return 2 * _first_tensor(out).numel() * math.prod(args[3].shape[1:])


def sdpa_flops(batch_heads: int, lq: int, lk: int, d_qk: int, d_v: int, causal: bool = False) -> int:
    """QK^T plus PV over the (query, key) pairs a kernel computes; a causal kernel skips the masked triangle."""
    if causal:
        offset = lk - lq
        pairs = sum(min(lk, max(0, i + 1 + offset)) for i in range(lq))
    else:
        pairs = lq * lk
    return 2 * batch_heads * pairs * (d_qk + d_v)


def _sdpa(func, args: tuple, kwargs: dict, out: Any) -> int:
    q, k, v = args[0], args[1], args[2]
    causal = bool(_schema_arg(func, args, kwargs, "is_causal", False))
    return sdpa_flops(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], causal)


def _register_builtin() -> None:
    aten = torch.ops.aten
    for name, a_index in (("mm", 0), ("addmm", 1), ("bmm", 0), ("baddbmm", 1), ("_int_mm", 0), ("_scaled_mm", 0),
                          ("mv", 0), ("addmv", 1), ("dot", 0), ("vdot", 0), ("_addmm_activation", 1),
                          ("_weight_int8pack_mm", 0)):
        if hasattr(aten, name):
            register_flop_formula(getattr(aten, name), _contraction(a_index), "linear")
    register_flop_formula(aten.addbmm, _addbmm, "linear")
    for name, transposed_index in (("convolution", 6), ("_convolution", 6), ("convolution_overrideable", 6),
                                   ("mkldnn_convolution", None), ("cudnn_convolution", None)):
        if hasattr(aten, name):
            register_flop_formula(getattr(aten, name), _conv(transposed_index), "other")
    if hasattr(aten, "cudnn_convolution_transpose"):
        register_flop_formula(aten.cudnn_convolution_transpose, _conv(always_transposed=True), "other")
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        register_flop_formula(torch.ops.mkldnn._linear_pointwise, _contraction(0), "linear")
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        register_flop_formula(torch.ops.mkldnn._convolution_pointwise, _conv(), "other")
    if hasattr(torch.ops.onednn, "qlinear_pointwise"):
        register_flop_formula(torch.ops.onednn.qlinear_pointwise, _contraction(0), "linear")
    if hasattr(torch.ops.onednn, "qconv2d_pointwise"):  # the packed weight (argument 3) keeps its [O, I, kh, kw] shape
        register_flop_formula(torch.ops.onednn.qconv2d_pointwise, _qconv, "other")
    for name in ("linear_dynamic", "linear"):
        if hasattr(torch.ops.quantized, name):
            register_flop_formula(getattr(torch.ops.quantized, name), _contraction(0), "linear")
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
                 "_scaled_dot_product_attention_math_for_mps"):
        if hasattr(aten, name):
            packet = getattr(aten, name)
            for overload in packet.overloads():
                op = getattr(packet, overload)
                register_flop_formula(op, lambda args, kwargs, out, op=op: _sdpa(op, args, kwargs, out), "attention")
    sdpa = aten.scaled_dot_product_attention.default
    register_flop_formula(sdpa, lambda args, kwargs, out: _sdpa(sdpa, args, kwargs, out), "attention",
                          prefer_decomposition=True)


_register_builtin()

_COMPUTE_TOKENS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "tensordot", "matmul",
                   "einsum", "linear", "qlinear", "gemm", "gemv", "attention", "attn", "sdpa", "conv",
                   "convolution", "qconv", "lstm", "gru", "rnn"}
_CONV_TOKEN = re.compile(r"q?conv(\d+d|olution)?")


def looks_like_compute(func) -> bool:
    """Whether an op's name says it is a matmul, convolution or attention (``upsample_bilinear2d`` is not)."""
    name = func._schema.name.split("::")[-1]
    tokens = [t for t in name.split("_") if t]
    return any(t in _COMPUTE_TOKENS or _CONV_TOKEN.fullmatch(t) for t in tokens)


def op_name(func) -> str:
    return str(func)


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of the kernels run while active, per bucket, per op and (when ``scale`` is set) per scale.

    Use :meth:`track_module` to send everything a module runs to one bucket, and set ``scale`` from a hook
    to split by scale. Results: ``totals`` (bucket -> FLOPs), ``by_op`` (op -> calls, FLOPs),
    ``per_scale`` (scale -> bucket -> FLOPs, decoder excluded), ``uncounted`` (op -> calls).

    Example:
        >>> with FlopCounter() as counter:
        ...     _ = torch.randn(4, 8) @ torch.randn(8, 16)
        >>> counter.totals["linear"]
        1024
    """

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, int] = dict.fromkeys(BUCKETS, 0)
        self.by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "flops": 0})
        self.per_scale: dict[int, dict[str, int]] = {}
        self.uncounted: dict[str, int] = defaultdict(int)
        self.scale: int | None = None
        self._regions: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = formula_for(func)
        if entry is None or entry.prefer_decomposition:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if entry is not None:
            self._add(op_name(func), entry.bucket, int(entry.fn(args, kwargs, out)))
        elif looks_like_compute(func):
            self.uncounted[op_name(func)] += 1
        return out

    def _add(self, name: str, default_bucket: str, flops: int) -> None:
        if self._regions:
            bucket = self._regions[-1]
        elif _COUNT_AS.get():
            bucket = _COUNT_AS.get()[-1]
        else:
            bucket = default_bucket
        self.totals[bucket] += flops
        record = self.by_op[name]
        record["calls"] += 1
        record["flops"] += flops
        if self.scale is not None and bucket != "decoder":
            per = self.per_scale.setdefault(self.scale, dict.fromkeys((b for b in BUCKETS if b != "decoder"), 0))
            per[bucket] += flops

    def track_module(self, module: nn.Module, bucket: str) -> list:
        """Send everything ``module`` runs to ``bucket`` (it wins over ``count_as``); returns the hook handles."""
        if bucket not in BUCKETS:
            raise ValueError(f"unknown FLOP bucket {bucket!r}; use one of {', '.join(BUCKETS)}")
        def enter(module, args) -> None:
            self._regions.append(bucket)

        def leave(module, args, output) -> None:
            self._regions.pop()

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    @property
    def total(self) -> int:
        return sum(self.totals.values())
