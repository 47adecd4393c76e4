"""The ``guidance`` step: per-scale CFG weights, and the unconditional rows really dropped from a chosen scale on.

Off (or with upstream's defaults) it equals dense exactly; skipping the unconditional rows at the last scale keeps
every earlier scale's tokens, computes only the conditional rows there (attention, KV cache, every Linear) and
gives the conditional logits; it composes with MDWA, ASC, 8-bit attention, int8 KV storage and quantization in
either step order, and is refused with kv-compress (whose cache cannot change its batch) naming both steps.
"""
from __future__ import annotations

import pytest
import torch

from litevar.attention.calibrate import model_identity, save_plan
from litevar.attention.cfg_shared import SharingSchedule
from litevar.attention.guidance import GuidanceConfig, GuidanceSchedule
from litevar.attention.kv_cache import KVCache
from litevar.attention.windows import WindowPlan
from litevar.quant.calibrate import collect_input_stats
from litevar.recipe import RecipeError, build_pipeline

LABELS, SEEDS = [1, 4], [3, 4]
SKIP_LAST = {"type": "guidance", "skip_uncond_from": -1}


def _build(ref_dir, steps_list):
    return build_pipeline({"dtype": "fp32", "steps": steps_list}, ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                          config=ref_dir / "tiny_config.json")


def _run(pipe):
    """Tokens, the guided logits of every scale and the rows each Linear saw at the last scale."""
    logits, rows = [], []
    last = len(pipe.config.var.patch_nums) - 1

    def on_logits(si, logits_BlV):
        logits.append(logits_BlV.clone())

    def count(module, args):
        if args[0].dim() == 3 and args[0].shape[1] == pipe.config.var.patch_nums[-1] ** 2:
            rows.append(args[0].shape[0])

    linears = ("mat_qkv", "proj", "fc1", "fc2", "head")  # whatever module type a quantization step made them
    handles = [m.register_forward_pre_hook(count) for name, m in pipe.var.named_modules()
               if name.split(".")[-1] in linears]
    try:
        out = pipe.generate(LABELS, seed=SEEDS, progress=False, on_logits=on_logits)
    finally:
        for h in handles:
            h.remove()
    assert len(logits) == last + 1
    return out, logits, rows


@pytest.fixture(scope="module")
def dense(ref_dir):
    pipe = _build(ref_dir, [])
    conds = []
    handle = pipe.var.head.register_forward_hook(lambda m, a, out: conds.append(out[:len(LABELS)].float().clone()))
    try:
        result = _run(pipe)
    finally:
        handle.remove()
    return result, conds


@pytest.mark.parametrize("step", [{"type": "guidance"}, {"type": "guidance", "ramp": "linear", "interval": [0, -1]}])
def test_upstream_schedule_equals_dense_exactly(ref_dir, dense, step):
    (d_out, d_logits, _), _ = dense
    out, logits, _ = _run(_build(ref_dir, [step]))
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, d_out.tokens))
    assert all(torch.equal(a, b) for a, b in zip(logits, d_logits))
    assert torch.equal(out.images, d_out.images)


def test_skipping_the_last_scale_drops_its_unconditional_rows(ref_dir, dense):
    (d_out, d_logits, d_rows), d_cond = dense
    pipe = _build(ref_dir, [SKIP_LAST])
    out, logits, rows = _run(pipe)
    B = len(LABELS)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens[:-1], d_out.tokens[:-1]))
    assert all(torch.equal(a, b) for a, b in zip(logits[:-1], d_logits[:-1]))
    assert set(d_rows) == {2 * B} and set(rows) == {B}  # every Linear (qkv, proj, fc1, fc2, head) saw B rows
    torch.testing.assert_close(logits[-1], d_cond[-1], atol=1e-5, rtol=1e-5)  # the conditional logits
    assert pipe.var.blocks[0].attn.processor.trace[(0, len(pipe.config.var.patch_nums) - 1)]["rows"] == B


def test_schedule_shapes_and_where_rows_drop():
    s = GuidanceSchedule.from_config(GuidanceConfig(), scales=5)
    assert [s.weight(2.0, k) for k in range(5)] == [2.0 * (k / 4) for k in range(5)] and not s.drops_rows
    s = GuidanceSchedule.from_config(GuidanceConfig(ramp="constant", interval=[1, 2]), scales=5)
    assert [s.weight(2.0, k) for k in range(5)] == [0.0, 2.0, 2.0, 0.0, 0.0]
    assert s.uncond_until == 3  # after the interval no scale needs the unconditional rows
    s = GuidanceSchedule.from_config(GuidanceConfig(interval=[1, -1], skip_uncond_from=3), scales=5)
    assert s.uncond_until == 3 and s.weight(1.0, 4) == 0.0 and s.weight(1.0, 2) == 0.5


@pytest.mark.parametrize("step, message", [
    ({"ramp": "cosine"}, "ramp must be one of"),
    ({"interval": [3]}, "interval must be"),
    ({"interval": [2, 1]}, "is empty"),
    ({"interval": [0, 99]}, "interval end 99 is outside"),
    ({"skip_uncond_from": 1.5}, "skip_uncond_from must be"),
    ({"skip_uncond_from": -99}, "skip_uncond_from -99 is outside"),
])
def test_bad_settings_are_refused(ref_dir, step, message):
    with pytest.raises((RecipeError, ValueError), match=message):
        _build(ref_dir, [{"type": "guidance", **step}])


def test_kv_cache_takes_fewer_rows_as_its_first_rows():
    cache = KVCache(4, 2, 6, 3, torch.float32, "cpu")
    cache.append(torch.ones(4, 2, 2, 3), torch.ones(4, 2, 2, 3))
    k, v = cache.append(torch.full((2, 2, 1, 3), 2.0), torch.full((2, 2, 1, 3), 2.0))
    assert k.shape == (2, 2, 3, 3) and float(k[:, :, 2].min()) == 2.0 and cache.length == 3


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


OTHERS = {"mdwa": None, "asc": {"type": "asc", "mode": "output"}, "asc-map": {"type": "asc", "mode": "map"},
          "attn8": {"type": "rtn", "w_bits": 8, "a_bits": 8, "attn_bits": 8, "calib_samples": 2},
          "kv8": {"type": "kv-cache", "storage": "int8"}}


@pytest.mark.slow
@pytest.mark.parametrize("other", sorted(OTHERS))
def test_composes_in_either_order_keeping_both_effects(ref_dir, plan_file, other):
    step = OTHERS[other] or {"type": "mdwa", "plan": plan_file, "backend": "gathered"}
    alone = _build(ref_dir, [step]).generate(LABELS, seed=SEEDS, progress=False)
    forward, backward = _build(ref_dir, [SKIP_LAST, step]), _build(ref_dir, [step, SKIP_LAST])
    out, _, rows = _run(forward)
    again = backward.generate(LABELS, seed=SEEDS, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, again.tokens))  # the order does not matter
    assert all(torch.equal(a, b) for a, b in zip(out.tokens[:-1], alone.tokens[:-1]))  # the other step's effect
    assert set(rows) == {len(LABELS)}  # and guidance's
    report = forward.var.blocks[0].attn.processor.report()
    assert report["components"]["guidance"]["uncond_until"] == len(forward.config.var.patch_nums) - 1
    if other == "asc":
        assert report["output_shared_calls"] == report["calls"] - forward.config.var.depth  # none at the last scale


@pytest.mark.parametrize("order", [0, 1])
def test_refused_with_kv_compress_naming_both(ref_dir, order):
    steps = [SKIP_LAST, {"type": "kv-compress", "policy": "streaming", "ratio": 0.5}]
    with pytest.raises(RecipeError, match="'guidance'.*'kv-compress'"):
        _build(ref_dir, steps if order == 0 else steps[::-1])
    kept = _build(ref_dir, [{"type": "guidance", "ramp": "constant"}, steps[1]])  # no rows dropped: allowed
    assert kept.attention.kv_policy is not None


def test_similarity_schedule_treats_dropped_scales_as_shared():
    similarity = torch.tensor([[0.5, 0.99, float("nan")], [0.99, 0.99, float("nan")]])
    shared = SharingSchedule.from_similarity("output", similarity, 0.9).shared
    assert shared.tolist() == [[False, True, True], [True, True, True]]


def test_calibration_counts_dropped_scales_as_conditional(ref_dir):
    pipe = _build(ref_dir, [SKIP_LAST])
    stats = collect_input_stats(pipe, ["fc1"], samples=2, batch_size=2, progress=False)
    last = len(pipe.config.var.patch_nums) - 1
    rows = stats["blocks.0.ffn.fc1"].rows
    assert len(rows[1][last]) == 0 and len(rows[0][last]) > 0
