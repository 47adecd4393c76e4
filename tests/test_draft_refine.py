"""The ``draft-refine`` step: the recipe's model drafts the early scales, a refiner sharing its VQ-VAE the rest."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import litevar
from litevar import Recipe, RecipeError
from litevar.models.var import VAR
from litevar.recipe import apply_recipe

LABELS, SEEDS = [0, 3, 7], [0, 1, 2]
SCALES = 5  # the tiny model's pyramid (1, 2, 3, 4, 6)


def _files(ref_dir) -> dict:
    return {"refiner_vae": str(ref_dir / "tiny_vae.pth"), "refiner_config": str(ref_dir / "tiny_config.json")}


@pytest.fixture(scope="module")
def small_refiner(ref_dir, tmp_path_factory) -> dict:
    """A one-block VAR of half the width on the tiny model's VQ-VAE (seeded random weights, saved as a checkpoint)."""
    folder = tmp_path_factory.mktemp("refiner")
    config = json.loads((ref_dir / "tiny_config.json").read_text())
    config["var"].update(depth=1, embed_dim=64, num_heads=1)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    cfg = litevar.load_config(folder / "config.json")
    torch.save(VAR(cfg.var).state_dict(), folder / "refiner.pth")
    return {"refiner": str(folder / "refiner.pth"), "refiner_vae": str(ref_dir / "tiny_vae.pth"),
            "refiner_config": str(folder / "config.json")}


def _pipe(ref_dir, steps, recipe_dtype="fp32"):
    return litevar.build_pipeline(Recipe(dtype=recipe_dtype, steps=steps), ref_dir / "tiny_var.pth",
                                  ref_dir / "tiny_vae.pth", ref_dir / "tiny_config.json")


def _generate(pipe, **sampling):
    return pipe.generate(LABELS, seed=SEEDS, progress=False, **sampling)


def _same(a, b) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("from_scale", [0, 2, -1, SCALES])
def test_the_drafter_as_its_own_refiner_continues_bit_identically(ref_dir, tiny_pipe, from_scale):
    step = {"type": "draft-refine", "refiner": str(ref_dir / "tiny_var.pth"), "from_scale": from_scale,
            **_files(ref_dir)}
    _same(_generate(_pipe(ref_dir, [step])), _generate(tiny_pipe))


def test_all_scales_drafted_is_the_drafter_alone(ref_dir, tiny_pipe, small_refiner):
    pipe = _pipe(ref_dir, [{"type": "draft-refine", "from_scale": SCALES, **small_refiner}])
    _same(_generate(pipe), _generate(tiny_pipe))


def test_refining_from_scale_0_is_the_refiner_alone(ref_dir, small_refiner):
    refiner_alone = litevar.load_pipeline(small_refiner["refiner"], small_refiner["refiner_vae"],
                                          small_refiner["refiner_config"])
    pipe = _pipe(ref_dir, [{"type": "draft-refine", "from_scale": 0, **small_refiner}])
    _same(_generate(pipe), _generate(refiner_alone))


def test_drafted_scales_are_the_drafters_and_the_refiner_changes_the_rest(ref_dir, tiny_pipe, small_refiner):
    out = _generate(_pipe(ref_dir, [{"type": "draft-refine", "from_scale": 3, **small_refiner}]), top_k=1)
    dense = _generate(tiny_pipe, top_k=1)
    assert all(torch.equal(out.tokens[s], dense.tokens[s]) for s in range(3))
    assert not torch.equal(out.tokens[-1], dense.tokens[-1])


def test_composes_with_guidance_row_dropping(ref_dir, small_refiner):
    guidance = {"type": "guidance", "skip_uncond_from": -2}
    same = {"type": "draft-refine", "refiner": str(ref_dir / "tiny_var.pth"), "from_scale": -1, **_files(ref_dir)}
    _same(_generate(_pipe(ref_dir, [same, guidance])), _generate(_pipe(ref_dir, [guidance])))
    for from_scale in (2, 4):  # the refiner takes over before and after the rows are dropped
        step = {"type": "draft-refine", "from_scale": from_scale, **small_refiner}
        _same(_generate(_pipe(ref_dir, [step, guidance])), _generate(_pipe(ref_dir, [guidance, step])))


def test_composes_with_quantization_and_asc_in_any_order(ref_dir, small_refiner):
    specs = [{"type": "draft-refine", "from_scale": 3, **small_refiner}, {"type": "rtn", "w_bits": 8, "a_bits": 8},
             {"type": "asc", "mode": "output"}]
    outs = [_generate(_pipe(ref_dir, list(order))) for order in itertools.permutations(specs)]
    for out in outs[1:]:
        _same(out, outs[0])
    pipe = _pipe(ref_dir, specs)
    kinds = {name: {type(m).__name__ for m in var.modules()} for name, var in
             (("drafter", pipe.var), ("refiner", pipe.attention.refiner.var))}
    assert "QuantLinear" in kinds["drafter"] and "QuantLinear" not in kinds["refiner"]  # the recipe transforms the drafter


def test_token_pruning_of_refined_scales_is_refused_in_both_orders(ref_dir, small_refiner):
    prune = {"type": "token-prune", "scales": [-1], "from_layer": 1, "keep": 0.5}
    refine = {"type": "draft-refine", "from_scale": -2, **small_refiner}
    for steps in ([prune, refine], [refine, prune]):
        with pytest.raises(RecipeError, match="token-prune.*draft-refine|draft-refine.*token-prune"):
            _pipe(ref_dir, steps)
    early = {**prune, "scales": [2]}
    assert _pipe(ref_dir, [early, refine]).attention.refiner.from_scale == 3


def test_other_vae_weights_are_refused(ref_dir, small_refiner, tmp_path):
    vae = torch.load(ref_dir / "tiny_vae.pth", weights_only=True)
    vae = {k: v + 1 if k.startswith("decoder.conv_in") else v for k, v in vae.items()}
    torch.save(vae, tmp_path / "other_vae.pth")
    step = {"type": "draft-refine", **small_refiner, "refiner_vae": str(tmp_path / "other_vae.pth")}
    with pytest.raises(ValueError, match="other VQ-VAE weights.*decoder.conv_in"):
        _pipe(ref_dir, [step])


def test_mvar_drafter_or_refiner_is_refused(ref_dir, small_refiner):
    mvar = {"refiner": str(ref_dir / "mvar_tiny_var.pth"), "refiner_config": str(ref_dir / "mvar_tiny_config.json"),
            "refiner_vae": str(ref_dir / "tiny_vae.pth")}
    with pytest.raises(ValueError, match="is an M-VAR"):
        _pipe(ref_dir, [{"type": "draft-refine", **mvar}])
    mvar_pipe = litevar.load_pipeline(mvar["refiner"], mvar["refiner_vae"], mvar["refiner_config"])
    with pytest.raises(RecipeError, match="draft-refine.*M-VAR"):
        apply_recipe(mvar_pipe, Recipe(steps=[{"type": "draft-refine", **small_refiner}]))


@pytest.mark.parametrize("step, message", [
    ({"refiner": ""}, "refiner must name a model"),
    ({"refiner": "x.pth", "from_scale": 1.5}, "from_scale must be a scale index"),
    ({"refiner": "x.pth", "from_scale": 9}, "outside 0..5"),
    ({"refiner": "var-d16", "random_weights": True, "refiner_vae": "v.pth"}, "without refiner_vae"),
])
def test_bad_values_are_refused(ref_dir, step, message):
    with pytest.raises((RecipeError, ValueError), match=message):
        _pipe(ref_dir, [{"type": "draft-refine", **step}])
