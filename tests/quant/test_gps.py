"""GPS's closed form on a hand-made case, recomputed here with plain loops in float64."""
import math

import numpy as np
import pytest
import torch

from litevar.quant.methods.gps import gps_scale
from litevar.quant.primitives import QuantSpec

A_BITS, W_BITS = 4, 4
# 6 input rows, 5 channels: 1 is the widest (it sets s_ref and the activation step), 3 is all zero (|X| = 0),
# 4 meets a zero weight column (|Wq| = |dW| = 0): both keep s_ref.
X = [[0.31, -2.70, 0.052, 0.0, 1.13],
     [-0.47, 3.85, -0.018, 0.0, -0.66],
     [0.12, 1.07, 0.093, 0.0, 0.29],
     [0.88, -0.35, -0.071, 0.0, -1.41],
     [-0.23, 2.22, 0.006, 0.0, 0.57],
     [0.64, -1.58, 0.037, 0.0, 0.94]]
W = [[0.21, -0.034, 0.77, 0.45, 0.0],
     [-0.58, 0.012, -0.19, 0.083, 0.0],
     [0.36, 0.027, 0.51, -0.62, 0.0]]


def round_half_even(v):
    return float(np.round(v))


def fake_quant_row(row, bits):
    """Asymmetric min-max grid of one weight row, as litevar.quant.primitives defines it."""
    qmax = 2 ** bits - 1
    lo, hi = min(min(row), 0.0), max(max(row), 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zero_point = min(max(round_half_even(-lo / scale), 0), qmax)
    return [(min(max(round_half_even(v / scale + zero_point), 0), qmax) - zero_point) * scale for v in row]


def hand_gps():
    K = len(X[0])
    col = lambda m, i: [r[i] for r in m]  # noqa: E731
    x_range = [max(col(X, i)) - min(col(X, i)) for i in range(K)]
    w_range = [max(max(col(W, i)) - min(col(W, i)), 1e-8) for i in range(K)]
    ref = max(range(K), key=lambda i: x_range[i])
    s_ref = math.sqrt(x_range[ref] / w_range[ref])
    step = x_range[ref] / s_ref / (2 ** A_BITS - 1)
    Xs = [[v / s_ref for v in r] for r in X]
    for r in Xs:  # the case is well conditioned: no value sits near a rounding tie of the activation grid
        assert all(abs(abs(v / step - math.floor(v / step)) - 0.5) > 1e-3 for v in r)
    dX = [[v - round_half_even(v / step) * step for v in r] for r in Xs]
    Ws = [[v * s_ref for v in r] for r in W]
    Wq = [fake_quant_row(r, W_BITS) for r in Ws]
    dW = [[a - b for a, b in zip(r, q)] for r, q in zip(Ws, Wq)]
    sq = lambda m, i: sum(v * v for v in col(m, i))  # noqa: E731
    a = [sq(dX, i) * sq(Wq, i) for i in range(K)]
    b = [sq(Xs, i) * sq(dW, i) for i in range(K)]
    s = [s_ref * (b[i] / a[i]) ** 0.25 if a[i] > 0 and b[i] > 0 else s_ref for i in range(K)]
    return s_ref, s, a, b


def test_gps_scale_matches_the_hand_computed_closed_form():
    s_ref, expected, a, b = hand_gps()
    got = gps_scale(torch.tensor(X), torch.tensor(W), QuantSpec(W_BITS, False), A_BITS)
    assert got.shape == (5,)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4)
    assert got[3] == got[4] == pytest.approx(s_ref, rel=1e-6)  # the degenerate channels keep s_ref
    assert all(abs(s / s_ref - 1) > 0.05 for s in expected[:3])  # and the others really moved


def test_the_returned_ratio_minimises_the_second_order_loss():
    s_ref, _, a, b = hand_gps()
    got = gps_scale(torch.tensor(X), torch.tensor(W), QuantSpec(W_BITS, False), A_BITS).double().numpy()
    for i in range(3):
        ratio = got[i] / s_ref
        grid = np.geomspace(ratio / 4, ratio * 4, 4001)
        loss = a[i] * grid ** 2 + b[i] / grid ** 2
        best = grid[loss.argmin()]
        assert abs(best / ratio - 1) < 2e-3
        assert a[i] * ratio ** 2 + b[i] / ratio ** 2 <= loss.min() * (1 + 1e-6)


def test_gps_scale_is_positive_and_bounded_on_random_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g) * torch.logspace(-3, 1, 32)
    s = gps_scale(x, torch.randn(16, 32, generator=g), QuantSpec(8, False), 8)
    assert torch.isfinite(s).all() and (s >= 1e-5).all() and (s <= 1e5).all()
