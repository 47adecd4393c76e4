"""KV-cache compression: exact when nothing is evicted, memory allocated at the budget, each policy's selection on
hand-made scores, HACK's head classification, its file, composition with the other attention components."""
from __future__ import annotations

import pytest
import torch

from litevar.attention.calibrate import model_identity
from litevar.attention.kv_compressed import Candidates, SelectionContext, merged_values
from litevar.kvcompress.heads import (HeadFileError, classify, column_variance, load_heads, load_selectivity,
                                      measure_heads, natural_alpha, save_heads)
from litevar.kvcompress.policies import AMS, CLASSES, HACK, H2O, POLICIES, ScaleKV, SnapKV, Streaming
from litevar.kvcompress.steps import CALIBRATED
from litevar.recipe import RecipeError, build_pipeline

LABELS, SEEDS = [1, 4, 7], [3, 4, 5]


def _args(ref_dir):
    return dict(var_ckpt=ref_dir / "tiny_var.pth", vae_ckpt=ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")


@pytest.fixture(scope="module")
def heads_file(tiny_pipe, tmp_path_factory):
    variance, selectivity = measure_heads(tiny_pipe, samples=2, batch_size=2, progress=False)
    path = tmp_path_factory.mktemp("kv") / "heads.json"
    save_heads(path, variance, model_identity(tiny_pipe.var), samples=2, scale_selectivity=selectivity)
    return str(path)


def _step(policy, ratio, heads_file, **kw):
    step = {"type": "kv-compress", "policy": policy, "ratio": ratio, **kw}
    if policy in CALIBRATED:
        step["heads"] = heads_file
    return step


def _run(ref_dir, steps):
    return build_pipeline({"steps": steps}, **_args(ref_dir)).generate(LABELS, seed=SEEDS, progress=False, timings=True)


@pytest.fixture(scope="module")
def dense(ref_dir):
    return _run(ref_dir, [])


@pytest.mark.parametrize("policy", POLICIES)
def test_no_eviction_is_exactly_dense_and_reserves_less(ref_dir, dense, heads_file, policy):
    out = _run(ref_dir, [_step(policy, 0.0, heads_file)])
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, dense.tokens))
    torch.testing.assert_close(out.images, dense.images, atol=1e-5, rtol=0)
    # the last scale is attended, never stored: 30 of the tiny pyramid's 66 tokens are kept at most
    assert out.timings["kv_reserved_bytes"] < 0.5 * dense.timings["kv_reserved_bytes"]


@pytest.mark.parametrize("policy", POLICIES)
def test_reserved_bytes_follow_the_budget(ref_dir, heads_file, policy):
    full = _run(ref_dir, [_step(policy, 0.0, heads_file)]).timings
    cut = _run(ref_dir, [_step(policy, 0.8, heads_file)]).timings
    budget, stored = round(0.2 * 66), 30  # tokens per (row, head) of 66; 30 stored without eviction
    ratio = cut["kv_reserved_bytes"] / full["kv_reserved_bytes"]
    if policy in ("hack", "pyramidkv", "scalekv"):  # per-group / per-layer budgets average to the budget
        assert 0.2 < ratio < 0.75
    else:
        assert ratio == pytest.approx(budget / stored, rel=1e-6)
    assert cut["kv_cache_bytes"] <= cut["kv_reserved_bytes"]


def _ctx(scores, positions, budget, scale=2, history=None):
    scale_of = torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16)
    return SelectionContext(0, scale, 0, scores, positions, scale_of, budget,
                            scores if history is None else history)


def test_policies_select_what_they_promise():
    positions = torch.arange(14).view(1, 1, 14)  # scales 0, 1 (4 tokens), 2 (9 tokens)
    scores = torch.zeros(1, 1, 14)
    scores[0, 0, [3, 7, 9]] = torch.tensor([0.5, 0.9, 0.2])
    assert H2O(3, 1, 1).select(_ctx(scores, positions, 3, history=scores)).tolist() == [[[3, 7, 9]]]
    assert Streaming(6, 1, 1, sink_scales=1).select(_ctx(scores, positions, 6)).tolist() == [[[0, 9, 10, 11, 12, 13]]]
    # ams: the coarsest scale, then the newest scale whole, then the best of the scale that does not fit
    assert AMS(11, 1, 1, sink_scales=1).select(_ctx(scores, positions, 11)).tolist() == [[[0, 3, 5, 6, 7, 8, 9, 10,
                                                                                          11, 12, 13]]]
    snap = SnapKV(4, 1, 1, observation=2).select(_ctx(scores, positions, 4)).tolist()[0][0]
    assert {12, 13} <= set(snap) and 6 in snap  # its window's keys, then the best pooled: 6 sees 3, 7 and 9
    contextual = torch.tensor([[False, True]])
    hack = HACK(6, 2, 1, contextual, contextual_share=0.5)
    groups = hack.groups(0)
    assert [g.tolist() for g, _ in groups] == [[0], [1]] and groups[0][1] > groups[1][1]
    structural = hack.select(SelectionContext(0, 3, 0, scores, positions, _ctx(scores, positions, 1).scale_of, 7,
                                              scores))
    assert structural.tolist() == [[[0, 1, 2, 3, 4, 7, 9]]]  # scales 0-1 always, then the best of the rest
    ctx_head = hack.select(SelectionContext(0, 2, 1, scores, positions, _ctx(scores, positions, 1).scale_of, 2,
                                            scores))
    assert ctx_head.tolist() == [[[3, 7]]]  # contextual: the top-scoring keys, whatever their scale
    # no head keeps more than the pyramid: a capped structural budget goes to the contextual heads
    assert (HACK(30, 2, 1, contextual, contextual_share=0.5, max_len=30).groups(0)[1][1],
            HACK(15, 2, 1, contextual, contextual_share=0.5, max_len=30).groups(0)[1][1]) == (30, 10)


def test_scalekv_drafters_budgets_and_observation():
    selectivity = torch.tensor([[float("nan"), 0.3, 0.4], [float("nan"), 0.1, 0.2], [float("nan"), 0.5, 0.5],
                                [float("nan"), 0.4, 0.3]])
    policy = ScaleKV(100, 2, 4, selectivity, drafters=0.25, drafter_share=4.0, max_len=1000)
    assert policy.drafter.tolist() == [False, True, False, False]  # the least selective layer drafts
    budgets = [policy.groups(layer)[0][1] for layer in range(4)]
    assert budgets[1] == pytest.approx(4 * budgets[0], abs=4) and sum(budgets) == pytest.approx(400, abs=2)
    capped = ScaleKV(100, 2, 4, selectivity, drafters=0.25, drafter_share=4.0, max_len=150)
    assert capped.budget_d == 150 and capped.budget_r == round(250 / 3)  # what the cap takes goes to refiners
    # observers: the centres of a 4 x 4 grid of a 16 x 16 scale; a scale smaller than the grid is observed whole
    centres = [2, 6, 10, 14]
    assert policy.observation(256, "cpu").tolist() == [r * 16 + c for r in centres for c in centres]
    assert policy.observation(9, "cpu").tolist() == list(range(9))
    positions = torch.arange(30).view(1, 1, 30)  # scales 0-3 of the 1, 2, 3, 4 pyramid; scale 3 is 14..29
    scores = torch.zeros(1, 1, 30)
    scores[0, 0, 5] = 1.0
    kept = ScaleKV(17, 1, 1, selectivity[:1], max_len=30).select(_ctx(scores, positions, 17, scale=3)).flatten()
    assert 2 <= int(kept[0]) <= 8 and kept[1:].tolist() == list(range(14, 30))  # the observers' keys, then pooled


def test_merge_averages_evicted_values_into_the_most_similar_kept_key():
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]).view(1, 1, 4, 2)
    v = torch.tensor([[1.0], [10.0], [3.0], [20.0]]).view(1, 1, 4, 1)
    cand = Candidates(torch.tensor([0]), k, v, torch.arange(4).view(1, 1, 4))
    values, weight = merged_values(cand, torch.tensor([[[0, 1]]]), torch.tensor([[[1.0, 1.0, 3.0, 1.0]]]))
    assert values.flatten().tolist() == pytest.approx([(1 + 9) / 4, (10 + 20) / 2])  # key 2 joins 0, key 3 joins 1
    assert weight.flatten().tolist() == pytest.approx([4.0, 2.0])


def test_a_diagonal_head_has_more_column_variance_than_a_vertical_one():
    n = 16
    diagonal = torch.eye(n)
    vertical = torch.zeros(n, n)
    vertical[:, :2] = 0.5
    variance = column_variance(torch.stack((diagonal, vertical)).unsqueeze(0))[0]
    assert variance[0] > 10 * variance[1]
    assert classify(torch.stack((variance, variance.flip(0))), 0.5).tolist() == [[False, True], [True, False]]
    two_groups = torch.tensor([[1e-4, 1.2e-4, 1e-2, 1.1e-2]])
    assert natural_alpha(two_groups) == 0.5


def test_head_file_round_trip_and_wrong_model(tiny_pipe, heads_file, tmp_path):
    identity = model_identity(tiny_pipe.var)
    variance, alpha = load_heads(heads_file, identity)
    assert variance.shape == (2, 2) and 0 <= alpha <= 1
    selectivity = load_selectivity(heads_file, identity)
    assert selectivity.shape == (2, 5) and selectivity[:, 0].isnan().all() and (selectivity[:, 1:] > 0).all()
    with pytest.raises(HeadFileError, match="another model"):
        load_selectivity(heads_file, {**identity, "weights_bf16_sha256": "0" * 16})
    with pytest.raises(HeadFileError, match="another model"):
        load_heads(heads_file, {**identity, "weights_bf16_sha256": "0" * 16})
    with pytest.raises(HeadFileError, match="not found"):
        load_heads(tmp_path / "missing.json", identity)
    (tmp_path / "bad.json").write_text("{\"litevar_kv_heads\": 1, \"variance\": [[1]]}")
    with pytest.raises(HeadFileError, match="bad.json"):
        load_heads(tmp_path / "bad.json", identity)


@pytest.mark.parametrize("step, message", [
    ({"policy": "lru", "ratio": 0.5}, "policy must be one of"),
    ({"policy": "h2o", "ratio": 1.0}, "ratio"),
    ({"policy": "h2o", "ratio": -0.1}, "ratio"),
    ({"policy": "h2o", "ratio": "half"}, "ratio"),
    ({"policy": "hack", "ratio": 0.5}, "heads"),
    ({"policy": "h2o", "ratio": 0.5, "heads": "x.json"}, "heads"),
    ({"policy": "h2o", "ratio": 0.5, "cfg": "both"}, "cfg"),
    ({"policy": "h2o", "ratio": 0.5, "observation": 0}, "observation"),
    ({"policy": "scalekv", "ratio": 0.5}, "heads"),
    ({"policy": "h2o", "ratio": 0.5, "merge": "yes"}, "merge"),
    ({"policy": "h2o", "ratio": 0.5, "drafters": 0}, "drafters"),
    ({"policy": "h2o", "ratio": 0.5, "drafter_share": 0.5}, "drafter_share"),
    ({"policy": "h2o", "ratio": 0.5, "reorder": True}, "reorder"),
])
def test_bad_settings_are_refused(ref_dir, step, message):
    with pytest.raises(RecipeError, match=message):
        build_pipeline({"steps": [{"type": "kv-compress", **step}]}, **_args(ref_dir))


def test_composes_with_windows_sharing_and_quantization(ref_dir, heads_file, tmp_path):
    from litevar.attention.calibrate import save_plan
    from litevar.attention.windows import WindowPlan

    pipe = build_pipeline("fp32", **_args(ref_dir))
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    plan = WindowPlan(cfg.patch_nums, torch.full((cfg.depth, cfg.heads, K, K), 2, dtype=torch.int32), "raster",
                      full_query_scales=1, kept_key_scales=1, model=model_identity(pipe.var))
    save_plan(plan, tmp_path / "plan.json")
    mdwa = {"type": "mdwa", "plan": str(tmp_path / "plan.json"), "backend": "masked"}
    asc = {"type": "asc", "mode": "output"}
    for others in ([mdwa], [asc], [mdwa, asc]):  # nothing evicted: the windows re-indexed through kept positions
        alone = _run(ref_dir, others)
        compressed = _run(ref_dir, others + [_step("hack", 0.0, heads_file)])
        assert all(torch.equal(a, b) for a, b in zip(alone.tokens, compressed.tokens))
    full = [mdwa, asc, {"type": "rtn", "attn_bits": 8}, {"type": "kv-cache", "storage": "int8"},
            _step("hack", 0.7, heads_file)]
    out = _run(ref_dir, full)
    assert torch.isfinite(out.images).all()
    again = _run(ref_dir, full[::-1])
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, again.tokens))
    with pytest.raises(RecipeError, match="map sharing"):
        build_pipeline({"steps": [{"type": "asc", "mode": "map"}, _step("h2o", 0.5, heads_file)]}, **_args(ref_dir))
    shared = _run(ref_dir, [{"type": "asc", "mode": "map"}, _step("h2o", 0.0, heads_file, cfg="shared")])
    assert all(torch.equal(a, b) for a, b in zip(shared.tokens, _run(ref_dir, [{"type": "asc", "mode": "map"}]).tokens))


def test_no_eviction_is_exact_in_bf16_and_with_int8_storage(ref_dir, heads_file):
    def run(steps, dtype="fp32"):
        pipe = build_pipeline({"dtype": dtype, "steps": steps}, **_args(ref_dir))
        return pipe.generate(LABELS, seed=SEEDS, progress=False).tokens

    int8 = {"type": "kv-cache", "storage": "int8"}  # kept keys are re-stored each scale: must not drift
    assert all(torch.equal(a, b) for a, b in zip(run([int8]), run([int8, _step("hack", 0.0, heads_file)])))
    bf16 = run([], "bf16")
    assert all(torch.equal(a, b) for a, b in zip(bf16, run([_step("scalekv", 0.0, heads_file, merge=True)], "bf16")))


def test_reordered_heads_give_the_same_tokens_in_any_step_order(ref_dir, heads_file, tmp_path):
    from litevar.attention.calibrate import save_plan
    from litevar.attention.windows import WindowPlan

    pipe = build_pipeline("fp32", **_args(ref_dir))
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    windows = torch.randint(1, 4, (cfg.depth, cfg.heads, K, K), generator=torch.Generator().manual_seed(0))
    save_plan(WindowPlan(cfg.patch_nums, windows.int(), "raster", full_query_scales=1, kept_key_scales=1,
                         model=model_identity(pipe.var)), tmp_path / "plan.json")
    mdwa = {"type": "mdwa", "plan": str(tmp_path / "plan.json"), "backend": "masked"}
    plain = _run(ref_dir, [mdwa, _step("hack", 0.7, heads_file)]).tokens
    reordered = _step("hack", 0.7, heads_file, reorder=True)
    for steps in ([mdwa, reordered], [reordered, mdwa]):
        assert all(torch.equal(a, b) for a, b in zip(plain, _run(ref_dir, steps).tokens))
    rtn = {"type": "rtn", "w_bits": 8}
    quantized = [_run(ref_dir, steps).tokens for steps in ([reordered, rtn], [rtn, reordered])]
    assert all(torch.equal(a, b) for a, b in zip(*quantized))


def test_hack_spends_the_whole_budget_when_structural_heads_hit_the_cap(ref_dir, heads_file):
    # tiny pyramid: 30 storable tokens; at 60% removed the structural budget (32) is capped at 30 and the
    # contextual heads get the rest, so HACK reserves what a uniform policy with the same budget reserves
    hack = _run(ref_dir, [_step("hack", 0.6, heads_file)]).timings["kv_reserved_bytes"]
    uniform = _run(ref_dir, [_step("h2o", 0.6, heads_file)]).timings["kv_reserved_bytes"]
    assert hack == pytest.approx(uniform, rel=0.05)
