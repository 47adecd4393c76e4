"""Attention components compose: every pair and the full stack, in either step order, keep each one's effect.

Components: key selection (mdwa), CFG output sharing (asc), 8-bit attention (rtn attn_bits) and int8 KV storage
(kv-cache). Each effect is measured, not assumed: attention FLOPs below dense (only kept pairs computed), the
conditional rows only computed where shared, every probability on the 8-bit softmax grid, the KV cache's bytes.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from litevar.attention.calibrate import model_identity, save_plan
from litevar.attention.cfg_shared import SharingSchedule
from litevar.attention.components import AttentionComponents, KVCacheSpec, WindowSelection
from litevar.attention.context import AttnContext
from litevar.attention.kv_cache import Int8KVCache
from litevar.attention.processor import ComposedAttnProcessor
from litevar.attention.windows import WindowPlan
from litevar.eval.generation_flops import count_generation_flops
from litevar.quant.attention import SOFTMAX_LEVELS, AttnPrecision
from litevar.quant.methods import RTNConfig
from litevar.quant.transform import quantize_
from litevar.recipe import STEPS, RecipeError, build_pipeline

LABELS, SEEDS = [1, 4], [3, 4]


@pytest.fixture(scope="module")
def plan_file(tiny_pipe, tmp_path_factory):
    """Narrow windows (2 keys per key scale) everywhere but the first scale: sparse enough that the gathered
    kernel computes fewer pairs than dense even on the tiny pyramid."""
    cfg = tiny_pipe.config.var
    K = len(cfg.patch_nums)
    windows = torch.full((cfg.depth, cfg.heads, K, K), 2, dtype=torch.int32)
    plan = WindowPlan(cfg.patch_nums, windows, "raster", full_query_scales=1, kept_key_scales=1,
                      model=model_identity(tiny_pipe.var))
    assert plan.kept_fraction() < 0.5
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    save_plan(plan, path)
    return str(path)


@pytest.fixture(scope="module")
def steps(plan_file):
    return {"mdwa": {"type": "mdwa", "plan": plan_file, "backend": "gathered"},
            "asc": {"type": "asc", "mode": "output"},
            "attn8": {"type": "rtn", "w_bits": 8, "a_bits": 8, "attn_bits": 8},
            "kv8": {"type": "kv-cache", "storage": "int8"}}


def _build(ref_dir, steps_list):
    return build_pipeline({"dtype": "fp32", "steps": steps_list}, ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                          config=ref_dir / "tiny_config.json")


def _measure(pipe):
    """One generation's tokens/images/KV bytes, its attention FLOPs, the processor's report and the probability
    calls seen by the precision component (every one checked to lie on the softmax grid)."""
    grid_checks = []
    precision = pipe.attention.precision
    if precision is not None:
        original = precision.quantize_probs

        def spy(probs):
            out = original(probs)
            grid_checks.append(bool(torch.equal(out * SOFTMAX_LEVELS, torch.round(out * SOFTMAX_LEVELS))))
            return out

        precision.quantize_probs = spy
    out = pipe.generate(LABELS, seed=SEEDS, progress=False, timings=True)
    report = pipe.var.blocks[0].attn.processor.report() if pipe.attention.owners else None
    flops = count_generation_flops(pipe, LABELS[:1], SEEDS[:1])
    return out, flops["attention"], report, grid_checks


@pytest.fixture(scope="module")
def dense(ref_dir):
    return _measure(_build(ref_dir, []))


COMBOS = [c for n in (2, 4) for c in itertools.combinations(("mdwa", "asc", "attn8", "kv8"), n)]


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_components_keep_their_effects_in_either_order(ref_dir, steps, dense, combo):
    forward = _build(ref_dir, [steps[name] for name in combo])
    backward = _build(ref_dir, [steps[name] for name in reversed(combo)])
    out, attn_flops, report, grid = _measure(forward)
    again = backward.generate(LABELS, seed=SEEDS, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, again.tokens))  # the order does not matter
    assert torch.equal(out.images, again.images)
    dense_out = dense[0]
    kernels = {k for per_layer in report["kernels"].values() for k in per_layer}

    if "mdwa" in combo:  # fewer attention FLOPs than the same recipe without the window plan
        _, unwindowed_flops, _, _ = _measure(_build(ref_dir, [steps[name] for name in combo if name != "mdwa"]))
        assert "gathered" in kernels and attn_flops < 0.8 * unwindowed_flops
    else:
        assert "gathered" not in kernels
    if "asc" in combo:
        assert report["output_shared_calls"] == report["calls"] > 0
    else:
        assert report["output_shared_calls"] == 0
    if "attn8" in combo:
        assert len(grid) >= report["calls"] and all(grid)
        assert forward.attention.owners["precision"] == "rtn"
    element = 4  # fp32 cache
    head_dim = forward.config.var.head_dim
    ratio = out.timings["kv_cache_bytes"] / dense_out.timings["kv_cache_bytes"]
    int8_ratio = (head_dim + element) / (element * head_dim)
    assert ratio == pytest.approx(int8_ratio if "kv8" in combo else 1.0)


def test_full_stack_equals_a_hand_composed_reference(tiny_pipe, plan_file):
    """One KV-cached layer call with all four components against the same arithmetic written out by hand."""
    from litevar.attention.calibrate import load_plan

    plan = load_plan(plan_file)
    cfg = tiny_pipe.config.var
    shared = torch.ones(cfg.depth, len(cfg.patch_nums), dtype=torch.bool)
    parts = AttentionComponents(selection=WindowSelection(plan), sharing=SharingSchedule("output", shared),
                                precision=AttnPrecision(8), kv=KVCacheSpec("int8"), kernel="gathered")
    processor = ComposedAttnProcessor(parts)
    attn, layer, B = tiny_pipe.var.blocks[1].attn, 1, 2
    g = torch.Generator().manual_seed(0)
    caches = [parts.kv.make(2 * B, cfg.heads, cfg.seq_len, cfg.head_dim, torch.float32, "cpu") for _ in range(cfg.depth)]
    ref_cache = Int8KVCache(B, cfg.heads, cfg.seq_len, cfg.head_dim, torch.float32, "cpu")
    precision = AttnPrecision(8)
    with torch.no_grad():
        for si, pn in enumerate(cfg.patch_nums):
            x = torch.randn(2 * B, pn * pn, cfg.width, generator=g)
            out = processor(attn, x, AttnContext(kv_caches=caches, scale_index=si, cfg_batch=B))
            q, k, v = attn.project_qkv(x[:B])
            k, v = ref_cache.append(k, v)
            q, k, v = precision.quantize_qkv(q, k, v)
            logits = (q @ k.transpose(-1, -2)) * attn.softmax_scale
            probs = logits.masked_fill(~plan.keep_mask(layer, si), -math.inf).softmax(-1)
            y = attn.project_out(precision.quantize_probs(probs) @ v)
            torch.testing.assert_close(out, torch.cat((y, y)), atol=1e-5, rtol=1e-5)
            assert processor.trace[(layer, si)]["rows"] == B


def test_two_steps_claiming_one_component_are_refused_naming_both(ref_dir, steps):
    with pytest.raises(RecipeError, match="'mdwa' and 'mdwa'"):
        _build(ref_dir, [steps["mdwa"], steps["asc"], steps["mdwa"]])
    with pytest.raises(RecipeError, match="'rtn' and 'litevar-mp'"):
        _build(ref_dir, [steps["attn8"], {"type": "litevar-mp", "attn_bits": 8}])
    with pytest.raises(RecipeError, match="'kv-cache' and 'kv-cache'"):
        _build(ref_dir, [steps["kv8"], {"type": "kv-cache", "storage": "model"}])


def test_a_plan_stays_tied_to_the_loaded_model_after_weight_transforms(fresh_pipe, plan_file):
    """A quantization applied first (through the API) changes the weights; the plan still matches the model."""
    quantize_(fresh_pipe, RTNConfig(w_bits=4, a_bits=None))
    assert model_identity(fresh_pipe.var) != fresh_pipe.identity()
    STEPS["mdwa"].handler(fresh_pipe, STEPS["mdwa"].config_cls(plan_file))
    assert fresh_pipe.attention.selection is not None
    assert fresh_pipe.generate(LABELS, seed=SEEDS, progress=False).images.shape[0] == 2
