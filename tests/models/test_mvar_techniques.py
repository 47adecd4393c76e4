"""Compression on M-VAR: quantization reaches Mamba-2's projections and folds into the right AdaLN chunks; ASC shares
the intra-scale attention across the CFG halves; steps that need attention across scales are refused with the conflict
named."""
import pytest
import torch

from litevar.quant.layers import absorb_input_transform, linear_layers
from litevar.quant.methods import RTNConfig
from litevar.quant.modules import QuantLinear
from litevar.quant.transform import quantize_
from litevar.recipe import Recipe, RecipeError, apply_recipe


def _logits(pipe, ref):
    with torch.no_grad():
        return pipe.var(ref["mvar.teacher_labels"], ref["mvar.teacher_input"])


def _sqnr_db(approx, exact):
    return float(10 * torch.log10(exact.pow(2).mean() / (approx - exact).pow(2).mean()))


def test_w8a8_fake_quant_covers_mamba_projections_with_bounded_error(fresh_mvar_pipe, mvar_reference):
    exact = _logits(fresh_mvar_pipe, mvar_reference)
    quantize_(fresh_mvar_pipe, RTNConfig(w_bits=8, a_bits=8))
    quantized = linear_layers(fresh_mvar_pipe.var)
    for name in ("blocks.0.mamba.in_proj", "blocks.1.mamba.out_proj", "blocks.0.attn.mat_qkv", "blocks.1.ffn.fc2"):
        assert isinstance(quantized[name], QuantLinear), name
    approx = _logits(fresh_mvar_pipe, mvar_reference)
    assert 25 < _sqnr_db(approx, exact) < 80  # 8-bit noise: clearly changed, clearly bounded
    out = fresh_mvar_pipe.generate([0, 3], seed=0, progress=False)
    assert torch.isfinite(out.images).all()


def test_mamba_projections_can_be_kept(fresh_mvar_pipe):
    quantize_(fresh_mvar_pipe, RTNConfig(w_bits=8, a_bits=8, keep=("in_proj", "out_proj")))
    layers = linear_layers(fresh_mvar_pipe.var)
    assert not isinstance(layers["blocks.0.mamba.in_proj"], QuantLinear)
    assert isinstance(layers["blocks.0.ffn.fc1"], QuantLinear)


@pytest.mark.parametrize("name", ["blocks.0.attn.mat_qkv", "blocks.1.mamba.in_proj", "blocks.0.ffn.fc1"])
def test_input_scale_folds_into_the_adaln_chunk_of_its_branch(fresh_mvar_pipe, mvar_reference, name):
    """M-VAR's 9-way AdaLN: a fold into the wrong chunk (VAR's 6-way indices) would change the function."""
    exact = _logits(fresh_mvar_pipe, mvar_reference)
    C = fresh_mvar_pipe.config.var.width
    scale = torch.linspace(0.5, 2.0, C)
    shift = torch.linspace(-0.1, 0.1, C) if "mamba" not in name else None  # in_proj has no bias to absorb a shift
    absorb_input_transform(fresh_mvar_pipe.var, name, shift, scale)
    torch.testing.assert_close(_logits(fresh_mvar_pipe, mvar_reference), exact, rtol=0, atol=2e-5)


@pytest.mark.parametrize("step", [{"type": "kv-cache", "storage": "int8"}, {"type": "mdwa", "plan": "plan.json"},
                                  {"type": "kv-compress", "policy": "h2o", "ratio": 0.5}])
def test_cross_scale_attention_steps_are_refused(fresh_mvar_pipe, step):
    with pytest.raises(RecipeError, match=f"step '{step['type']}' cannot run on an M-VAR") as err:
        apply_recipe(fresh_mvar_pipe, Recipe(steps=[step]))
    assert "\n" not in str(err.value) and "within each scale" in str(err.value)


def test_quantized_mvar_saves_and_loads_back_as_mvar(tmp_path, fresh_mvar_pipe, mvar_reference):
    from litevar.models.mvar import MVAR
    from litevar.quant.io import load_quantized, save_quantized

    recipe = Recipe(steps=[{"type": "rtn", "w_bits": 8, "a_bits": 8}])
    apply_recipe(fresh_mvar_pipe, recipe)
    folder = save_quantized(fresh_mvar_pipe, recipe, tmp_path / "q")
    loaded, loaded_recipe = load_quantized(folder)
    assert isinstance(loaded.var, MVAR) and loaded_recipe == recipe
    assert isinstance(linear_layers(loaded.var)["blocks.1.mamba.in_proj"], QuantLinear)
    torch.testing.assert_close(_logits(loaded, mvar_reference), _logits(fresh_mvar_pipe, mvar_reference),
                               rtol=0, atol=1e-6)


def test_var_refuses_an_mvar_config():
    from litevar.models.configs import from_name
    from litevar.models.var import VAR

    with torch.device("meta"), pytest.raises(TypeError, match="describes an M-VAR"):
        VAR(from_name("mvar-d16").var)


def test_sensitivity_studies_the_mamba_projections_by_default(ref_dir):
    from litevar.quant.sensitivity import SensitivitySettings, layer_sensitivity

    report = layer_sensitivity(SensitivitySettings(samples=2, low=(8, 2)), var_ckpt=ref_dir / "mvar_tiny_var.pth",
                               vae_ckpt=ref_dir / "tiny_vae.pth", config=ref_dir / "mvar_tiny_config.json",
                               progress=False)
    rows = {row["name"]: row for row in report["rows"]}
    assert {"in_proj", "out_proj"} <= set(report["settings"]["types"]) and {"in_proj", "out_proj"} <= set(rows)
    assert rows["in_proj"]["token_agreement"] < 1  # 2-bit activations of in_proj change the tokens


@pytest.mark.parametrize("mode", ["output", "map"])
def test_asc_shares_the_intra_scale_attention_and_leaves_the_conditional_rows_exact(fresh_mvar_pipe, mode):
    """With guidance 0 the unconditional rows do not reach the tokens, and no row sees another (attention within the
    scale per row, Mamba per row): ASC must give dense's tokens exactly while computing the shared attention once."""
    labels, seeds = [0, 3], [0, 1]
    dense = fresh_mvar_pipe.generate(labels, seed=seeds, cfg=0.0, progress=False)
    dense_guided = fresh_mvar_pipe.generate(labels, seed=seeds, cfg=4.0, progress=False)
    dense_logits = []
    fresh_mvar_pipe.score_tokens(labels, dense_guided.tokens, lambda si, lg: dense_logits.append(lg), cfg=4.0)
    apply_recipe(fresh_mvar_pipe, Recipe(steps=[{"type": "asc", "mode": mode}]))
    shared = fresh_mvar_pipe.generate(labels, seed=seeds, cfg=0.0, progress=False)
    assert torch.equal(torch.cat(shared.tokens, 1), torch.cat(dense.tokens, 1))
    report = fresh_mvar_pipe.var.blocks[0].attn.processor.report()
    depth, scales = fresh_mvar_pipe.config.var.depth, len(fresh_mvar_pipe.config.var.patch_nums)
    assert report["calls"] == depth * scales and report[f"{mode}_shared_calls"] == depth * scales
    logits = []
    fresh_mvar_pipe.score_tokens(labels, dense_guided.tokens, lambda si, lg: logits.append(lg), cfg=4.0)
    assert not torch.equal(logits[-1], dense_logits[-1])  # with guidance, the shared attention shows


@pytest.mark.parametrize("order", [("asc", "rtn"), ("rtn", "asc")])
def test_asc_and_w8a8_compose_in_either_order_on_mvar(ref_dir, order):
    import litevar

    runs = []
    for steps in (order, order[::-1]):
        pipe = litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth",
                                     config=ref_dir / "mvar_tiny_config.json")
        specs = {"asc": {"type": "asc"}, "rtn": {"type": "rtn", "w_bits": 8, "a_bits": 8}}
        apply_recipe(pipe, Recipe(steps=[specs[s] for s in steps]))
        assert isinstance(linear_layers(pipe.var)["blocks.0.mamba.in_proj"], QuantLinear)
        runs.append(pipe.generate([1, 2], seed=0, progress=False))
    assert torch.equal(runs[0].images, runs[1].images)


def test_int8_mamba_state_quarters_the_state_with_bounded_logit_error(ref_dir, fresh_mvar_pipe):
    import litevar

    labels = [0, 3]
    dense = fresh_mvar_pipe.generate(labels, seed=[0, 1], progress=False, timings=True)
    dense_logits = []
    fresh_mvar_pipe.score_tokens(labels, dense.tokens, lambda si, lg: dense_logits.append(lg))
    apply_recipe(fresh_mvar_pipe, Recipe(steps=[{"type": "mamba-state", "storage": "int8"}]))
    int8 = fresh_mvar_pipe.generate(labels, seed=[0, 1], progress=False, timings=True)
    assert int8.timings["mamba_state_bytes"] < 0.35 * dense.timings["mamba_state_bytes"]
    logits = []
    fresh_mvar_pipe.score_tokens(labels, dense.tokens, lambda si, lg: logits.append(lg))
    sqnr = _sqnr_db(torch.cat([lg.flatten() for lg in logits]), torch.cat([lg.flatten() for lg in dense_logits]))
    assert 25 < sqnr < 100  # changed by int8 rounding, and only slightly
    torch.testing.assert_close(logits[0], dense_logits[0], rtol=0, atol=0)  # the first scale reads a zero state

    var = litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
    with pytest.raises(RecipeError, match="'mamba-state' needs an M-VAR; this model is a VAR"):
        apply_recipe(var, Recipe(steps=[{"type": "mamba-state"}]))
    with pytest.raises(RecipeError, match="storage must be one of"):
        apply_recipe(fresh_mvar_pipe, Recipe(steps=[{"type": "mamba-state", "storage": "int4"}]))


def test_int8_state_composes_with_asc_and_w8a8_in_any_order(ref_dir):
    import itertools

    import litevar

    specs = {"state": {"type": "mamba-state"}, "asc": {"type": "asc"}, "rtn": {"type": "rtn", "w_bits": 8, "a_bits": 8}}
    images = []
    for order in itertools.permutations(specs):
        pipe = litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth",
                                     config=ref_dir / "mvar_tiny_config.json")
        apply_recipe(pipe, Recipe(steps=[specs[name] for name in order]))
        out = pipe.generate([1, 2], seed=0, progress=False, timings=True)
        assert pipe.attention.state == "int8" and pipe.attention.sharing is not None
        images.append(out.images)
    assert all(torch.equal(images[0], other) for other in images[1:])
