"""Folding input transforms into the AdaLN leaves the float model's function unchanged."""
import copy

import pytest
import torch

from litevar.quant.layers import absorb_input_transform, foldable

FOLDABLE = ["blocks.0.attn.mat_qkv", "blocks.1.ffn.fc1", "head"]


def teacher_forced(var, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 3, 7])
    x_BLCv = torch.randn(3, var.cfg.seq_len - 1, var.cfg.z_channels, generator=g)
    with torch.no_grad():
        return var(labels, x_BLCv)


def random_transform(C, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, generator=g) * 0.5, torch.exp(torch.randn(C, generator=g) * 0.7)  # shift, positive scale


def assert_same_function(var, reference_logits):
    logits = teacher_forced(var)
    error = float((logits - reference_logits).abs().max() / reference_logits.abs().max())
    assert error <= 1e-4, f"relative error {error:.2e}"


def layer_input(var, name):
    seen = []
    handle = var.get_submodule(name).register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        teacher_forced(var)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture
def var(tiny_pipe):
    assert tiny_pipe.var.dtype == torch.float32
    return copy.deepcopy(tiny_pipe.var)


@pytest.mark.parametrize("name", FOLDABLE)
@pytest.mark.parametrize("parts", ["shift", "scale", "both"])
def test_a_folded_transform_keeps_the_logits(var, name, parts):
    reference = teacher_forced(var)
    x_before = layer_input(var, name)
    C = x_before.shape[-1]
    shift, scale = random_transform(C, seed=len(name))
    shift = None if parts == "scale" else shift
    scale = None if parts == "shift" else scale
    absorb_input_transform(var, name, shift, scale)
    assert_same_function(var, reference)
    expected = (x_before - (0 if shift is None else shift)) / (1 if scale is None else scale)
    torch.testing.assert_close(layer_input(var, name), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FOLDABLE)
def test_two_folded_transforms_compose(var, name):
    reference = teacher_forced(var)
    x_before = layer_input(var, name)
    C = x_before.shape[-1]
    (shift1, scale1), (shift2, scale2) = random_transform(C, 1), random_transform(C, 2)
    absorb_input_transform(var, name, shift1, scale1)
    absorb_input_transform(var, name, shift2, scale2)
    assert_same_function(var, reference)
    expected = ((x_before - shift1) / scale1 - shift2) / scale2
    torch.testing.assert_close(layer_input(var, name), expected, rtol=1e-4, atol=1e-4)


def test_all_foldable_layers_at_once(var):
    reference = teacher_forced(var)
    for i, name in enumerate(n for n, _ in var.named_modules() if foldable(n)):
        C = var.get_submodule(name).weight.shape[1]
        absorb_input_transform(var, name, *random_transform(C, 10 + i))
    assert i + 1 == 2 * len(var.blocks) + 1
    assert_same_function(var, reference)


@pytest.mark.parametrize("name", ["blocks.0.ffn.fc2", "blocks.1.attn.proj", "word_embed"])
def test_layers_without_an_adaln_before_them_refuse(var, name):
    C = var.get_submodule(name).weight.shape[1]
    with pytest.raises(ValueError, match="fold only into layers after an AdaLN"):
        absorb_input_transform(var, name, None, torch.full((C,), 2.0))
