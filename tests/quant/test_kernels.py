"""Activation rounding kernels of the int8 runtime equal the reference grid; the fused AdaLN path equals the unfused one."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import litevar.quant.runtime as runtime
from litevar.models.configs import VARConfig
from litevar.models.var import AdaLNBlock
from litevar.quant.groups import TokenGroups
from litevar.quant.kernels import (_adaln_quantize_int8, _adaln_quantize_uint8, adaln_quantize, fused_adaln_available,
                                   quantize_static)
from litevar.quant.modules import ActQuantizer, QuantLinear
from litevar.quant.primitives import QuantSpec, quantize


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 6])
def test_quantize_static_equals_reference_grid(symmetric, bits):
    torch.manual_seed(0)
    spec = QuantSpec(bits, symmetric, "tensor")
    x = torch.randn(64, 48) * 3
    x[0, :4] = torch.tensor([100.0, -100.0, 0.5 * 0.05, 1.5 * 0.05])  # clipped both ways, ties
    scale, zero = 0.05, (0 if symmetric else 2 ** (bits - 1))
    q = quantize_static(x, scale, zero, spec)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    ref = quantize(x, torch.tensor(scale), torch.tensor(float(zero)), spec)
    assert torch.equal(q.float(), ref)


def test_quantize_static_result_is_independent_of_later_inputs():
    # the integers are a view of the quantized tensor's storage: they must not alias anything reused
    spec = QuantSpec(8, False, "tensor")
    a = quantize_static(torch.ones(4, 8), 0.1, 0, spec)
    quantize_static(torch.zeros(4, 8), 0.1, 0, spec)
    assert torch.equal(a, torch.full((4, 8), 10, dtype=torch.uint8))


def _needs_fused():
    if not (fused_adaln_available() and runtime.onednn_int8_available()):
        pytest.skip("the compiled fused kernel or oneDNN int8 is unavailable here")


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
@torch.no_grad()
def test_fused_adaln_quantize_equals_eager(symmetric):
    _needs_fused()
    torch.manual_seed(1)
    spec = QuantSpec(8, symmetric, "tensor")
    x = torch.randn(3, 9, 64, dtype=torch.bfloat16) * 4 + 1
    scale_unit = (1 + 0.3 * torch.randn(3, 1, 64)).bfloat16()
    shift = (0.2 * torch.randn(3, 1, 64)).bfloat16()
    scale, zero = torch.tensor(0.03), torch.tensor(0.0 if symmetric else 128.0)
    fused = adaln_quantize(x, scale_unit, shift, scale, zero, spec, 1e-6)
    eager_fn = _adaln_quantize_int8 if symmetric else _adaln_quantize_uint8
    eager = eager_fn(x, scale_unit, shift, 1.0 / scale, zero, spec.qmin, spec.qmax, 1e-6)
    assert fused.dtype == eager.dtype
    diff = (fused.int() - eager.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # only float reassociation at rounding ties
    for other_tokens in (1, 4):  # the dynamic-shape kernel serves every scale
        assert adaln_quantize(x[:, :other_tokens], scale_unit, shift, scale, zero, spec, 1e-6).shape[1] == other_tokens
    from litevar.flops import FlopCounter

    with FlopCounter():  # compiled code does not run under a dispatch mode: unfused there, fused again after
        assert adaln_quantize(x, scale_unit, shift, scale, zero, spec, 1e-6) is None
    assert fused_adaln_available() and adaln_quantize(x, scale_unit, shift, scale, zero, spec, 1e-6) is not None


def _int8_block(symmetric: bool) -> AdaLNBlock:
    torch.manual_seed(2)
    cfg = VARConfig(depth=1, width=64, heads=2, num_classes=10, patch_nums=(1, 2, 3), vocab_size=32, z_channels=8)
    block = AdaLNBlock(0, cfg).bfloat16().eval()
    for owner, name in ((block.attn, "mat_qkv"), (block.ffn, "fc1")):
        linear = getattr(owner, name)
        act = ActQuantizer(QuantSpec(8, symmetric, "tensor"), TokenGroups((1, 2, 3), "scale"))
        act.set_ranges(torch.full((3,), -4.0), torch.full((3,), 4.0))
        ql = QuantLinear(linear.weight, linear.bias, QuantSpec(8, True, "channel"), act)
        setattr(owner, name, runtime.Int8Linear.from_quant_linear(ql))
    return block


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_with_fused_adaln_matches_unfused(monkeypatch, symmetric):
    _needs_fused()
    from litevar.attention.context import AttnContext

    block = _int8_block(symmetric)
    x = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    mod = (0.3 * torch.randn(2, 1, 6, 64)).bfloat16()
    calls = []
    real = runtime.adaln_quantize
    monkeypatch.setattr(runtime, "adaln_quantize", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = block(x, mod, AttnContext()).float()
        assert len(calls) == 2  # mat_qkv and fc1 took the fused input
        monkeypatch.setattr(runtime, "adaln_quantize", lambda *a: None)
        unfused = block(x, mod, AttnContext()).float()
    # fused computes LN and modulation in float32 before rounding, unfused rounds them to bf16 first
    assert F.cosine_similarity(fused.flatten(), unfused.flatten(), dim=0) > 0.999
    assert (fused - unfused).abs().max() <= 0.05 * unfused.abs().max()
