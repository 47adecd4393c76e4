"""Token groups, the activation quantizer (dynamic vs static), the fake-quant Linear and the Hadamard rotation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litevar.quant.groups import TokenGroups
from litevar.quant.modules import ActQuantizer, QuantLinear, hadamard
from litevar.quant.primitives import QuantSpec, fake_quant, sqnr_db

PYRAMID = (1, 2, 3)  # 1 + 4 + 9 = 14 positions


@pytest.mark.parametrize("kind, cached, full, n_groups", [
    ("tensor", {1: [0], 4: [0] * 4, 9: [0] * 9}, [0] * 14, 1),
    ("first", {1: [0], 4: [1] * 4, 9: [1] * 9}, [0] + [1] * 13, 2),
    ("scale", {1: [0], 4: [1] * 4, 9: [2] * 9}, [0] + [1] * 4 + [2] * 9, 3),
])
def test_token_group_ids_for_cached_and_teacher_forced_calls(kind, cached, full, n_groups):
    groups = TokenGroups(PYRAMID, kind)
    assert groups.n_groups == n_groups and groups.seq_len == 14
    for tokens, ids in cached.items():
        assert groups.ids(tokens).tolist() == ids
        assert groups.call_group(tokens) == ids[0]
    assert groups.ids(14).tolist() == full
    assert groups.call_group(14) == (0 if kind == "tensor" else None)


@pytest.mark.parametrize("kind", ["first", "scale"])
@pytest.mark.parametrize("tokens", [2, 5, 13, 15])
def test_token_groups_reject_lengths_of_no_scale(kind, tokens):
    with pytest.raises(ValueError, match=f"a call over {tokens} tokens matches no scale of the pyramid"):
        TokenGroups(PYRAMID, kind).ids(tokens)


def test_one_tensor_group_takes_any_length_and_bad_kinds_are_rejected():
    assert TokenGroups(PYRAMID, "tensor").ids(5).tolist() == [0] * 5
    with pytest.raises(ValueError, match="token grouping must be one of"):
        TokenGroups(PYRAMID, "token")


def test_dynamic_quantization_follows_each_token():
    spec = QuantSpec(8, False, "token")
    aq = ActQuantizer(spec)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    x[0, 3] *= 100  # an outlier token does not coarsen the others
    out = aq(x)
    assert not aq.static
    for b in range(2):
        for t in range(9):
            torch.testing.assert_close(out[b, t], fake_quant(x[b, t:t + 1], spec)[0], rtol=0, atol=0)
    assert sqnr_db(x[1], out[1]) > 40
    torch.testing.assert_close(aq(x * 4), out * 4)  # a power-of-two rescale commutes with per-token ranges


def test_static_quantization_uses_the_calibrated_range_of_the_call_group():
    spec = QuantSpec(8, False, "tensor")
    groups = TokenGroups(PYRAMID, "scale")
    aq = ActQuantizer(spec, groups)
    aq.set_ranges(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([1.0, 2.0, 4.0]))
    assert aq.static
    x = torch.randn(2, 14, 32, generator=torch.Generator().manual_seed(1))
    full = aq(x)  # teacher forcing: each position with its scale's range
    for g, (begin, end) in enumerate(((0, 1), (1, 5), (5, 14))):
        part = x[:, begin:end]
        expected = fake_quant(part, spec, aq.lo[g], aq.hi[g])
        torch.testing.assert_close(full[:, begin:end], expected, rtol=0, atol=0)
        torch.testing.assert_close(aq(part), expected, rtol=0, atol=0)  # KV-cached call of that scale alone
    # static ranges clip, dynamic ones do not
    big = torch.full((1, 4, 32), 10.0)
    assert aq(big).max() <= 2.0 + 2 / 255  # the asymmetric grid ends within half a step of the range
    assert ActQuantizer(QuantSpec(8, False, "token"))(big).max() == 10.0
    scale, zero_point = aq.qparams()
    torch.testing.assert_close(scale, torch.tensor([2.0, 4.0, 8.0]) / 255)


def test_act_quantizer_rejects_bad_granularities():
    with pytest.raises(ValueError, match="per token or per tensor"):
        ActQuantizer(QuantSpec(8, True, "channel"))
    with pytest.raises(ValueError, match="static activation ranges are per tensor"):
        ActQuantizer(QuantSpec(8, True, "token"), TokenGroups(PYRAMID, "scale"))


def gaussian_linear(K=256, N=128, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(K, N)
    nn.init.normal_(linear.weight, std=0.02)
    return linear.requires_grad_(False)


# Measured on this data (weights N(0, 0.02), inputs N(0, 1), per-channel / per-token asymmetric min-max):
# W8 only 43.8 dB, W8A8 40.8, W6A6 28.7, W4A8 19.2, W4A4 16.2 -- the 6 dB per bit of a uniform grid over about
# +-2.9 sigma (8 bit alone ~ 43.5 dB; two equal noise sources cost 3 dB). Bounds leave about 3-4 dB of margin.
@pytest.mark.parametrize("w_bits, a_bits, bound", [(8, None, 40), (8, 8, 37), (6, 6, 25), (4, 8, 16), (4, 4, 13)])
def test_quant_linear_sqnr_against_the_float_linear(w_bits, a_bits, bound):
    linear = gaussian_linear()
    x = torch.randn(4, 128, 256, generator=torch.Generator().manual_seed(1))
    act = None if a_bits is None else ActQuantizer(QuantSpec(a_bits, False, "token"))
    q = QuantLinear.from_linear(linear, QuantSpec(w_bits, False, "channel"), act)
    assert bound < sqnr_db(linear(x), q(x)) < bound + 8


def test_quant_linear_without_quantizers_is_the_linear_and_input_transforms_compensate():
    linear = gaussian_linear(64, 32)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(QuantLinear.from_linear(linear, None, None)(x), linear(x), rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    shift, scale = torch.randn(64, generator=g), torch.rand(64, generator=g) + 0.5
    moved = QuantLinear(linear.weight * scale, linear.bias + linear.weight @ shift, None, None, shift, scale)
    torch.testing.assert_close(moved(x), linear(x), rtol=1e-5, atol=1e-5)
    rotated = QuantLinear(hadamard(linear.weight), linear.bias, None, None, rotate=True)
    torch.testing.assert_close(rotated(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "shift, smooth" in repr(moved) and "hadamard" in repr(rotated)


def sylvester(K):
    H = torch.ones(1, 1)
    while H.shape[0] < K:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    return H


@pytest.mark.parametrize("K", [1, 2, 8, 64, 256])
def test_hadamard_is_the_orthonormal_sylvester_matrix(K):
    x = torch.randn(3, 7, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    y = hadamard(x)
    torch.testing.assert_close(y, x @ sylvester(K).double() / math.sqrt(K))
    torch.testing.assert_close(hadamard(y), x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    if K > 1:  # the rotation spreads a single outlier over every channel
        spike = F.one_hot(torch.tensor(0), K).float()
        torch.testing.assert_close(hadamard(spike).abs(), torch.full((K,), 1 / math.sqrt(K)))


@pytest.mark.parametrize("K", [3, 6, 12, 96])
def test_hadamard_rejects_widths_that_are_not_powers_of_two(K):
    with pytest.raises(ValueError, match=f"power-of-two width, got {K}"):
        hadamard(torch.randn(2, K))
