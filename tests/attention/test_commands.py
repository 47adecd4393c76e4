"""litevar calibrate-attention / analyze-attention on the tiny reference model: files, plans, refusals, figures."""
import json

import pytest
import torch

from litevar.attention.analysis import collect_attention_maps
from litevar.attention.calibrate import load_plan
from litevar.attention.commands import STATS_FILE, load_stats
from litevar.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THRESHOLDS = ("0.5", "0.8", "0.95")


@pytest.fixture(scope="module")
def model_args(ref_dir):
    return ["--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
            "--config", str(ref_dir / "tiny_config.json")]


PLAN_ARGS = ["--full-query-scales", "1", "--kept-key-scales", "1", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, model_args):
    out = tmp_path_factory.mktemp("plans")
    assert main(["calibrate-attention", *model_args, "--samples", "4", "--batch-size", "2", "--threshold",
                 *THRESHOLDS, "--out", str(out), *PLAN_ARGS]) == 0
    return out


def test_calibrate_writes_plans_summary_and_stats(calibrated, tiny_pipe):
    summary = json.loads((calibrated / "calibration.json").read_text())
    assert summary["collection"]["samples"] == 4 and summary["collection"]["dtype"] == "bf16"
    entries = {e["file"]: e for e in summary["plans"]}
    assert len(entries) == 6 and (calibrated / STATS_FILE).is_file()
    for geometry in ("raster", "2d"):
        fractions = []
        for t in THRESHOLDS:
            name = f"plan_{geometry}_t{float(t):g}.json"
            plan = load_plan(calibrated / name, tiny_pipe.var)  # tied to the model, fp32 or bf16 alike
            entry = entries[name]
            assert plan.geometry == geometry and plan.meta["threshold"] == float(t)
            assert entry["kept_fraction"] == pytest.approx(plan.kept_fraction())
            assert entry["attention_flop_reduction"] == pytest.approx(1 - plan.kept_fraction())
            # pyramid (1,2,3,4,6) with 1 full query scale and 1 kept key scale: 4+3+2+1 blocks per (layer, head)
            assert entry["windowed_blocks"] == 2 * 2 * 10
            assert 0 <= entry["drop_blocks"] + entry["full_blocks"] <= entry["windowed_blocks"]
            fractions.append(plan.kept_fraction())
        assert fractions == sorted(fractions) and fractions[0] < 1.0


def test_from_stats_gives_identical_plans_without_generating(calibrated, tmp_path):
    out = tmp_path / "again"
    stats_file = calibrated / STATS_FILE
    assert main(["calibrate-attention", "--from-stats", str(stats_file), "--threshold", *THRESHOLDS,
                 "--out", str(out), *PLAN_ARGS]) == 0
    for name in sorted(p.name for p in calibrated.glob("plan_*.json")):
        assert json.loads((out / name).read_text()) == json.loads((calibrated / name).read_text())
    stats, collection = load_stats(out / STATS_FILE)
    assert collection["samples"] == 4 and stats.patch_nums == (1, 2, 3, 4, 6)
    # more plans in the same folder from its own statistics: the summary lists old and new
    assert main(["calibrate-attention", "--from-stats", str(out / STATS_FILE), "--threshold", "0.7",
                 "--geometry", "2d", "--out", str(out), *PLAN_ARGS]) == 0
    files = [e["file"] for e in json.loads((out / "calibration.json").read_text())["plans"]]
    assert len(files) == 7 and "plan_2d_t0.7.json" in files


def test_existing_plans_are_not_overwritten(calibrated, capsys):
    name = calibrated / "plan_raster_t0.8.json"
    before = name.read_text()
    args = ["calibrate-attention", "--from-stats", str(calibrated / STATS_FILE), "--threshold", "0.8",
            "--geometry", "raster", "--drop-share", "0.5", "--out", str(calibrated), *PLAN_ARGS]
    assert main(args) == 2
    assert str(name) in capsys.readouterr().err and name.read_text() == before
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(name.read_text())["meta"]["drop_share"] == 0.5
    assert main(args[:-len(PLAN_ARGS)] + ["--overwrite", "--drop-share", "0.02", *PLAN_ARGS]) == 0
    assert name.read_text() == before


@pytest.mark.parametrize("bad", [["--threshold", "1.5"], ["--threshold", "0"], ["--geometry", "hex"],
                                 ["--samples", "0"], ["--batch-size", "0"], ["--kept-key-scales", "0"]])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, model_args, bad, capsys):
    out = tmp_path / "out"
    assert main(["calibrate-attention", *model_args, "--samples", "2", "--out", str(out), *bad]) == 2
    assert capsys.readouterr().err.startswith("litevar: error: ") and not out.exists()


def test_from_stats_refuses_collection_settings(calibrated, tmp_path, capsys):
    assert main(["calibrate-attention", "--from-stats", str(calibrated / STATS_FILE), "--samples", "8",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--samples" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert main(["calibrate-attention", "--from-stats", str(tmp_path / "junk.safetensors"),
                 "--out", str(tmp_path / "x")]) == 2


def test_attention_maps_are_mean_probabilities_and_processors_are_restored(tiny_pipe):
    before = [block.attn.processor for block in tiny_pipe.var.blocks]
    maps = collect_attention_maps(tiny_pipe, layers=[1], heads=[0, 1], scales=[2, 4], samples=2, batch_size=2,
                                  progress=False)
    assert sorted(maps) == [(1, 2), (1, 4)]
    assert maps[(1, 4)].shape == (2, 36, 1 + 4 + 9 + 16 + 36)
    assert torch.allclose(maps[(1, 4)].sum(dim=-1), torch.ones(2, 36), atol=1e-4)
    assert all(a is b for a, b in zip(before, [block.attn.processor for block in tiny_pipe.var.blocks]))


@pytest.mark.slow
def test_analyze_writes_figures_and_similarity(calibrated, tmp_path, model_args):
    out = tmp_path / "analysis"
    assert main(["analyze-attention", *model_args, "--samples", "2", "--batch-size", "2", "--layers", "0,1",
                 "--scales", "3,4", "--plan", str(calibrated / "plan_raster_t0.8.json"), "--out", str(out),
                 "--no-progress"]) == 0
    for name in ("attention_maps.png", "cfg_similarity.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    similarity = json.loads((out / "cfg_similarity.json").read_text())["similarity"]
    assert len(similarity) == 2 and all(len(row) == 5 for row in similarity)
    assert all(-1 <= v <= 1 for row in similarity for v in row)


def test_analyze_rejects_bad_indices(tmp_path, model_args, capsys):
    assert main(["analyze-attention", *model_args, "--layers", "0,5", "--out", str(tmp_path / "a")]) == 2
    assert "--layers" in capsys.readouterr().err
