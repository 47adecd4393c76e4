"""Integer kernels equal the fake-quant oracle; quantized models round-trip through safetensors."""
from __future__ import annotations

import pytest
import torch

import litevar
from litevar.quant.groups import TokenGroups
from litevar.quant.io import load_quantized, save_quantized
from litevar.quant.modules import ActQuantizer, QuantLinear
from litevar.quant.primitives import QuantSpec
from litevar.quant.runtime import Int8Linear, onednn_int8_available, to_runtime
from litevar.recipe import RecipeError, apply_recipe, load_recipe


def _static_act(symmetric: bool) -> ActQuantizer:
    act = ActQuantizer(QuantSpec(8, symmetric, "tensor"), TokenGroups((1, 2, 3), "scale"))
    act.set_ranges(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([1.5, 2.5, 2.0]))
    return act


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_static_equals_fake_quant(symmetric, dtype):
    torch.manual_seed(0)
    ql = QuantLinear(torch.randn(48, 32, dtype=dtype), torch.randn(48, dtype=dtype), QuantSpec(8, True, "channel"),
                     _static_act(symmetric))
    il = Int8Linear.from_quant_linear(ql)
    for tokens in (1, 4, 9, 14):  # each KV-cached scale, then a teacher-forced call spanning every group
        x = torch.randn(2, tokens, 32, dtype=dtype) * 2
        ref, out = ql(x).float(), il(x).float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert (ref - out).abs().max() <= tol * ref.abs().max(), tokens


def test_int8_linear_dynamic_equals_fake_quant():
    torch.manual_seed(1)
    ql = QuantLinear(torch.randn(40, 64), torch.randn(40), QuantSpec(8, True, "channel"),
                     ActQuantizer(QuantSpec(8, True, "token")))
    x = torch.randn(3, 7, 64)
    ref, out = ql(x), to_runtime(ql)(x)
    assert (ref - out).abs().max() <= 1e-4 * ref.abs().max()


def test_int8_weights_are_int8():
    ql = QuantLinear(torch.randn(64, 64), None, QuantSpec(8, True, "channel"), ActQuantizer(QuantSpec(8, True, "token")))
    il = Int8Linear.from_quant_linear(ql)
    assert il.weight_int8.dtype == torch.int8
    assert il.weight_nbytes() <= 0.55 * 64 * 64 * 2  # vs bf16


def test_int_mm_fallback_matches_onednn(monkeypatch):
    if not onednn_int8_available():
        pytest.skip("no oneDNN int8 kernels in this build")
    torch.manual_seed(2)
    ql = QuantLinear(torch.randn(32, 64), torch.randn(32), QuantSpec(8, True, "channel"),
                     ActQuantizer(QuantSpec(8, True, "token")))
    il = Int8Linear.from_quant_linear(ql)
    x = torch.randn(40, 64)
    fast = il(x)
    monkeypatch.setattr("litevar.quant.runtime.onednn_int8_available", lambda: False)
    assert torch.allclose(il(x), fast, rtol=1e-5, atol=1e-5)


def test_int8_execution_refuses_what_it_cannot_run(tiny_pipe):
    for step, word in (({"type": "rtn", "w_bits": 6, "a_bits": 6, "execution": "int8"}, "W8A8"),
                       ({"type": "rtn", "execution": "int8"}, "w_symmetric"),
                       ({"type": "rotation", "w_symmetric": True, "execution": "int8"}, "rotation")):
        with pytest.raises((ValueError, RecipeError), match=word):
            apply_recipe(tiny_pipe, load_recipe({"dtype": "fp32", "steps": [step]}))


@pytest.mark.parametrize("step", [
    pytest.param({"type": "ptq4arvg", "w_symmetric": True, "execution": "int8", "calib_samples": 2,
                  "rows_per_group": 16}, marks=pytest.mark.slow),
    {"type": "smoothquant", "w_bits": 6, "a_bits": 6, "calib_samples": 2, "rows_per_group": 16},
    {"type": "rtn", "w_symmetric": True, "a_bits": None, "execution": "int8"},
])
def test_save_load_round_trip(ref_dir, tmp_path, step):
    def fresh():
        return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")

    recipe = load_recipe({"dtype": "fp32", "steps": [step]})
    pipe = apply_recipe(fresh(), recipe)
    save_quantized(pipe, recipe, tmp_path / "q")
    loaded, loaded_recipe = load_quantized(tmp_path / "q")
    assert loaded_recipe.fingerprint() == recipe.fingerprint()
    a = pipe.generate([1, 2], seed=[0, 1], progress=False)
    b = loaded.generate([1, 2], seed=[0, 1], progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)


def test_load_quantized_missing_folder(tmp_path):
    with pytest.raises(litevar.models.loading.CheckpointError, match="litevar quantize"):
        load_quantized(tmp_path)


def test_fused_fc1_gelu_fc2_matches_unfused():
    if not onednn_int8_available():
        pytest.skip("no oneDNN int8 kernels in this build")
    from litevar.models.var import FFN
    from litevar.quant.fusions import Int8GeluFFN

    torch.manual_seed(3)
    ffn = FFN(32, 128)
    fc1 = QuantLinear(ffn.fc1.weight, ffn.fc1.bias, QuantSpec(8, True, "channel"), _static_act(False))
    act2 = ActQuantizer(QuantSpec(8, False, "tensor"), TokenGroups((1, 2, 3), "first"))
    act2.set_ranges(torch.tensor([-0.2, -0.17]), torch.tensor([2.0, 3.0]))
    fc2 = QuantLinear(ffn.fc2.weight, ffn.fc2.bias, QuantSpec(8, True, "channel"), act2)
    ffn.fc1, ffn.fc2 = Int8Linear.from_quant_linear(fc1), Int8Linear.from_quant_linear(fc2)
    ffn = Int8GeluFFN(ffn)
    x = torch.randn(2, 9, 32)
    fused = ffn(x)
    assert ffn.fc1.gelu_into(x, ffn.fc2) is not None
    unfused = ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x), approximate="tanh"))
    # the fused path skips the intermediate rounding of the hidden activation: a few grid steps at most
    assert (fused - unfused).abs().max() <= 0.05 * unfused.abs().max()
    assert ffn.fc1.gelu_into(torch.randn(2, 14, 32), ffn.fc2) is None  # teacher forcing spans groups


def test_int8_linear_deepcopy_after_use():
    import copy

    ql = QuantLinear(torch.randn(8, 16), None, QuantSpec(8, True, "channel"), _static_act(False))
    il = Int8Linear.from_quant_linear(ql)
    x = torch.randn(2, 4, 16)
    y = il(x)  # packs the weight (an opaque oneDNN tensor where available)
    assert torch.equal(copy.deepcopy(il)(x), y)
