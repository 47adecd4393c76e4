"""Weight-only int8 / int4 Linear modules: round-trip bounds, fused kernel == plain path, SQNR, bytes, layouts."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litevar.quant.primitives import sqnr_db
from litevar.quant.weight_only import (WeightOnlyInt4Linear, WeightOnlyInt8Linear, aten_int4_packing, pack_int4,
                                       unpack_int4)

INT8_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def gaussian_linear(K: int, N: int, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(K, N)
    nn.init.normal_(linear.weight, std=0.02)
    return linear.to(dtype).requires_grad_(False)


def bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to bf16 rounding: a couple of bf16 ulps at the output's largest magnitude."""
    atol = 2 * 2 ** -8 * float(expected.float().abs().max())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=atol)


def test_int8_round_trip_is_within_half_a_step_per_channel():
    linear = gaussian_linear(96, 64)
    linear.weight[3] = 0
    q = WeightOnlyInt8Linear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (64, 96)
    assert q.scale[3] == 0 and torch.all(q.dequantized_weight()[3] == 0)
    error = (q.dequantized_weight() - linear.weight).abs()
    assert torch.all(error <= q.scale[:, None] / 2 * (1 + 1e-6))
    assert int(q.weight_int8.abs().max()) == 127


@pytest.mark.parametrize("N", [48, 40])  # 48 rows fit the ATen int4 layout; 40 rows (N % 16 != 0) stay nibbles
def test_int4_round_trip_is_within_half_a_step_per_group(N):
    linear = gaussian_linear(256, N)
    linear.weight[5, 64:96] = 0.01  # a constant group: scale 0, represented exactly by its zero
    q = WeightOnlyInt4Linear.from_linear(linear, group_size=32)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (N, 128)
    assert q.packing == ("nibble" if N % 16 or aten_int4_packing() is None else aten_int4_packing())
    values = q.int4_values()
    assert values.max() <= 15 and values.min() == 0
    scale_NK = q.scales_and_zeros[..., 0].t().repeat_interleave(32, dim=1)
    error = (q.dequantized_weight() - linear.weight).abs()
    assert torch.all(error <= scale_NK / 2 * (1 + 1e-5) + 1e-9)
    assert torch.equal(q.dequantized_weight()[5, 64:96], linear.weight[5, 64:96])


@pytest.mark.parametrize("group_size, K, message", [(16, 256, "group_size must be one of"),
                                                    (64, 96, "in_features 96 is not divisible by group_size 64")])
def test_int4_rejects_bad_group_sizes(group_size, K, message):
    with pytest.raises(ValueError, match=message):
        WeightOnlyInt4Linear.from_linear(nn.Linear(K, 32), group_size=group_size)


def make(kind: str, linear: nn.Linear):
    return WeightOnlyInt8Linear.from_linear(linear) if kind == "int8" else WeightOnlyInt4Linear.from_linear(linear, 64)


def kernel_runs(kind: str, module) -> bool:
    if kind == "int8":
        return INT8_KERNEL
    return aten_int4_packing() is not None and module.packing == aten_int4_packing()


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_and_plain_path_equal_the_dequantized_reference(kind, dtype):
    linear = gaussian_linear(256, 96, dtype)
    q = make(kind, linear)
    x = torch.randn(3, 5, 256).to(dtype)
    reference = F.linear(x.float(), q.dequantized_weight(), linear.bias.float())
    fast = q(x)
    q.kernel_max_rows = 0
    plain = q(x)
    assert fast.dtype == plain.dtype == dtype and fast.shape == (3, 5, 96)
    if not kernel_runs(kind, q):
        pytest.skip(f"no fused {kind} CPU kernel in this torch build")
    if dtype == torch.float32:
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-5)
    else:
        bf16_close(fast, reference)
        bf16_close(plain, reference)
        bf16_close(fast, plain)


@pytest.mark.parametrize("kind, min_db", [
    # Gaussian rows: max|w| ~ 3.2 sigma over 1024 inputs, step 3.2 sigma/127, noise step^2/12 -> ~42.8 dB
    ("int8", 38.0),
    # groups of 128: range ~ 5.2 sigma, step 5.2 sigma/15, noise step^2/12 -> ~20 dB
    ("int4", 18.0),
])
def test_output_sqnr_against_the_float_linear(kind, min_db):
    linear = gaussian_linear(1024, 1024)
    q = WeightOnlyInt8Linear.from_linear(linear) if kind == "int8" else WeightOnlyInt4Linear.from_linear(linear, 128)
    x = torch.randn(16, 1024)
    assert sqnr_db(linear(x), q(x)) > min_db
    assert sqnr_db(linear.weight, q.dequantized_weight()) > min_db


def test_weight_bytes_against_bf16():
    linear = gaussian_linear(1024, 1024, torch.bfloat16)
    bf16_bytes = linear.weight.numel() * 2
    int8, int4 = WeightOnlyInt8Linear.from_linear(linear), WeightOnlyInt4Linear.from_linear(linear, 128)
    assert int8.weight_nbytes() == 1024 * 1024 + 1024 * 2
    assert int4.weight_nbytes() == 1024 * 512 + 8 * 1024 * 2 * 2
    assert int8.weight_nbytes() <= 0.55 * bf16_bytes and int4.weight_nbytes() <= 0.30 * bf16_bytes
    buffers = {name: b.numel() * b.element_size() for name, b in int4.named_buffers() if name != "bias"}
    assert sum(buffers.values()) == int4.weight_nbytes()


def test_no_bias_and_repr():
    linear = nn.Linear(128, 32, bias=False)
    q = WeightOnlyInt4Linear.from_linear(linear, 32)
    assert q.bias is None and "group_size=32" in repr(q)
    torch.testing.assert_close(q(torch.ones(2, 128)), F.linear(torch.ones(2, 128), q.dequantized_weight()))
    assert "bias=False" in repr(WeightOnlyInt8Linear.from_linear(linear))


def test_int4_state_dict_saved_in_another_layout_is_repacked():
    q = WeightOnlyInt4Linear.from_linear(gaussian_linear(128, 64), 32)
    nibbles = {**q.state_dict(), "qweight": pack_int4(q.int4_values(), "nibble"), "_extra_state": {"packing": "nibble"}}
    other = WeightOnlyInt4Linear.from_linear(gaussian_linear(128, 64, seed=1), 32)
    other.load_state_dict(nibbles)
    assert other.packing == q.packing and torch.equal(other.qweight, q.qweight)
    x = torch.randn(4, 128)
    torch.testing.assert_close(other(x), q(x))


def test_nibble_packing_round_trips():
    values = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    packed = pack_int4(values, "nibble")
    assert packed.shape == (24, 32) and torch.equal(packed[0, 0], values[0, 0] | values[0, 1] << 4)
    assert torch.equal(unpack_int4(packed, "nibble", 24, 64), values)


CHECK_LAYOUT = """
import torch
from litevar.quant.weight_only import WeightOnlyInt4Linear, aten_int4_packing
torch.manual_seed(0)
q = WeightOnlyInt4Linear.from_linear(torch.nn.Linear(128, 80), 32)
x = torch.randn(3, 128)
fast = q(x)
q.kernel_max_rows = 0
print(aten_int4_packing(), float((fast - q(x)).abs().max()))
"""


@pytest.mark.slow
@pytest.mark.skipif(aten_int4_packing() is None, reason="no ATen int4 CPU kernel")
@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_int4_layout_is_detected_under_other_cpu_capabilities(capability):
    """The ATen int4 layout depends on the CPU capability ATen dispatches to; every one must be read back right."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK_LAYOUT], env=env, capture_output=True, text=True, check=True)
    packing, difference = out.stdout.split()
    assert packing != "None" and float(difference) < 1e-4
