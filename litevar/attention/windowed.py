"""MDWA processor: attention restricted to a :class:`WindowPlan`, computed by a chosen backend.

``masked`` runs dense SDPA with an exact -inf mask (the oracle for the plan); ``gathered`` computes only the
kept query-key pairs (see :mod:`litevar.attention.sparse`).
"""
from __future__ import annotations

import torch

from .backends import sdpa
from .context import AttnContext
from .windows import PlanError, WindowPlan

BACKENDS = ("masked", "gathered")


class WindowedAttnProcessor:
    """Multi-diagonal windowed attention for one model (all layers share this object and its mask caches).

    Args:
        plan: the window plan (checked against the model's depth/heads/pyramid when the processor runs).
        backend: "masked" (dense kernel, -inf mask) or "gathered" (sparse: only kept pairs are computed).

    Example:
        >>> pipe.var.set_attn_processor(WindowedAttnProcessor(plan))  # doctest: +SKIP
    """

    def __init__(self, plan: WindowPlan, backend: str = "masked") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown MDWA backend {backend!r}; use one of {BACKENDS}")
        self.plan = plan
        self.backend = backend
        self._bias: dict[tuple, torch.Tensor] = {}
        self._sparse: dict[tuple, object] = {}

    def bias(self, layer: int, k: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The plan's additive mask for (layer, query scale k; None = teacher-forced), built once per dtype/device."""
        key = (layer, k, dtype, device)
        if key not in self._bias:
            if k is None:
                self._bias[key] = self.plan.teacher_forcing_bias(layer, dtype, device)
            else:
                self._bias[key] = self.plan.attn_bias(layer, k, dtype, device)
        return self._bias[key]

    def attend(self, layer: int, k: int | None, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Windowed attention of queries of scale ``k`` (None: teacher-forced, all scales) over the given keys."""
        if k is None or self.backend == "masked":
            return sdpa(q, key, value, scale, self.bias(layer, k, q.dtype, q.device))
        from .sparse import sparse_attention, sparse_layout

        layout_key = (layer, k, q.device, q.dtype, q.shape[-1])
        if layout_key not in self._sparse:
            self._sparse[layout_key] = sparse_layout(self.plan.keep_mask(layer, k), q)
        return sparse_attention(q, key, value, scale, self._sparse[layout_key])

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        q, k, v = attn.project_qkv(x_BLC)
        if ctx.kv_caches is not None:
            k, v = ctx.kv_caches[attn.block_idx].append(k, v)
            out = self.attend(attn.block_idx, ctx.scale_index, q, k, v, attn.softmax_scale)
        else:
            if ctx.attn_bias is None:
                raise ValueError("windowed attention needs the block-causal teacher-forcing pass or KV-cached sampling")
            out = self.attend(attn.block_idx, None, q, k, v, attn.softmax_scale)
        return attn.project_out(out)


def apply_window_plan(var, plan: WindowPlan, backend: str = "masked") -> WindowedAttnProcessor:
    """Check the plan against the model and install one windowed processor in every block."""
    cfg = var.cfg
    if tuple(plan.patch_nums) != tuple(cfg.patch_nums) or plan.depth != cfg.depth or plan.heads != cfg.heads:
        raise PlanError(f"window plan is for depth {plan.depth}, {plan.heads} heads, pyramid {plan.patch_nums}; "
                        f"the model has depth {cfg.depth}, {cfg.heads} heads, pyramid {tuple(cfg.patch_nums)}")
    processor = WindowedAttnProcessor(plan, backend)
    var.set_attn_processor(processor)
    return processor
