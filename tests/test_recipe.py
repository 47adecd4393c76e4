import dataclasses
import json

import pytest
import torch

from litevar.recipe import Recipe, RecipeError, apply_recipe, build_pipeline, load_recipe
from litevar.registry import STEPS, register_step


@dataclasses.dataclass
class _Scale:
    factor: float = 2.0


def _scale_head(pipe, cfg):
    pipe.var.head.weight.mul_(cfg.factor)


@pytest.fixture
def scale_step():
    register_step("test-scale-head", _Scale, _scale_head)
    yield
    STEPS.pop("test-scale-head")


def test_precision_shorthands_and_round_trip(tmp_path, scale_step):
    assert load_recipe(None) == Recipe()
    assert load_recipe("bf16").dtype == "bf16"
    recipe = Recipe(dtype="bf16", steps=[{"type": "test-scale-head", "factor": 3.0}])
    assert recipe.name == "bf16+test-scale-head"
    recipe.save(tmp_path / "r.json")
    again = load_recipe(tmp_path / "r.json")
    assert again == recipe and again.steps[0] == _Scale(3.0)
    assert again.fingerprint() == recipe.fingerprint() != Recipe(dtype="bf16").fingerprint()


@pytest.mark.parametrize("raw, message", [
    ({"dtype": "int3"}, "dtype"),
    ({"dtype": "fp32", "window": 3}, "unknown recipe keys"),
    ({"litevar_recipe": 99}, "version"),
    ({"steps": [{"type": "nope"}]}, "unknown type 'nope'"),
    ({"steps": [{"factor": 2}]}, "\"type\" key"),
    ({"steps": [{"type": "test-scale-head", "facto": 2}]}, "unknown keys \\['facto'\\]"),
    ({"steps": "test-scale-head"}, "must be a list"),
])
def test_bad_recipes_are_rejected(raw, message, scale_step):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(raw)


def test_bad_recipe_sources(tmp_path):
    with pytest.raises(RecipeError, match="neither a precision"):
        load_recipe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{dtype: bf16")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")


def test_steps_apply_in_order(ref_dir, scale_step):
    args = dict(var_ckpt=ref_dir / "tiny_var.pth", vae_ckpt=ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
    dense = build_pipeline(None, **args)
    scaled = build_pipeline({"steps": [{"type": "test-scale-head", "factor": 2.0}] * 2}, **args)
    torch.testing.assert_close(scaled.var.head.weight, dense.var.head.weight * 4)
    with pytest.raises(RecipeError, match="load it in that dtype"):
        apply_recipe(dense, load_recipe("bf16"))
    assert json.loads(json.dumps(load_recipe("fp16").to_dict()))["dtype"] == "fp16"


def test_to_dict_equals_its_json():
    recipe = Recipe.from_dict({"steps": [{"type": "litevar-mp", "w_bits": 4, "a_bits": 8}]})
    as_dict = recipe.to_dict()
    assert as_dict["steps"][0]["keep"] == ["fc2"]
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert Recipe.from_dict(as_dict) == recipe
