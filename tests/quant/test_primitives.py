"""Affine primitives: round-trip bounds at every granularity and bit width, exact zero, degenerate ranges, specs."""
import pytest
import torch

from litevar.quant.primitives import (QuantSpec, dequantize, fake_quant, minmax, qparams, quantize, quantize_weight,
                                      sqnr_db)

SPECS = [("tensor", None), ("channel", None), ("token", None), ("group", 16)]


def heavy_tailed(*shape, seed=0):
    """Gaussian values times a per-row magnitude spanning 1e-2 .. 1e2, shifted off zero in some rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None]
    x[::3] += 5.0  # all-positive rows: the asymmetric range is [0, max]
    return x


def grouped(x, spec):
    return x.unflatten(-1, (-1, spec.group_size)) if spec.granularity == "group" else x


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity, group_size", SPECS)
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, granularity, group_size):
    spec = QuantSpec(bits, symmetric, granularity, group_size)
    x = heavy_tailed(12, 64, seed=bits)
    lo, hi = minmax(x, spec)
    scale, zero_point = qparams(lo, hi, spec)
    q = quantize(grouped(x, spec), scale, zero_point, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax and torch.equal(q, q.round())
    error = (dequantize(q, scale, zero_point) - grouped(x, spec)).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-5))
    # the grid is used: the range's extreme lands on an end of the grid
    assert int(q.abs().max() if symmetric else q.max()) == spec.qmax
    torch.testing.assert_close(fake_quant(x, spec), dequantize(q, scale, zero_point).reshape(x.shape))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity, group_size", SPECS)
def test_zero_is_exact_on_asymmetric_grids(bits, granularity, group_size):
    spec = QuantSpec(bits, False, granularity, group_size)
    x = heavy_tailed(12, 64, seed=10 + bits)
    x[:, ::5] = 0.0
    out = fake_quant(x, spec)
    assert torch.all(out[:, ::5] == 0)
    scale, zero_point = qparams(*minmax(x, spec), spec)
    assert torch.equal(zero_point, zero_point.round())
    assert torch.all(dequantize(quantize(torch.zeros(1), scale, zero_point, spec), scale, zero_point) == 0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity, group_size", SPECS)
@pytest.mark.parametrize("value", [0.0, 3.0, -0.75])
def test_constant_tensors_have_finite_scales(symmetric, granularity, group_size, value):
    spec = QuantSpec(4, symmetric, granularity, group_size)
    x = torch.full((4, 32), value)
    scale, zero_point = qparams(*minmax(x, spec), spec)
    assert torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero_point).all()
    out = fake_quant(x, spec)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=1e-5, atol=0)  # a constant is an end of its own range


def test_weight_quantization_is_per_output_channel():
    w = heavy_tailed(6, 32)
    q, scale, zero_point = quantize_weight(w, QuantSpec(8, True, "channel"))
    assert scale.shape == (6, 1)
    torch.testing.assert_close(scale.flatten(), w.abs().amax(1) / 127)
    torch.testing.assert_close(dequantize(q, scale, zero_point), w, rtol=0, atol=float(scale.max()) / 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=1), "bits must be an integer from 2 to 8"),
    (dict(bits=9), "bits must be an integer from 2 to 8"),
    (dict(bits=8.0), "bits must be an integer"),
    (dict(bits="8"), "bits must be an integer"),
    (dict(bits=True), "bits must be an integer"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(granularity="group"), "group_size is required"),
    (dict(granularity="channel", group_size=32), "only for it"),
    (dict(granularity="group", group_size=0), "group_size must be >= 1"),
])
def test_quant_spec_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_size_must_divide_the_width():
    with pytest.raises(ValueError, match="not divisible by group_size 24"):
        fake_quant(torch.randn(2, 64), QuantSpec(4, True, "group", 24))


def test_sqnr_grows_about_six_db_per_bit():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    sqnr = {b: sqnr_db(x, fake_quant(x, QuantSpec(b, True, "channel"))) for b in (4, 6, 8)}
    # uniform grid over about +-2.9 sigma: 8 bit ~ 43 dB measured, 6.02 dB per bit
    assert sqnr[8] > sqnr[6] > sqnr[4]
    assert sqnr[8] - sqnr[6] > 10 and sqnr[6] - sqnr[4] > 10
    assert sqnr[8] > 40
    assert sqnr_db(x, x) == float("inf")
