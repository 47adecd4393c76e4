"""The one attention processor that executes a block's :class:`~litevar.attention.components.AttentionComponents`.

Order of execution in each call (sampling scale by scale: VAR's KV-cached attention, or M-VAR's attention within
the scale, which has no cache; a teacher-forced pass has no cache and no sharing):

1. CFG sharing decides the rows: with output sharing at this (layer, scale) only the conditional half is
   projected, cached and attended, and its output is copied to the unconditional half.
2. q, k, v projection of those rows (the model's ``mat_qkv``: quantized if a quantization step replaced it).
3. KV cache: the new keys/values are stored in the cache's storage (e.g. int8) and everything cached is read back.
4. Attention precision: q, k, v are quantized (fake quantization of LiteVAR's 8-bit attention).
5. The kernel (chosen by the dispatcher) computes attention over the selected keys (window plan), with the
   probabilities quantized by the precision component and, with map sharing, the conditional probabilities
   applied to both halves' values.
6. Output projection.
"""
from __future__ import annotations

import math

import torch

from .components import AttentionComponents
from .context import AttnContext
from .dispatch import KernelDispatcher
from .kv_compressed import CompressedKVCache


class ComposedAttnProcessor:
    """Attention as configured by ``components`` (one processor object for every block of a model).

    ``trace[(layer, scale)]`` records, for the last call there, the kernel that ran and the rows computed.

    Example:
        >>> pipe.var.set_attn_processor(ComposedAttnProcessor(pipe.attention))  # doctest: +SKIP
    """

    def __init__(self, components: AttentionComponents) -> None:
        self.components = components
        self.dispatcher = KernelDispatcher(components.kernel)
        self._selection = components.selection  # the dispatcher's cached layouts are built from it
        self.trace: dict[tuple[int, int | None], dict] = {}

    def _sharing(self, layer: int, ctx: AttnContext) -> str | None:
        schedule = self.components.sharing
        if schedule is None or ctx.scale_index is None or ctx.cfg_batch is None:  # teacher-forced, or no CFG
            return None
        return schedule.mode if bool(schedule.shared[layer, ctx.scale_index]) else None

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        parts = self.components
        if self.dispatcher.kernel != parts.kernel or self._selection is not parts.selection:
            self.dispatcher = KernelDispatcher(parts.kernel)
            self._selection = parts.selection
        layer, si, B = attn.block_idx, ctx.scale_index, ctx.cfg_batch
        share = self._sharing(layer, ctx)
        rows = x_BLC[:B] if share == "output" else x_BLC
        q, k, v = attn.project_qkv(rows)
        out_dtype = q.dtype
        if ctx.kv_caches is not None and isinstance(ctx.kv_caches[layer], CompressedKVCache):
            out = self._attend_compressed(attn, ctx.kv_caches[layer], q, k, v, si, share, B)
            return self._finish(attn, out, q.dtype, layer, si, int(rows.shape[0]), share)
        if ctx.kv_caches is not None:
            cache = ctx.kv_caches[layer]
            k, v = cache.append_rows(k, v, rows=B) if share == "output" else cache.append(k, v)
        probs_fn = None
        if parts.precision is not None:
            q, k, v = parts.precision.quantize_qkv(q, k, v)
            probs_fn = parts.precision.quantize_probs
        if share == "map":
            q, k = q[:B], k[:B]
        out = self.dispatcher.attend(layer, si, q, k, v, attn.softmax_scale, parts.selection, ctx.attn_bias, probs_fn)
        return self._finish(attn, out, out_dtype, layer, si, int(rows.shape[0]), share)

    def _finish(self, attn, out: torch.Tensor, dtype: torch.dtype, layer: int, si, rows: int, share) -> torch.Tensor:
        self.trace[(layer, si)] = {"kernel": self.dispatcher.trace[(layer, si)], "rows": rows, "shared": share}
        y_BLC = attn.project_out(out.to(dtype))
        return torch.cat((y_BLC, y_BLC)) if share == "output" else y_BLC

    def _attend_compressed(self, attn, cache: CompressedKVCache, q, k, v, si: int, share, B) -> torch.Tensor:
        """Attention over a compressed cache: per head group, over its kept history and the new scale (window
        masks re-indexed through the kept positions); then the cache keeps its budget for the next scale. A group
        of contiguous heads (all groups once heads are reordered, :mod:`litevar.kvcompress.reorder`) reads q and
        writes the output through slices (views), others through the index."""
        parts, layer = self.components, attn.block_idx
        rows, l = q.shape[0], q.shape[2]
        cands = cache.candidates(k, v, si, rows)
        out = q.new_empty(rows, q.shape[1], l, v.shape[-1])
        for group, cand in zip(cache.groups, cands):
            by_cache = group["index"]  # computed once by the cache: a slice for a contiguous range (no device sync)
            heads = by_cache if isinstance(by_cache, slice) else cand.heads  # else the index on the model's device
            q_g, k_g, v_g = q[:, heads], cand.k, cand.v
            probs_fn = None
            if parts.precision is not None:
                q_g, k_g, v_g = parts.precision.quantize_qkv(q_g, k_g, v_g)
                probs_fn = parts.precision.quantize_probs
            bias = None
            if parts.selection is not None:
                keep = parts.selection.keep_mask(layer, si).to(q.device)[heads]  # [g, l, keys so far]
                index = cand.positions.unsqueeze(2).expand(-1, -1, l, -1)
                kept = keep.unsqueeze(0).expand(rows, -1, -1, -1).gather(3, index)
                kept |= ~kept.any(dim=-1, keepdim=True)  # a query whose window was evicted sees what is kept
                bias = torch.zeros(kept.shape, dtype=q_g.dtype, device=q.device).masked_fill_(~kept, -math.inf)
            if share == "map":
                q_g, k_g = q_g[:B], k_g[:B]
                bias = None if bias is None else bias[:B]
            out[:, heads] = self.dispatcher.attend(layer, si, q_g, k_g, v_g, attn.softmax_scale, None, bias,
                                                   probs_fn).to(out.dtype)
        cache.commit(si, q, attn.softmax_scale, cands)
        return out

    def report(self) -> dict:
        """The last generation's attention, for reports: the kernel per (layer, scale) and the CFG sharing calls."""
        cached = sorted(key for key in self.trace if key[1] is not None)
        layers = sorted({layer for layer, _ in cached})
        kernels = {str(layer): [self.trace[(layer, si)]["kernel"] for l2, si in cached if l2 == layer]
                   for layer in layers}
        shared = [self.trace[key]["shared"] for key in cached]
        return {"components": self.components.describe(), "kernels": kernels,
                "calls": len(cached), "output_shared_calls": shared.count("output"),
                "map_shared_calls": shared.count("map")}
