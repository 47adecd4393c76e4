"""HACK's offline head reordering: an exact permutation of the heads (tokens, images and logits of the original
model), window plans following it whichever step comes first, HACK's groups becoming slices, and the refusals
(quantized attention Linears, M-VAR, a KV policy already built)."""
from __future__ import annotations

import json

import pytest
import torch

from litevar.attention.calibrate import model_identity, save_plan
from litevar.attention.components import ComponentConflict, WindowSelection
from litevar.attention.windows import DROP, FULL, WindowPlan
from litevar.kvcompress.policies import HACK
from litevar.kvcompress.reorder import head_order, permute_heads_, reorder_heads_
from litevar.pipeline import random_pipeline
from litevar.recipe import apply_recipe, load_recipe

LABELS, SEEDS = [1, 4, 7], [3, 4, 5]
CONTEXTUAL = torch.tensor([[True, False, True, True], [True, False, True, False]])  # layer orders 1023, 1302


@pytest.fixture(scope="module")
def config(ref_dir):
    raw = json.loads((ref_dir / "tiny_config.json").read_text())
    raw["var"]["num_heads"] = 4  # head_dim 32; four heads so that the orders are not mere swaps
    return raw


def _pipe(config):
    """The tiny shape with seeded random weights and distinct per-head biases and q scales (so that a tensor left
    unpermuted shows)."""
    pipe = random_pipeline(config, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in pipe.var.blocks:
            attn = block.attn
            for tensor in (attn.q_bias, attn.zero_k_bias, attn.v_bias):
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=gen))
            attn.scale_mul_1H11.copy_(torch.rand(attn.scale_mul_1H11.shape, generator=gen).mul(2).add(0.5))
            attn.proj.bias.copy_(0.1 * torch.randn(attn.proj.bias.shape, generator=gen))
    return pipe


def _sample(pipe):
    logits = []
    out = pipe.generate(LABELS, seed=SEEDS, progress=False, on_logits=lambda si, x: logits.append(x.clone()))
    return out.tokens, out.images, logits


@pytest.fixture(scope="module")
def dense(config):
    return _sample(_pipe(config))


def _same(got, want, atol=1e-5):
    tokens, images, logits = got
    assert all(torch.equal(a, b) for a, b in zip(tokens, want[0]))
    torch.testing.assert_close(images, want[1], atol=atol, rtol=0)
    for a, b in zip(logits, want[2]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_head_order_puts_structural_heads_first_in_stable_order():
    assert head_order(CONTEXTUAL).tolist() == [[1, 0, 2, 3], [1, 3, 0, 2]]
    assert head_order(torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="bool"):
        head_order(torch.zeros(2, 4))


def test_reordering_is_exact_in_sampling_and_teacher_forcing(config, dense):
    original, pipe = _pipe(config), _pipe(config)
    identity = pipe.identity()
    mask = reorder_heads_(pipe, CONTEXTUAL)
    assert mask.tolist() == [[False, True, True, True], [False, False, True, True]]
    assert pipe.head_order.tolist() == [[1, 0, 2, 3], [1, 3, 0, 2]]
    assert pipe.identity() == identity != model_identity(pipe.var)  # the identity is of the weights as loaded
    _same(_sample(pipe), dense)
    vcfg = pipe.config.var
    x_BLCv = torch.randn(2, vcfg.seq_len - 1, vcfg.z_channels, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 10])
    torch.testing.assert_close(pipe.var(labels, x_BLCv), original.var(labels, x_BLCv), atol=1e-5, rtol=0)
    attn0 = pipe.var.blocks[0].attn  # head 0 of layer 0 is the original head 1
    assert torch.equal(attn0.scale_mul_1H11[0, 0], original.var.blocks[0].attn.scale_mul_1H11[0, 1])


def test_reordering_again_composes_and_the_same_mask_twice_changes_nothing(config):
    pipe, direct = _pipe(config), _pipe(config)
    reorder_heads_(pipe, CONTEXTUAL)
    once = {k: v.clone() for k, v in pipe.var.state_dict().items()}
    reorder_heads_(pipe, CONTEXTUAL)
    assert all(torch.equal(v, once[k]) for k, v in pipe.var.state_dict().items())
    other = torch.tensor([[False, True, True, False], [True, True, False, False]])
    assert reorder_heads_(pipe, other).tolist() == reorder_heads_(direct, other).tolist()
    assert torch.equal(pipe.head_order, direct.head_order)
    want = direct.var.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in pipe.var.state_dict().items())


def _plan(pipe, tmp_path):
    """A plan whose windows differ per head (DROP, widths 1-3, FULL), saved for the mdwa step."""
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    choices = torch.tensor([DROP, 1, 2, 3, FULL], dtype=torch.int32)
    pick = torch.randint(0, len(choices), (cfg.depth, cfg.heads, K, K), generator=torch.Generator().manual_seed(5))
    plan = WindowPlan(cfg.patch_nums, choices[pick], "raster", full_query_scales=1, kept_key_scales=1,
                      model=model_identity(pipe.var))
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    return plan, path


def _mdwa(pipe, path, backend):
    apply_recipe(pipe, load_recipe({"steps": [{"type": "mdwa", "plan": str(path), "backend": backend}]}))


@pytest.mark.parametrize("backend", ["masked", "auto"])
def test_a_window_plan_follows_the_heads_in_either_step_order(config, tmp_path, backend):
    reference = _pipe(config)
    plan, path = _plan(reference, tmp_path)
    _mdwa(reference, path, backend)
    want = _sample(reference)
    plan_first = _pipe(config)
    _mdwa(plan_first, path, backend)
    _sample(plan_first)  # the kernels' layouts are cached now: the reorder must not leave them stale
    reorder_heads_(plan_first, CONTEXTUAL)
    _same(_sample(plan_first), want)
    reorder_first = _pipe(config)
    reorder_heads_(reorder_first, CONTEXTUAL)
    _mdwa(reorder_first, path, backend)
    _same(_sample(reorder_first), want)
    assert torch.equal(plan_first.attention.selection.plan.windows, reorder_first.attention.selection.plan.windows)
    assert plan_first.attention.selection.plan.model == plan.model  # still the identity of the loaded weights
    unpermuted = _pipe(config)  # the control: the plan left in the original head order changes the model
    reorder_heads_(unpermuted, CONTEXTUAL)
    unpermuted.set_attention("selection", WindowSelection(plan), by="test")
    _, _, logits = _sample(unpermuted)
    assert max(float((a - b).abs().max()) for a, b in zip(logits, want[2])) > 1e-3


def test_hack_groups_become_slices_and_select_the_same_keys(config, tmp_path):
    original, pipe = _pipe(config), _pipe(config)
    vcfg = pipe.config.var
    _, path = _plan(original, tmp_path)  # the windows are re-indexed through the kept keys of each group
    _mdwa(original, path, "masked")
    budget = round(0.3 * vcfg.seq_len)  # ratio 0.7: keys are evicted
    original.set_attention("kv_policy", HACK(budget, vcfg.heads, vcfg.depth, CONTEXTUAL, max_len=vcfg.seq_len),
                           by="kv-compress")
    mask = reorder_heads_(pipe, CONTEXTUAL)
    _mdwa(pipe, path, "masked")
    pipe.set_attention("kv_policy", HACK(budget, vcfg.heads, vcfg.depth, mask, max_len=vcfg.seq_len), by="kv-compress")
    caches = pipe.attention.make_caches(2, vcfg, pipe.dtype, pipe.device)
    assert all(isinstance(group["index"], slice) for cache in caches for group in cache.groups)
    _same(_sample(pipe), _sample(original))
    with pytest.raises(ComponentConflict, match="before it is built"):
        reorder_heads_(pipe, CONTEXTUAL)


def test_quantized_attention_and_mvar_are_refused_before_any_change(config):
    pipe = _pipe(config)
    apply_recipe(pipe, load_recipe({"steps": [{"type": "rtn", "w_bits": 8, "a_bits": 8}]}))
    before = {k: v.clone() for k, v in pipe.var.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.mat_qkv is a \w+, not a plain Linear: head reordering "
                                         "must run before quantization"):
        reorder_heads_(pipe, CONTEXTUAL)
    assert pipe.head_order is None
    assert all(torch.equal(v, before[k]) for k, v in pipe.var.state_dict().items())
    from litevar.models.configs import MVARConfig
    from litevar.models.mvar import MVAR

    mvar = MVAR(MVARConfig(depth=2, width=128, heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=64,
                           z_channels=8))
    with pytest.raises(ValueError, match="M-VAR"):
        permute_heads_(mvar, torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match="permutation"):
        permute_heads_(_pipe(config).var, torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="contextual must be"):
        reorder_heads_(_pipe(config), CONTEXTUAL[:, :2])
