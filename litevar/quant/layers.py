"""Architecture knowledge in one place: VAR's Linear layer types and which AdaLN feeds which Linear."""
from __future__ import annotations

import re

import torch
import torch.nn as nn

LAYER_TYPES = ("word_embed", "mat_qkv", "proj", "in_proj", "out_proj", "fc1", "fc2", "ada_lin", "head")
MAMBA_TYPES = ("in_proj", "out_proj")  # M-VAR's Mamba-2 projections
VAR_LAYER_TYPES = tuple(t for t in LAYER_TYPES if t not in MAMBA_TYPES)  # the types every VAR-family model has
_PATTERNS = {
    "word_embed": r"word_embed",
    "mat_qkv": r"blocks\.\d+\.attn\.mat_qkv",
    "proj": r"blocks\.\d+\.attn\.proj",
    "in_proj": r"blocks\.\d+\.mamba\.in_proj",
    "out_proj": r"blocks\.\d+\.mamba\.out_proj",
    "fc1": r"blocks\.\d+\.ffn\.fc1",
    "fc2": r"blocks\.\d+\.ffn\.fc2",
    "ada_lin": r"(blocks\.\d+\.|head_nm\.|shared_)ada_lin\.1",
    "head": r"head",
}
# Linear -> (the module whose AdaLN produces its input, the branch): transforms of these inputs fold exactly.
_FOLDABLE = {"mat_qkv": "attn", "in_proj": "mamba", "fc1": "ffn", "head": None}


def branch_norms(block: nn.Module) -> dict[str, tuple[str, int]]:
    """``{branch: (norm attribute, k)}`` of a block's AdaLN-fed sub-blocks: branch k's modulation is scale chunk
    ``n + k`` and shift chunk ``2n + k`` of the block's ``3n`` chunks (VAR: attn, ffn; M-VAR: attn, mamba, ffn)."""
    if hasattr(block, "mamba"):
        return {"attn": ("norm1", 0), "mamba": ("norm2", 1), "ffn": ("norm3", 2)}
    return {"attn": ("norm1", 0), "ffn": ("norm2", 1)}


def layer_type(name: str) -> str | None:
    """The layer type of a VAR module name, e.g. ``blocks.3.ffn.fc2`` -> ``fc2`` (None for non-Linears)."""
    return next((kind for kind, pattern in _PATTERNS.items() if re.fullmatch(pattern, name)), None)


def check_layer_types(types, what: str) -> tuple[str, ...]:
    if isinstance(types, str) or not isinstance(types, (list, tuple, dict, set, frozenset)):
        raise ValueError(f"{what} must be a list of layer types (e.g. [\"fc2\"]), got {types!r}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{what}: unknown layer types {unknown}; known: {list(LAYER_TYPES)}")
    return tuple(types)


def linear_layers(var: nn.Module, types=LAYER_TYPES) -> dict[str, nn.Module]:
    """``{name: module}`` of the model's Linear-like modules of the given types, in model order."""
    found = {}
    for name, module in var.named_modules():
        kind = layer_type(name)
        if kind in types and hasattr(module, "in_features"):
            found[name] = module
    return found


def foldable(name: str) -> bool:
    """Whether an input shift/scale of this layer can be folded into the AdaLN before it."""
    return layer_type(name) in _FOLDABLE


def _block(var: nn.Module, name: str) -> nn.Module:
    return var.blocks[int(name.split(".")[1])]


def _fold_into_adaln(var: nn.Module, name: str, kind: str, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """Make the AdaLN output feeding layer ``name`` become ``(X - shift) / scale``."""
    from .fusions import fold_adaln_input

    if kind == "head":
        fold_adaln_input(var.head_nm.norm, var.head_nm.ada_lin[1], (0, 1), shift, scale)
        return
    block = _block(var, name)
    if block.shared_aln:
        raise ValueError("input transforms cannot be folded into a shared AdaLN (d36-style models)")
    branches = branch_norms(block)
    norm_name, k = branches[_FOLDABLE[kind]]
    n = len(branches)
    fold_adaln_input(getattr(block, norm_name), block.ada_lin[1], (n + k, 2 * n + k), shift, scale)


@torch.no_grad()
def absorb_input_transform(var: nn.Module, name: str, shift: torch.Tensor | None, scale: torch.Tensor | None) -> None:
    """Make layer ``name`` see ``(X - shift) / scale`` with the model function unchanged: the AdaLN before it
    produces the transformed input, the layer's weight becomes ``W diag(scale)`` and its bias ``b + W shift``.

    Example:
        >>> absorb_input_transform(var, "blocks.0.ffn.fc1", None, torch.full((C,), 2.0))  # doctest: +SKIP
    """
    kind = layer_type(name)
    if kind not in _FOLDABLE:
        raise ValueError(f"{name}: input transforms fold only into layers after an AdaLN ({sorted(_FOLDABLE)})")
    linear = var.get_submodule(name)
    C = linear.weight.shape[1]
    shift = torch.zeros(C) if shift is None else shift.float().cpu()
    scale = torch.ones(C) if scale is None else scale.float().cpu()
    if kind != "mat_qkv" and linear.bias is None and bool(shift.any()):  # M-VAR's in_proj: a scale alone folds
        raise ValueError(f"{name}: a shift needs a bias to compensate it")
    _fold_into_adaln(var, name, kind, shift, scale)
    weight32 = linear.weight.float()
    added_bias = weight32 @ shift.to(weight32.device)
    linear.weight.copy_(weight32 * scale.to(weight32.device))
    if kind == "mat_qkv":  # the q|k|v bias lives on the attention module
        attn = _block(var, name).attn
        for param, part in zip((attn.q_bias, attn.zero_k_bias, attn.v_bias), added_bias.chunk(3)):
            param.add_(part.to(param.dtype))
    elif linear.bias is not None:
        linear.bias.add_(added_bias.to(linear.bias.dtype))
