"""HACK's offline head reordering: an exact permutation of every layer's attention heads so that each head type is
contiguous (structural heads first, then contextual heads), letting a head group's q, keys and output be slices
(views) instead of gathered copies.

Permuting heads is exact: head ``h`` owns rows ``h*d:(h+1)*d`` of each of the q, k and v blocks of ``mat_qkv``
(and of ``q_bias``, ``zero_k_bias``, ``v_bias``), its entry of the per-head q scale ``scale_mul_1H11``, and columns
``h*d:(h+1)*d`` of ``proj``; moving all of them together only reorders the terms of the output projection's sum.

Orders are always given in the original head numbering (the numbering of calibration files, which are tied to the
model as loaded by :meth:`litevar.pipeline.Pipeline.identity`): ``pipe.head_order[l, p]`` is the original head now
at position ``p`` of layer ``l``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models.mvar import MVAR

_PER_HEAD = ("q_bias", "zero_k_bias", "v_bias", "scale_mul_1H11")  # the attention module's own tensors


def head_order(contextual: torch.Tensor) -> torch.Tensor:
    """long [depth, heads]: per layer, the structural heads (False) first, then the contextual ones (True), each
    in their original order.

    Args:
        contextual: bool [depth, heads] (:func:`litevar.kvcompress.heads.classify`).

    Example:
        >>> head_order(torch.tensor([[True, False, True, False]])).tolist()
        [[1, 3, 0, 2]]
    """
    contextual = torch.as_tensor(contextual)
    if contextual.dim() != 2 or contextual.dtype != torch.bool:
        raise ValueError(f"contextual must be a bool [depth, heads] mask, got {contextual.dtype} "
                         f"{list(contextual.shape)}")
    return contextual.cpu().long().sort(dim=1, stable=True).indices


def _check_order(order: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    order = torch.as_tensor(order).cpu()
    if order.dtype.is_floating_point or order.dtype == torch.bool or tuple(order.shape) != (depth, heads):
        raise ValueError(f"a head order must be an integer [depth={depth}, heads={heads}] tensor, got {order.dtype} "
                         f"{list(order.shape)}")
    order = order.long()
    if not torch.equal(order.sort(dim=1).values, torch.arange(heads).expand(depth, heads)):
        raise ValueError("each row of a head order must be a permutation of 0..heads-1")
    return order


def check_permutable(var: nn.Module) -> None:
    """Raise ValueError unless every attention layer of ``var`` can have its heads permuted exactly: a VAR (not an
    M-VAR) whose ``mat_qkv`` and ``proj`` are plain ``nn.Linear`` and with no per-head tensor this module does not
    know."""
    if isinstance(var, MVAR):
        raise ValueError("head reordering is for VAR's KV-cached attention; this model is an M-VAR (no KV cache)")
    for i, block in enumerate(var.blocks):
        attn = block.attn
        for name in ("mat_qkv", "proj"):
            module = getattr(attn, name)
            if type(module) is not nn.Linear:
                raise ValueError(f"blocks.{i}.attn.{name} is a {type(module).__name__}, not a plain Linear: head "
                                 "reordering must run before quantization (it permutes the float weights)")
        own = {name for name, _ in attn.named_parameters(recurse=False)}
        own |= {name for name, _ in attn.named_buffers(recurse=False)}
        unknown = sorted(own - set(_PER_HEAD))
        if unknown:
            raise ValueError(f"blocks.{i}.attn has tensors {unknown} that head reordering does not know how to "
                             "permute; reorder heads before the step that added them")
        if set(dict(attn.named_children())) != {"mat_qkv", "proj"}:
            raise ValueError(f"blocks.{i}.attn has submodules {sorted(dict(attn.named_children()))} beyond mat_qkv "
                             "and proj; reorder heads before the step that added them")


@torch.no_grad()
def permute_heads_(var: nn.Module, order: torch.Tensor) -> None:
    """Permute the heads of every attention layer of ``var`` in place (exact): head ``p`` of layer ``l`` becomes the
    previous head ``order[l, p]``.

    Args:
        var: a VAR whose attention Linears are still plain ``nn.Linear`` (refused after quantization, and for an
            M-VAR; see :func:`check_permutable`).
        order: integer [depth, heads], each row a permutation.

    Example:
        >>> permute_heads_(pipe.var, head_order(contextual))  # doctest: +SKIP
    """
    check_permutable(var)
    order = _check_order(order, len(var.blocks), var.blocks[0].attn.heads)
    for block, perm_H in zip(var.blocks, order):
        attn = block.attn
        if torch.equal(perm_H, torch.arange(attn.heads)):
            continue
        width = attn.heads * attn.head_dim
        device = attn.q_bias.device
        perm_H = perm_H.to(device)
        feats_C = (perm_H.view(-1, 1) * attn.head_dim + torch.arange(attn.head_dim, device=device)).flatten()
        rows_3C = torch.cat((feats_C, feats_C + width, feats_C + 2 * width))  # the q, k and v blocks
        qkv = attn.mat_qkv
        qkv.weight.copy_(qkv.weight.index_select(0, rows_3C))
        if qkv.bias is not None:
            qkv.bias.copy_(qkv.bias.index_select(0, rows_3C))
        for name in ("q_bias", "zero_k_bias", "v_bias"):
            tensor = getattr(attn, name)
            tensor.copy_(tensor.index_select(0, feats_C))
        if hasattr(attn, "scale_mul_1H11"):
            attn.scale_mul_1H11.copy_(attn.scale_mul_1H11.index_select(1, perm_H))
        attn.proj.weight.copy_(attn.proj.weight.index_select(1, feats_C))


def reorder_heads_(pipe, contextual: torch.Tensor) -> torch.Tensor:
    """Reorder every layer's heads of ``pipe.var`` so the structural heads come first and the contextual heads last
    (HACK's offline reordering; exact), and return the mask in the new order (per layer: False, then True).

    The model's identity is taken first (files calibrated on the model as loaded keep matching), the order is
    recorded as ``pipe.head_order`` (original head numbers per new position), and per-head attention components
    follow (a window plan already set is permuted; an ``mdwa`` step run later permutes the plan it loads). Calling
    it again composes: the heads end in the order ``contextual`` asks for (the same mask twice changes nothing).

    Args:
        pipe: a :class:`~litevar.pipeline.Pipeline` of a VAR, before quantization and before a KV policy is set
            (the policy's head groups must be built from the returned mask).
        contextual: bool [depth, heads] in the original head numbering (as :func:`~litevar.kvcompress.heads.classify`
            gives it from a calibration file).

    Example:
        >>> contextual = reorder_heads_(pipe, classify(variance, alpha))  # doctest: +SKIP
        >>> policy = HACK(budget, heads, depth, contextual)  # doctest: +SKIP
    """
    cfg = pipe.config.var
    contextual = torch.as_tensor(contextual)
    if tuple(contextual.shape) != (cfg.depth, cfg.heads):
        raise ValueError(f"contextual must be [depth={cfg.depth}, heads={cfg.heads}], got {list(contextual.shape)}")
    wanted = head_order(contextual)
    check_permutable(pipe.var)
    current = pipe.head_order if pipe.head_order is not None else torch.arange(cfg.heads).expand(cfg.depth, -1)
    position_of = current.argsort(dim=1)  # the inverse permutation: where each original head is now
    relative = position_of.gather(1, wanted)  # new position p takes the head now at relative[l, p]
    pipe.attention.permute_heads(relative)  # refuses (before any change) once a KV policy names the old heads
    pipe.identity()
    permute_heads_(pipe.var, relative)
    pipe.head_order = wanted
    return contextual.cpu().gather(1, wanted)
