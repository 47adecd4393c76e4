import json

import pytest
import torch

from litevar.attention.calibrate import AttentionStats, collect_stats, load_plan, model_identity, save_plan
from litevar.attention.windows import DROP, FULL, PlanError


def test_hand_made_mass_gives_the_expected_windows():
    stats = AttentionStats((1, 2, 2), depth=1, heads=2, prob_floor=0.0)
    # scale 2 (2x2 queries) over keys [scale0 (1) | scale1 (4) | scale2 (4)] = 9 keys
    probs = torch.zeros(1, 2, 4, 9)
    probs[0, 0, :, 0] = 0.5
    probs[0, 0, torch.arange(4), 5 + torch.arange(4)] = 0.5  # head 0: own-scale diagonal only
    probs[0, 1, :, 0] = 0.99
    probs[0, 1, :, 5:] = 0.0025  # head 1: 1% spread evenly over its own scale
    stats.add(0, 2, probs)
    plan = stats.plan("raster", threshold=0.9, drop_share=0.02, full_query_scales=2, kept_key_scales=1)
    assert plan.windows[0, 0, 2, 2].item() == 1
    assert plan.windows[0, 1, 2, 2].item() == DROP
    assert plan.windows[0, 0, 2, 1].item() == DROP  # no mass on scale 1 at all
    keep = plan.keep_mask(0, 2)
    assert keep[0, :, 5:].equal(torch.eye(4, dtype=torch.bool)) and keep[:, :, 0].all()


def test_plans_grow_with_the_threshold_and_cover_everything_at_one(tiny_pipe):
    stats = collect_stats(tiny_pipe, samples=4, batch_size=2, prob_floor=0.0, progress=False)
    for geometry in ("raster", "2d"):
        fractions = [stats.plan(geometry, t, drop_share=0.0, full_query_scales=1, kept_key_scales=1).kept_fraction()
                     for t in (0.5, 0.8, 0.95)]
        assert fractions == sorted(fractions) and fractions[0] < 1.0
        full = stats.plan(geometry, 1.0, drop_share=0.0, full_query_scales=1, kept_key_scales=1)
        assert full.kept_fraction() == 1.0
    # calibration leaves the model's processors as they were
    out = tiny_pipe.generate([1], seed=[0], progress=False)
    assert out.images.shape[0] == 1


def test_plan_file_is_tied_to_the_model(tmp_path, tiny_pipe):
    stats = collect_stats(tiny_pipe, samples=2, batch_size=2, progress=False)
    plan = stats.plan("2d", 0.9, model=model_identity(tiny_pipe.var))
    save_plan(plan, tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json", tiny_pipe.var)
    assert torch.equal(again.windows, plan.windows) and again.meta["threshold"] == 0.9
    other = json.loads((tmp_path / "plan.json").read_text())
    other["model"]["weights_bf16_sha256"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(PlanError, match="another model"):
        load_plan(tmp_path / "other.json", tiny_pipe.var)
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PlanError, match="not a litevar window plan"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(PlanError, match="threshold"):
        stats.plan("raster", 1.5)
    assert FULL == -1
