"""``litevar bench`` on the tiny reference model: report keys, ratios, FLOP equalities, bad inputs."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from litevar.cli import main
from litevar.eval import bench
from litevar.recipe import Recipe, RecipeError
from litevar.registry import STEPS, register_step

FLOP_KEYS = ("attention", "linear", "decoder", "other", "total")


def tiny_args(ref_dir) -> dict:
    return {"var_ckpt": ref_dir / "tiny_var.pth", "vae_ckpt": ref_dir / "tiny_vae.pth",
            "config": ref_dir / "tiny_config.json"}


@pytest.fixture(scope="module")
def reports(ref_dir):
    """fp32 vs fp32 and bf16 vs fp32, in this process (the spawned path is tested through the CLI below)."""
    common = dict(**tiny_args(ref_dir), batch=2, repeats=2, warmup=0, threads=1, isolate=False)
    return {name: bench.run_bench(name, "fp32", **common) for name in ("fp32", "bf16")}


@pytest.mark.slow
def test_report_has_every_key(reports):
    report = reports["bf16"]
    assert report["litevar_bench"] == 1
    for role in ("dense", "candidate"):
        variant = report[role]
        for key in ("images_per_s", "latency_s", "peak_memory_mb", "rss_before_load_mb", "kv_cache_bytes",
                    "per_scale_s", "stages_s", "weight_bytes", "flops"):
            assert key in variant, (role, key)
        assert all(variant["flops"][k] > 0 for k in FLOP_KEYS)
        assert len(variant["per_scale_s"]) == len(variant["patch_nums"]) == 5
        assert set(variant["stages_s"]) == {"transformer", "sampling", "decoder"}
        assert variant["latency_s"] > 0 and variant["images_per_s"] > 0 and variant["peak_memory_mb"] > 0
        assert variant["labels"] == [0, 1] and variant["seeds"] == [0, 1]
    assert report["dense"]["dtype"] == "float32" and report["candidate"]["dtype"] == "bfloat16"
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and isinstance(machine["cpu_flags"], list)
    assert report["settings"]["batch"] == 2 and report["settings"]["threads"] == 1


@pytest.mark.slow
def test_ratios_are_dense_over_candidate(reports):
    report = reports["bf16"]
    d, c, r = report["dense"], report["candidate"], report["ratios"]
    assert r["latency"] == pytest.approx(d["latency_s"] / c["latency_s"])
    assert r["throughput_time"] == pytest.approx(c["images_per_s"] / d["images_per_s"])
    assert r["peak_memory"] == pytest.approx(d["peak_memory_mb"] / c["peak_memory_mb"])
    assert r["kv_cache_bytes"] == 2.0
    for key in FLOP_KEYS:
        assert r["flops"][key] == 1.0, key
        assert d["flops"][key] == c["flops"][key], key


@pytest.mark.slow
def test_fp32_against_fp32_does_equal_work(reports):
    report = reports["fp32"]
    d, c = report["dense"], report["candidate"]
    assert all(d["flops"][k] == c["flops"][k] for k in FLOP_KEYS)
    assert d["flops"]["per_scale"] == c["flops"]["per_scale"]
    assert d["kv_cache_bytes"] == c["kv_cache_bytes"] and d["weight_bytes"] == c["weight_bytes"]
    assert report["ratios"]["kv_cache_bytes"] == 1.0


@pytest.mark.slow
def test_table_and_plot(reports, tmp_path):
    table = bench.format_table(reports["bf16"])
    assert "GFLOP/img attention" in table and "dense/cand" in table
    png = bench.write_report(reports["bf16"], tmp_path / "b.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "b.json").read_text())["ratios"]["kv_cache_bytes"] == 2.0


def test_default_output_name():
    assert str(bench.default_out(Recipe(dtype="bf16"))) == "benchmarks/results/bench_default_bf16.json"
    assert bench.default_out(Recipe(dtype="fp32"), shape="var-d16").name == "bench_var-d16_fp32.json"


def test_cli_writes_json_png_and_table(ref_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_isolated", lambda role, spec: bench.measure_variant(spec))
    out = tmp_path / "bench_tiny.json"
    code = main(["bench", "--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
                 "--config", str(ref_dir / "tiny_config.json"), "--recipe", "bf16", "--batch", "1", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["settings"]["isolated_processes"] is True and report["litevar_bench"] == 1
    assert out.with_suffix(".png").exists()
    assert "throughput, batch 1" in capsys.readouterr().out


@pytest.mark.slow
def test_variant_runs_in_its_own_spawned_process(ref_dir):
    spec = {**{k: str(v) for k, v in tiny_args(ref_dir).items()}, "shape": None, "device": "cpu", "threads": 1,
            "batch": 1, "repeats": 1, "warmup": 0, "seed": 0, "sampling": {}, "recipe": Recipe(dtype="fp32")}
    result = bench.run_isolated("dense", spec)
    assert result["pid"] != os.getpid()
    assert 0 < result["rss_before_load_mb"] <= result["peak_rss_mb"] == result["peak_memory_mb"]


@pytest.mark.parametrize("extra, message", [
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--warmup", "-1"], "--warmup"),
    (["--recipe", "int3"], "neither a precision"),
    (["--baseline", "int3"], "neither a precision"),
    (["--shape", "var-d16"], "not both"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_bad_inputs_are_refused(ref_dir, tmp_path, capsys, extra, message):
    args = ["bench", "--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
            "--out", str(tmp_path / "b.json"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(ref_dir):
    with pytest.raises(bench.UsageError, match="no CUDA GPU"):
        bench.run_bench("bf16", device="cuda", **tiny_args(ref_dir))


@dataclasses.dataclass
class NoOpStep:
    pass


def test_api_validation(ref_dir):
    with pytest.raises(RecipeError):
        bench.run_bench("nope.json", **tiny_args(ref_dir))
    register_step("bench-test-no-op", NoOpStep, lambda pipe, cfg: None)
    try:
        with pytest.raises(bench.UsageError, match="--baseline must be a precision"):
            bench.run_bench("bf16", baseline=Recipe(steps=(NoOpStep(),)), **tiny_args(ref_dir))
    finally:
        del STEPS["bench-test-no-op"]
