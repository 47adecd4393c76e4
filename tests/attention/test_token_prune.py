"""The ``token-prune`` step: FastVAR-style cached token pruning of the late layers at chosen scales.

Keeping every token equals dense exactly (also through the gather/scatter path); pruning changes only the pruned
scales, runs fewer tokens through the pruned layers (their KV cache holds only those, FLOPs fall), restores the
pruned tokens from the previous scale's upsampled residual, composes with guidance, ASC, int8 KV storage and
quantization (static per-scale groups included) in either step order, and is refused with window plans,
kv-compress and on an M-VAR, naming both steps.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import litevar
from litevar.attention.calibrate import model_identity, save_plan
from litevar.attention.context import AttnContext
from litevar.attention.token_prune import PruneState, TokenPruneConfig, TokenPrunePlan
from litevar.attention.windows import WindowPlan
from litevar.eval.generation_flops import count_generation_flops
from litevar.attention.token_subset import tokens_of_scale
from litevar.quant.groups import TokenGroups
from litevar.recipe import Recipe, RecipeError, apply_recipe, build_pipeline

LABELS, SEEDS = [1, 4], [3, 4]
PRUNE_LAST = {"type": "token-prune", "scales": [-1], "from_layer": 1, "keep": 0.5}
PRUNE_TWO = {"type": "token-prune", "scales": [-2, -1], "from_layer": 0, "keep": [0.6, 0.4]}


def _build(ref_dir, steps_list):
    return build_pipeline({"dtype": "fp32", "steps": steps_list}, ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                          config=ref_dir / "tiny_config.json")


def _run(pipe):
    """Tokens, guided logits per scale, and the tokens each block saw per (layer, scale)."""
    logits, seen = [], {}

    def on_logits(si, logits_BlV):
        logits.append(logits_BlV.clone())

    def on_block(module, args):
        seen[(module.attn.block_idx, args[2].scale_index)] = args[0].shape[1]

    handles = [block.register_forward_pre_hook(on_block) for block in pipe.var.blocks]
    try:
        out = pipe.generate(LABELS, seed=SEEDS, progress=False, on_logits=on_logits)
    finally:
        for h in handles:
            h.remove()
    return out, logits, seen


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def dense(ref_dir):
    return _run(_build(ref_dir, []))


@pytest.mark.parametrize("step", [{**PRUNE_LAST, "keep": 1.0}, {**PRUNE_TWO, "keep": 1.0},
                                  {"type": "token-prune", "scales": [], "from_layer": 0}])
def test_keeping_every_token_equals_dense_exactly(ref_dir, dense, step):
    d_out, d_logits, d_seen = dense
    out, logits, seen = _run(_build(ref_dir, [step]))
    assert _same(out.tokens, d_out.tokens) and _same(logits, d_logits)
    assert torch.equal(out.images, d_out.images) and seen == d_seen


def test_the_gather_scatter_path_keeping_every_token_equals_dense_exactly(ref_dir, dense):
    """A plan that gathers all tokens (the step itself skips such scales) runs the pruned code path unchanged."""
    d_out, d_logits, _ = dense
    pipe = _build(ref_dir, [])
    patch_nums = pipe.config.var.patch_nums
    plan = TokenPrunePlan({3: 16, 4: 36}, 0, 2, "deviation", "area", tuple(patch_nums))
    pipe.set_attention("tokens", plan, by="token-prune")
    out, logits, _ = _run(pipe)
    assert _same(out.tokens, d_out.tokens) and _same(logits, d_logits)


@pytest.mark.parametrize("step", [PRUNE_LAST, PRUNE_TWO, {**PRUNE_TWO, "criterion": "upsampled",
                                                           "upsample": "bilinear", "until_layer": 1}])
def test_pruning_changes_only_the_pruned_scales_and_runs_fewer_tokens(ref_dir, dense, step):
    d_out, d_logits, d_seen = dense
    pipe = _build(ref_dir, [step])
    out, logits, seen = _run(pipe)
    plan = pipe.attention.tokens
    first = min(plan.kept)
    assert _same(out.tokens[:first], d_out.tokens[:first]) and _same(logits[:first], d_logits[:first])
    assert not _same(logits[first:], d_logits[first:])
    assert torch.isfinite(out.images).all()
    for (layer, si), tokens in seen.items():
        pruned = si in plan.kept and plan.first <= layer < plan.end
        assert tokens == (plan.kept[si] if pruned else d_seen[(layer, si)]), (layer, si)
    assert sum(seen.values()) < sum(d_seen.values())


def test_keep_rounds_to_tokens_and_the_kv_cache_holds_only_computed_keys(ref_dir):
    pipe = _build(ref_dir, [PRUNE_TWO])
    plan = pipe.attention.tokens
    assert plan.kept == {3: 10, 4: 14}  # 0.6 * 16 = 9.6 and 0.4 * 36 = 14.4, rounded
    caches = pipe.attention.make_caches(4, pipe.config.var, pipe.dtype, pipe.device)
    seq_len = pipe.config.var.seq_len
    assert [c.max_len for c in caches] == [seq_len - 6 - 22] * 2
    lengths = []
    original = pipe.attention.make_caches

    def spy(*args, **kwargs):
        made = original(*args, **kwargs)
        lengths.append(made)
        return made

    pipe.attention.make_caches = spy
    pipe.generate(LABELS, seed=SEEDS, progress=False)
    assert [c.length for c in lengths[0]] == [seq_len - 6 - 22] * 2


def test_flop_counter_sees_the_saved_work(ref_dir):
    dense = count_generation_flops(_build(ref_dir, []), LABELS, SEEDS)
    pruned = count_generation_flops(_build(ref_dir, [PRUNE_LAST]), LABELS, SEEDS)
    assert pruned["per_scale"][:-1] == dense["per_scale"][:-1]
    last_d, last_p = dense["per_scale"][-1], pruned["per_scale"][-1]
    assert last_p["linear"] < last_d["linear"] and last_p["attention"] < last_d["attention"]
    assert not pruned["uncounted"]


class _AddOne(nn.Module):
    """A block adding 1 to every token (its residual is the same for every token and scale)."""

    def __init__(self, rows_seen: list) -> None:
        super().__init__()
        self.rows_seen = rows_seen

    def forward(self, x, mod, ctx):
        self.rows_seen.append(x.shape[1])
        return x + 1


def test_restoration_adds_the_previous_scales_upsampled_residual():
    """With blocks whose residual is a constant, the restored tokens get exactly what the computed ones get; the
    two CFG rows of an image keep the same positions."""
    seen = []
    var = nn.Module()
    var.blocks = nn.ModuleList(_AddOne(seen) for _ in range(3))
    var.head_nm = lambda x, mod: x
    var.head = nn.Identity()
    plan = TokenPrunePlan.from_config(TokenPruneConfig(scales=[-1], from_layer=1, keep=0.25), (1, 2, 4), depth=3)
    state = PruneState()
    gen = torch.Generator().manual_seed(0)
    outs = []
    for si, pn in enumerate((1, 2, 4)):
        ctx = AttnContext(scale_index=si, cfg_batch=2)
        x = torch.randn(4, pn * pn, 8, generator=gen)
        outs.append((x, plan.forward_scale(var, x, [None] * 3, None, ctx, state)))
    assert seen[-2:] == [4, 4]  # layers 1 and 2 of the last scale: a quarter of 16 tokens
    for x, y in outs:
        torch.testing.assert_close(y, x + 3, rtol=0, atol=1e-6)
    index = plan._select(outs[-1][0], None, 2, cfg_batch=2)
    assert torch.equal(index[:2], index[2:]) and index.shape == (4, 4)
    with pytest.raises(RuntimeError, match="previous scale's hidden states"):
        plan.forward_scale(var, outs[-1][0], [None] * 3, None, AttnContext(scale_index=2), PruneState())


def test_token_groups_of_a_pruned_call_are_its_scales():
    groups = TokenGroups((1, 2, 3), "scale")
    with tokens_of_scale(2):
        assert groups.ids(5).tolist() == [2] * 5 and groups.call_group(5) == 2
    with pytest.raises(ValueError, match="matches no scale"):
        groups.ids(5)


@pytest.mark.parametrize("fields, message", [
    ({"keep": 0}, "keep must be a share"),
    ({"keep": 1.5}, "keep must be a share"),
    ({"keep": True}, "keep must be a share"),
    ({"keep": [0.5, 0.5]}, "one per scale"),
    ({"criterion": "random"}, "criterion must be one of"),
    ({"upsample": "cubic"}, "upsample must be one of"),
    ({"from_layer": -1}, "from_layer must be"),
    ({"from_layer": 2}, "from_layer 2 is outside the model's layers 0..1"),
    ({"from_layer": 1, "until_layer": 1}, "until_layer must be"),
    ({"until_layer": 3}, "until_layer 3 is past"),
    ({"scales": [5]}, "scale 5 is outside the model's scales 0..4"),
    ({"scales": [-6]}, "scale -6 is outside"),
    ({"scales": [0]}, "scale 0 cannot be pruned"),
    ({"scales": [-1, 4]}, "name scale 4 twice"),
    ({"scales": "last"}, "scales must be a list"),
])
def test_bad_settings_are_refused(ref_dir, fields, message):
    with pytest.raises((RecipeError, ValueError), match=message) as err:
        _build(ref_dir, [{**PRUNE_LAST, **fields}])
    assert "token-prune" in str(err.value)


@pytest.fixture(scope="module")
def plan_file(ref_dir, tmp_path_factory):
    pipe = _build(ref_dir, [])
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    windows = torch.full((cfg.depth, cfg.heads, K, K), 2, dtype=torch.int32)
    plan = WindowPlan(cfg.patch_nums, windows, "raster", full_query_scales=1, kept_key_scales=1,
                      model=model_identity(pipe.var))
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    save_plan(plan, path)
    return str(path)


@pytest.mark.parametrize("other", ["mdwa", "kv-compress"])
@pytest.mark.parametrize("order", [0, 1])
def test_refused_with_position_based_steps_naming_both(ref_dir, plan_file, other, order):
    step = {"type": "mdwa", "plan": plan_file} if other == "mdwa" else {"type": "kv-compress", "policy": "streaming",
                                                                         "ratio": 0.5}
    steps = [PRUNE_LAST, step]
    with pytest.raises(RecipeError, match=f"'token-prune' and '{other}' cannot run together"):
        _build(ref_dir, steps if order == 0 else steps[::-1])


def test_refused_on_an_mvar(ref_dir):
    pipe = litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth",
                                 config=ref_dir / "mvar_tiny_config.json")
    with pytest.raises(RecipeError, match="step 'token-prune' cannot run on an M-VAR"):
        apply_recipe(pipe, Recipe(steps=[PRUNE_LAST]))
    from litevar.attention.token_prune import _apply

    with pytest.raises(ValueError, match="cannot run on an M-VAR"):
        _apply(pipe, TokenPruneConfig(scales=[-1], from_layer=1))


OTHERS = {"guidance": {"type": "guidance", "skip_uncond_from": -1},
          "rtn": {"type": "rtn", "w_bits": 8, "a_bits": 8, "attn_bits": 8},
          # static token groups calibrated on, and applied to, calls over the kept tokens only
          "stwq": {"type": "rtn", "w_bits": 8, "a_bits": 8, "activations": "stwq", "calib_samples": 2},
          "asc": {"type": "asc", "mode": "output"}, "asc-map": {"type": "asc", "mode": "map"},
          "kv8": {"type": "kv-cache", "storage": "int8"}}


@pytest.mark.parametrize("other", sorted(OTHERS))
def test_composes_in_either_order_keeping_both_effects(ref_dir, other):
    step = OTHERS[other]
    alone = _build(ref_dir, [step]).generate(LABELS, seed=SEEDS, progress=False)
    forward = _build(ref_dir, [PRUNE_LAST, step])
    out, _, seen = _run(forward)
    again = _build(ref_dir, [step, PRUNE_LAST]).generate(LABELS, seed=SEEDS, progress=False)
    assert _same(out.tokens, again.tokens)  # the order does not matter
    if other != "stwq":  # static ranges shared across scales are calibrated on the pruned sampler: they differ
        assert _same(out.tokens[:-1], alone.tokens[:-1])  # the other step's effect on the unpruned scales
    assert seen[(1, 4)] == 18 and seen[(0, 4)] == 36  # and the pruning
    assert torch.isfinite(out.images).all()
    components = forward.attention.describe()
    assert components["tokens"]["kept"] == {"4": 18} and components["set_by"]["tokens"] == "token-prune"


def test_recipe_round_trip():
    recipe = litevar.load_recipe({"litevar_recipe": 1, "dtype": "fp32", "steps": [PRUNE_TWO]})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert dataclasses.asdict(recipe.steps[0])["keep"] == [0.6, 0.4]
