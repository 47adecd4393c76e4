"""Int8 decoder convolutions: equal to their fake-quant oracle, calibrated decoder close to the float one, the
recipe step, its validation, and save/load."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import litevar
from litevar.flops import FlopCounter
from litevar.quant import conv as qconv
from litevar.quant.conv import ACT_SPEC, Int8Conv2d, Int8Upsample2x, onednn_int8_conv_available, quantize_activation
from litevar.quant.decoder import DecoderInt8Config, calibrate_decoder, select_convs
from litevar.quant.io import load_quantized, save_quantized
from litevar.quant.kernels import quantize_static
from litevar.quant.primitives import quantize
from litevar.recipe import RecipeError, apply_recipe, load_recipe

ALL = {"type": "decoder-int8", "calib_samples": 2, "min_reduction": 0}


def fresh(ref_dir, dtype="bf16"):
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                                 config=ref_dir / "tiny_config.json", dtype=dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a.float() - b.float()).pow(2).mean()))


def _layer(in_ch, out_ch, k, stride, groups, dtype):
    torch.manual_seed(in_ch * 7 + k)
    conv = nn.Conv2d(in_ch, out_ch, k, stride, k // 2, groups=groups).to(dtype)
    fmt = torch.channels_last if dtype == torch.bfloat16 else torch.contiguous_format
    x = (torch.randn(2, in_ch, 9, 9) * 1.5 + 0.3).to(dtype).contiguous(memory_format=fmt)
    return Int8Conv2d.from_conv(conv, float(x.min()) * 0.9, float(x.max()) * 0.9), x  # a clipped range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 48, 3, 1, 1), (48, 16, 1, 1, 1), (32, 32, 3, 2, 2)])
def test_int8_conv_equals_fake_quant_oracle(dtype, shape):
    layer, x = _layer(*shape, dtype)
    scale, zero = layer.input_qparams()
    q = layer.quantize(x)
    assert q.dtype == torch.uint8
    # the kernel multiplies by 1/scale, the oracle divides: at most one grid step apart, and only within an ulp
    # of a rounding boundary
    steps = (q.float() - quantize(x.float(), torch.tensor(scale), torch.tensor(float(zero)), ACT_SPEC)).abs()
    assert steps.max() <= 1 and steps.mean() < 1e-3
    out, ref = layer(x).float(), layer.simulate(x).float()
    assert out.dtype == ref.dtype and layer(x).dtype == dtype
    # the same integer products: float32 accumulation order (~1e-6 relative); in bf16 the two float32 results may
    # round to either side of a boundary, one ulp apart (at most 2^-7 relative); plus one input grid step times
    # the largest weight-row sum where the rounding differed
    w_sum = float(layer.dequantized_weight().abs().flatten(1).sum(1).max())
    bound = 1e-5 * ref.abs().max() + (2 ** -7 * ref.abs() if dtype == torch.bfloat16 else 0)
    bound = bound + (scale * w_sum if steps.max() > 0 else 0)
    assert ((out - ref).abs() <= bound).all()


def test_emulation_without_onednn_matches_the_kernel(monkeypatch):
    if not onednn_int8_conv_available():
        pytest.skip("no oneDNN int8 convolution in this build")
    layer, x = _layer(32, 48, 3, 1, 1, torch.float32)
    fast = layer(x)
    monkeypatch.setattr(qconv, "onednn_int8_conv_available", lambda: False)
    assert torch.allclose(layer(x), fast, rtol=1e-5, atol=1e-5 * float(fast.abs().max()))


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_chunked_rounding_equals_aten(monkeypatch, fmt):
    monkeypatch.setattr(qconv, "ROUND_CHUNK", 1000)  # 9.8 chunks, the last one partial
    x = (torch.randn(2, 16, 17, 18) * 2).to(torch.bfloat16).contiguous(memory_format=fmt)
    q = quantize_activation(x, 0.013, 97)
    assert q.is_contiguous(memory_format=fmt)
    assert torch.equal(q, quantize_static(x, 0.013, 97, ACT_SPEC))
    strided = x[:, :, ::2]  # neither layout: one ATen call
    assert torch.equal(quantize_activation(strided, 0.013, 97), quantize_static(strided, 0.013, 97, ACT_SPEC))


def test_upsample_rounds_before_upsampling():
    layer, x = _layer(32, 32, 3, 1, 1, torch.bfloat16)
    up = Int8Upsample2x(layer)
    assert torch.equal(up(x), layer(F.interpolate(x, scale_factor=2, mode="nearest")))


def test_flop_counter_counts_the_int8_kernel():
    if not onednn_int8_conv_available():
        pytest.skip("no oneDNN int8 convolution in this build")
    layer, x = _layer(32, 48, 3, 1, 1, torch.bfloat16)
    layer(x)  # packs the weight (once per device)
    with FlopCounter() as counter:
        out = layer(x)
    assert counter.totals["other"] == 2 * out.numel() * 32 * 9 and not counter.uncounted


@pytest.mark.slow
def test_calibrated_decoder_close_to_float(ref_dir):
    pipe = fresh(ref_dir)
    out = pipe.generate([1, 5, 7], seed=[0, 1, 2], progress=False)  # evaluation seeds, apart from calibration's
    apply_recipe(pipe, load_recipe({"dtype": "bf16", "steps": [{**ALL, "calib_samples": 4}]}))
    assert sum(isinstance(m, Int8Conv2d) for m in pipe.vae.decoder.modules()) == 50  # every convolution
    images = pipe.vae.idx_to_img(out.tokens).add_(1).mul_(0.5)
    # measured on this random-weight model, every layer int8: 30.8 dB on the 8-bit input grid, 27.9 dB on the 7-bit
    # one of AVX2-only CPUs (bf16 vs fp32 decoding alone: 42 dB)
    assert psnr(images, out.images) > (28 if ACT_SPEC.bits == 8 else 25)


@pytest.mark.slow
def test_range_rules_clip_inside_the_observed_range(ref_dir):
    pipe = fresh(ref_dir)
    tokens = [pipe.generate([0, 1], seed=[100000, 100001], progress=False).tokens]
    names = ["up.0.block.0.conv1", "conv_out"]
    exact = calibrate_decoder(pipe.vae, tokens, names, act_range="minmax")
    for rule in ("percentile", "mse"):
        ranges = calibrate_decoder(pipe.vae, tokens, names, act_range=rule, percentile=0.999)
        for name in names:
            assert exact[name][0] <= ranges[name][0] < ranges[name][1] <= exact[name][1]


def test_recipe_step_selects_by_reduction_and_skip(ref_dir):
    pipe = fresh(ref_dir)
    chosen = select_convs(pipe.vae.decoder, DecoderInt8Config(min_reduction=128 * 9, skip=["up.*", "mid.block_2.*"]))
    assert chosen == ["mid.block_1.conv1", "mid.block_1.conv2"]  # the 3x3 convolutions on 128 channels left
    recipe = load_recipe({"dtype": "bf16", "steps": [{**ALL, "skip": ["conv_out", "up.1.*"]}]})
    assert load_recipe(recipe.to_dict()).fingerprint() == recipe.fingerprint()
    apply_recipe(pipe, recipe)
    decoder = pipe.vae.decoder
    assert isinstance(decoder.conv_out, nn.Conv2d) and isinstance(decoder.up[1].block[0].conv1, nn.Conv2d)
    assert isinstance(decoder.conv_in, Int8Conv2d) and isinstance(decoder.up[2].upsample, Int8Upsample2x)
    assert pipe.vae.compute_dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="stays in float"):  # the default rule: nothing this small pays
        apply_recipe(fresh(ref_dir), load_recipe({"dtype": "bf16", "steps": [{"type": "decoder-int8"}]}))


def test_copy_and_cast_keep_kernel_parameters():
    layer, x = _layer(32, 48, 3, 1, 1, torch.bfloat16)
    out = layer(x)  # packs the weight
    assert torch.equal(copy.deepcopy(layer)(x), out)
    layer.to(torch.float32)
    assert layer.out_dtype == torch.float32 and layer.weight_scale.dtype == torch.float32
    assert layer.weight_int8.dtype == torch.int8 and layer(x.float()).dtype == torch.float32


@pytest.mark.parametrize("key, value", [("calib_samples", 0), ("calib_seed", -1), ("act_range", "max"),
                                        ("percentile", 0.3), ("min_reduction", 1.5), ("skip", "conv_in")])
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(RecipeError, match=key):
        load_recipe({"dtype": "bf16", "steps": [{"type": "decoder-int8", key: value}]})


def test_skip_pattern_matching_nothing_is_refused(ref_dir):
    with pytest.raises(ValueError, match="match no decoder convolution"):
        apply_recipe(fresh(ref_dir), load_recipe({"dtype": "bf16", "steps": [{**ALL, "skip": ["up.9.*"]}]}))


@pytest.mark.slow
def test_save_load_round_trip_with_transformer_quantization(ref_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("litevar.quant.kernels._compiled", lambda: None)  # the unfused AdaLN path: no compiling
    steps = [{"type": "stwq", "w_symmetric": True, "execution": "int8", "calib_samples": 2, "rows_per_group": 16},
             {**ALL, "skip": ["conv_out"]}]
    recipe = load_recipe({"dtype": "bf16", "steps": steps})
    pipe = apply_recipe(fresh(ref_dir), recipe)
    save_quantized(pipe, recipe, tmp_path / "q")
    loaded, loaded_recipe = load_quantized(tmp_path / "q")
    assert loaded_recipe.fingerprint() == recipe.fingerprint()
    assert isinstance(loaded.vae.decoder.up[1].upsample, Int8Upsample2x)
    a = pipe.generate([1, 2], seed=[0, 1], progress=False)
    b = loaded.generate([1, 2], seed=[0, 1], progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images) and not math.isnan(float(a.images.sum()))
