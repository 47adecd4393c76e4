"""The one place that decides which kernel computes an attention call.

Kernels (all compute ``softmax(scale * q k^T + mask) v``; dense SDPA is the oracle):

- ``sdpa``: PyTorch's fused kernel, no mask (flash path).
- ``masked``: the fused kernel with an additive -inf mask (block-causal and/or a window plan).
- ``explicit``: scores and probabilities materialised in float32, for computations that need the probabilities
  (quantized softmax output, CFG map sharing). Every pair is computed.
- ``gathered``: PyTorch kernel computing only the kept pairs of a window plan (:mod:`litevar.attention.sparse`);
  the only sparse kernel that can also transform the probabilities.
- ``interval``: the compiled CPU kernel for window plans (:mod:`litevar.attention.interval`).
- ``flex``: FlexAttention with a block mask built from the plan's keep mask.

``auto`` (the default everywhere) picks by capability and density: for a window plan on KV-cached sampling,
FlexAttention on CUDA, else the interval kernel where it is built and supports the call, else the gathered
kernel; dense SDPA whenever the sparse kernel would compute more than :data:`DENSE_ABOVE` of the pairs.
Which kernel ran for each (layer, scale) is recorded in :attr:`KernelDispatcher.trace` (``litevar bench`` writes it).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..flops import count_as, run_counted
from .interval import IntervalLayout, interval_attention
from .native import interval_kernel_supports
from .sparse import DENSE_ABOVE, GatheredLayout, gathered_attention

KERNELS = ("auto", "masked", "explicit", "gathered", "interval", "flex")
ProbsFn = Callable[[torch.Tensor], torch.Tensor]


def sdpa(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
         attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + bias) v with PyTorch's fused kernel (flash path when there is no mask)."""
    if attn_bias is not None and attn_bias.dtype != q_BHLc.dtype:
        attn_bias = attn_bias.to(q_BHLc.dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_bias, scale=scale)


def explicit_attention(q_BHlc: torch.Tensor, k_BHLc: torch.Tensor, v_GBHLc: torch.Tensor, scale: float,
                       attn_bias: torch.Tensor | None = None, probs_fn: ProbsFn | None = None) -> torch.Tensor:
    """Attention with the probabilities materialised in float32 (``probs_fn`` may transform them).

    ``v`` may hold ``G`` times the rows of ``q``/``k`` (CFG map sharing: the probabilities of the first rows are
    applied to every group of values); the output has the rows of ``v``.
    """
    with count_as("attention"):
        logits = (q_BHlc.float() @ k_BHLc.float().transpose(-1, -2)) * scale
        if attn_bias is not None:
            logits = logits + attn_bias.float()
        probs = logits.softmax(dim=-1)
        if probs_fn is not None:
            probs = probs_fn(probs)
        B = q_BHlc.shape[0]
        groups = v_GBHLc.shape[0] // B
        v = v_GBHLc.float().view(groups, B, *v_GBHLc.shape[1:])
        return (probs.unsqueeze(0) @ v).flatten(0, 1).to(v_GBHLc.dtype)


def flex_available() -> bool:
    """FlexAttention exists in this PyTorch (it runs compiled on CUDA; eagerly, slowly, elsewhere)."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex_attention(q, k, v, scale: float, keep_HlL: torch.Tensor) -> torch.Tensor:
    """FlexAttention with a block mask from the keep mask; FLOPs counted as the blocks it computes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    keep = keep_HlL.to(q.device)
    H, l, L = keep.shape
    block_mask = create_block_mask(lambda b, h, qi, ki: keep[h, qi, ki], None, H, l, L, device=q.device)
    blocks = int(block_mask.kv_num_blocks.sum())
    if block_mask.full_kv_num_blocks is not None:
        blocks += int(block_mask.full_kv_num_blocks.sum())
    pairs = min(blocks * min(block_mask.BLOCK_SIZE[0], l) * min(block_mask.BLOCK_SIZE[1], L), H * l * L)
    flops = 4 * q.shape[0] * pairs * q.shape[-1]  # QK^T and PV over the computed blocks, 2 FLOPs per multiply-add
    return run_counted(lambda: flex_attention(q, k, v, block_mask=block_mask, scale=scale), flops)


class KernelDispatcher:
    """Chooses and runs the kernel of every attention call of one model; caches per-(layer, scale) layouts.

    Args:
        kernel: one of :data:`KERNELS`; anything but "auto" forces that kernel for window plans (a kernel that
            cannot run the call raises ValueError).

    Example:
        >>> d = KernelDispatcher()
        >>> q = torch.randn(1, 2, 4, 8)
        >>> d.attend(0, 0, q, q, q, 1.0).shape, d.trace[(0, 0)]
        (torch.Size([1, 2, 4, 8]), 'sdpa')
    """

    def __init__(self, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; use one of {KERNELS}")
        self.kernel = kernel
        self.trace: dict[tuple[int, int | None], str] = {}
        self._layouts: dict[tuple, object] = {}

    def attend(self, layer: int, scale_index: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float, selection=None, attn_bias: torch.Tensor | None = None,
               probs_fn: ProbsFn | None = None) -> torch.Tensor:
        """Attention of queries of ``scale_index`` (None: teacher-forced) over ``k``/``v``.

        Args:
            selection: a :class:`~litevar.attention.components.WindowSelection` or None (every key).
            attn_bias: the pass's own mask (block-causal when teacher-forced); replaced by the selection's.
            probs_fn: transform of the probabilities (forces a kernel that materialises them).
            v may hold more rows than q/k (CFG map sharing, see :func:`explicit_attention`).
        """
        if v.shape[0] != q.shape[0]:
            return self._run(layer, scale_index, "explicit", explicit_attention, q, k, v, scale,
                             self._mask(layer, scale_index, selection, attn_bias, q), probs_fn)
        if selection is None or scale_index is None:
            mask = self._mask(layer, scale_index, selection, attn_bias, q)
            if probs_fn is not None or self.kernel == "explicit":
                return self._run(layer, scale_index, "explicit", explicit_attention, q, k, v, scale, mask, probs_fn)
            return self._run(layer, scale_index, "sdpa" if mask is None else "masked", sdpa, q, k, v, scale, mask)
        return self._windowed(layer, scale_index, q, k, v, scale, selection, probs_fn)

    def _run(self, layer, scale_index, name: str, fn, *args) -> torch.Tensor:
        self.trace[(layer, scale_index)] = name
        return fn(*args)

    def _mask(self, layer, scale_index, selection, attn_bias, q) -> torch.Tensor | None:
        if selection is None:
            return attn_bias
        return selection.bias(layer, scale_index, q.dtype, q.device)

    def _windowed(self, layer, si, q, k, v, scale, selection, probs_fn) -> torch.Tensor:
        kernel = self.kernel
        if kernel == "auto":
            kernel = self._auto(q, probs_fn)
        if kernel in ("masked", "explicit") or (probs_fn is not None and kernel != "gathered"):
            mask = selection.bias(layer, si, q.dtype, q.device)
            if probs_fn is not None or kernel == "explicit":
                return self._run(layer, si, "explicit", explicit_attention, q, k, v, scale, mask, probs_fn)
            return self._run(layer, si, "masked", sdpa, q, k, v, scale, mask)
        keep = selection.keep_mask(layer, si)
        if kernel == "flex":
            return self._run(layer, si, "flex", _flex_attention, q, k, v, scale, keep)
        layout = self._layout(layer, si, kernel, keep, q)
        if isinstance(layout, IntervalLayout):
            return self._run(layer, si, "interval", interval_attention, q, k, v, scale, layout)
        if not layout.groups:  # too dense to gather: the fused kernel with the plan's mask (or none at all)
            if probs_fn is not None:
                return self._run(layer, si, "explicit", explicit_attention, q, k, v, scale,
                                 layout.mask_as(q.dtype), probs_fn)
            return self._run(layer, si, "sdpa" if layout.mask is None else "masked", sdpa, q, k, v, scale,
                             layout.mask_as(q.dtype))
        return self._run(layer, si, "gathered", gathered_attention, q, k, v, scale, layout, probs_fn)

    def _auto(self, q: torch.Tensor, probs_fn) -> str:
        if probs_fn is not None:
            return "gathered"
        if q.device.type == "cuda" and flex_available():
            return "flex"
        return "interval" if interval_kernel_supports(q) else "gathered"

    def _layout(self, layer, si, kernel: str, keep_HlL: torch.Tensor, q: torch.Tensor):
        key = (layer, si, kernel, q.device, q.dtype, q.shape[-1])
        if key not in self._layouts:
            self._layouts[key] = _build_layout(kernel, keep_HlL, q)
        return self._layouts[key]


def _build_layout(kernel: str, keep_HlL: torch.Tensor, q: torch.Tensor) -> GatheredLayout | IntervalLayout:
    if kernel == "gathered":
        return GatheredLayout.from_mask(keep_HlL, q.device)
    if not interval_kernel_supports(q):
        raise ValueError(f"the interval kernel cannot run this call ({q.device.type}, {q.dtype}, head_dim "
                         f"{q.shape[-1]}): it needs a CPU, float32/bfloat16, head_dim 16/32/64/128 and a C++ "
                         "compiler; use kernel 'auto'")
    if bool(keep_HlL.all()):
        return GatheredLayout.dense(keep_HlL, q.device)
    layout = IntervalLayout.from_mask(keep_HlL)
    if layout.kept_pairs <= DENSE_ABOVE * keep_HlL.numel():
        return layout
    return GatheredLayout.dense(keep_HlL, q.device)
