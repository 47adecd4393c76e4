"""Pictures of KV-cache compression: the recorder sees what the policy keeps and changes nothing, the figures and
their JSON are written by ``litevar analyze-attention --kv-recipe``, a recipe without kv-compress is refused."""
from __future__ import annotations

import json

import pytest
import torch

from litevar.attention.calibrate import model_identity
from litevar.cli import main
from litevar.kvcompress.figures import KeptKeysRecorder, draw_kept_keys, kept_keys_summary, record_kept_keys
from litevar.kvcompress.heads import measure_heads, save_heads
from litevar.recipe import build_pipeline

LABELS, SEEDS = [1, 4, 7], [3, 4, 5]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PATCH_NUMS = [1, 2, 3, 4, 6]  # the tiny model: 66 tokens, the first 30 stored


def _model(ref_dir):
    return dict(var_ckpt=ref_dir / "tiny_var.pth", vae_ckpt=ref_dir / "tiny_vae.pth",
                config=ref_dir / "tiny_config.json")


def _flags(ref_dir):
    return [f"--{k.replace('_', '-')}={v}" for k, v in _model(ref_dir).items()]


@pytest.fixture(scope="module")
def heads_file(tiny_pipe, tmp_path_factory):
    variance, selectivity = measure_heads(tiny_pipe, samples=2, batch_size=2, progress=False)
    path = tmp_path_factory.mktemp("kvfig") / "heads.json"
    save_heads(path, variance, model_identity(tiny_pipe.var), samples=2, scale_selectivity=selectivity)
    return str(path)


def test_recorder_records_what_streaming_keeps_and_changes_no_token(ref_dir, tmp_path):
    # budget round(0.2 * 66) = 13: scales 0, 1 fit (5 tokens); then sinks (scales 0, 1: positions 0-4) + newest 8
    pipe = build_pipeline({"steps": [{"type": "kv-compress", "policy": "streaming", "ratio": 0.8}]}, **_model(ref_dir))
    plain = pipe.generate(LABELS, seed=SEEDS, progress=False)
    policy = pipe.attention.kv_policy
    recorder = KeptKeysRecorder(policy, ratio=0.8, rows=len(LABELS))
    assert recorder.shared_rows is policy.shared_rows and recorder.describe() == policy.describe()
    pipe.attention.kv_policy = recorder
    recorded = pipe.generate(LABELS, seed=SEEDS, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(recorded.tokens, plain.tokens))
    record = recorder.record
    assert set(record.counts) == {(0, 2), (0, 3), (1, 2), (1, 3)}  # no selection while everything fits
    expected = {2: [0, 1, 2, 3, 4, *range(6, 14)], 3: [0, 1, 2, 3, 4, *range(22, 30)]}
    for scale, kept in expected.items():
        counts = record.counts[(1, scale)]
        assert record.rows[(1, scale)].tolist() == [3.0, 3.0]
        for head in range(2):
            assert torch.nonzero(counts[head]).flatten().tolist() == kept
            assert counts[head, kept].eq(3).all()
    share = record.share(0, 1, PATCH_NUMS)  # kept everything: scales 0-1 kept, later positions not generated
    assert share[:, :5].eq(1).all() and share[:, 5:].isnan().all() and share.shape == (2, 30)
    summary = kept_keys_summary(record, PATCH_NUMS, 2)
    entry = summary["layers"]["0"]["3"][1]
    assert entry["kept"] == 13 and entry["kept_by_scale"] == [1, 4, 0, 8] and entry["share_by_scale"][3] == 0.5
    assert summary["layers"]["0"]["1"][0]["selected"] is False and "type" not in entry
    draw_kept_keys(record, PATCH_NUMS, None, [0, 1], tmp_path / "kept.png")
    assert (tmp_path / "kept.png").read_bytes().startswith(PNG_SIGNATURE)


def test_hack_structural_heads_keep_first_and_newest_scales(ref_dir, heads_file):
    step = {"type": "kv-compress", "policy": "hack", "ratio": 0.7, "heads": heads_file}
    pipe = build_pipeline({"steps": [step]}, **_model(ref_dir))
    record = record_kept_keys(pipe, samples=2, batch_size=2, progress=False)
    assert pipe.attention.kv_policy.__class__.__name__ == "HACK"  # put back afterwards
    structural = ~pipe.attention.kv_policy.contextual
    for (layer, scale), rows in record.rows.items():
        share = record.share(layer, scale, PATCH_NUMS)
        for head in torch.nonzero(structural[layer] & (rows > 0)).flatten().tolist():
            assert share[head, :5].eq(1).all()  # sink scales 0 and 1
            begin = sum(p * p for p in PATCH_NUMS[:scale])
            assert share[head, begin:begin + PATCH_NUMS[scale] ** 2].eq(1).all()  # the newest scale


def test_analyze_attention_writes_kv_figures(ref_dir, heads_file, tmp_path):
    recipe = tmp_path / "hack.json"
    recipe.write_text(json.dumps({"dtype": "fp32", "steps": [{"type": "kv-compress", "policy": "hack", "ratio": 0.7,
                                                               "heads": heads_file}]}))
    out = tmp_path / "out"
    assert main(["analyze-attention", *_flags(ref_dir), "--samples", "2", "--batch-size", "2", "--dtype", "fp32",
                 "--scales", "4", "--kv-recipe", str(recipe), "--out", str(out), "--no-progress"]) == 0
    for name in ("attention_maps.png", "cfg_similarity.png", "kv_kept_keys.png", "kv_heads.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
    report = json.loads((out / "kv_kept_keys.json").read_text())
    assert report["policy"] == "hack" and report["ratio"] == 0.7 and report["samples"] == 2
    budgets = {"structural": report["kv_policy"]["budget_structural"],
               "contextual": report["kv_policy"]["budget_contextual"]}
    assert set(report["layers"]) == {"0", "1"} and set(report["layers"]["0"]) == {"0", "1", "2", "3"}
    for layer in report["layers"].values():
        for scale, entries in layer.items():
            assert len(entries) == 2 and len(entries[0]["share_by_scale"]) == int(scale) + 1
            for e in entries:
                stored = sum(p * p for p in PATCH_NUMS[:int(scale) + 1])
                assert e["kept"] == pytest.approx(budgets[e["type"]] if e["selected"] else stored)


@pytest.mark.parametrize("steps, says", [([], "no kv-compress step"),
                                         ([{"type": "kv-compress", "policy": "hack", "ratio": 0.5,
                                            "heads": "missing.json"}], "missing.json is not found")])
def test_analyze_attention_refuses_a_recipe_without_kv_compress(ref_dir, tmp_path, capsys, steps, says):
    recipe = tmp_path / "plain.json"
    recipe.write_text(json.dumps({"dtype": "fp32", "steps": steps}))
    out = tmp_path / "out"
    assert main(["analyze-attention", *_flags(ref_dir), "--kv-recipe", str(recipe), "--out", str(out),
                 "--no-progress"]) == 2
    assert says in capsys.readouterr().err
    assert not (out / "attention_maps.png").exists()  # refused before any generation
