"""litevar sample: ADM .npz layout, deterministic bytes, chunked resume, run guard, torchrun parity, bad input."""
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from PIL import Image

from litevar.cli import main
from litevar.cli_args import image_name
from litevar.distributed import World, env_ranks
from litevar.recipe import build_pipeline
from litevar.jobs import JobList
from litevar.samples import RunOptions, export_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_args(ref_dir):
    return ["--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
            "--config", str(ref_dir / "tiny_config.json")]


def sample_args(model_args, out, *extra):
    return ["sample", *model_args, "--classes", "0,3", "--per-class", "3", "--batch-size", "2",
            "--no-progress", "--out", str(out), *extra]


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_chunks_are_dealt_round_robin():
    assert [j for j in range(5) if World(rank=1, size=2).owns(j)] == [1, 3]


def test_npz_round_trip_in_adm_layout_and_deterministic(tmp_path, model_args):
    out = tmp_path / "out"
    assert main(sample_args(model_args, out)) == 0
    npz = out / "samples_6x96x96x3.npz"
    jobs = JobList([0, 3], per_class=3).pairs()
    stacked = np.stack([png(out / "images" / image_name(*job)) for job in jobs])
    with np.load(npz) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 96, 96, 3)
        assert np.array_equal(data["arr_0"], stacked)
        assert data["arr_1"].dtype == np.int64 and data["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    with zipfile.ZipFile(npz) as archive:
        # the streamed arr_0 is exactly what np.save writes for the stacked array (what the ADM reader parses)
        reference = io.BytesIO()
        np.save(reference, stacked)
        assert archive.read("arr_0.npy") == reference.getvalue()
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert Image.open(out / "grid.png").size[1] == 2 * 96
    run = json.loads((out / "run.json").read_text())
    assert run["classes"] == [0, 3] and run["per_class"] == 3 and run["batch_size"] == 2
    assert run["recipe"]["dtype"] == "fp32" and run["sampling"]["top_k"] == 900
    before = snapshot(out)
    os.utime(npz, ns=(1, 1))
    assert main(sample_args(model_args, out)) == 0
    assert npz.stat().st_mtime_ns != 1, "the npz is rewritten on every run"
    assert snapshot(out) == before
    assert not list(out.rglob(".*.tmp"))


def test_resume_regenerates_only_missing_files_with_identical_bytes(tmp_path, model_args, capsys):
    out = tmp_path / "out"
    args = sample_args(model_args, out)
    assert main(args) == 0
    before = snapshot(out)
    images = out / "images"
    # chunk 1 = jobs 2,3 loses one file (half finished); chunk 2 = jobs 4,5 loses both; chunk 0 is complete
    removed = [images / image_name(0, 2), images / image_name(3, 4), images / image_name(3, 5)]
    for path in removed:
        path.unlink()
    (images / ".class0003_seed000004.png.tmp").write_bytes(b"half a file from a killed run")
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.glob("*.png")}
    for path in kept:
        os.utime(path, ns=(10**9, 10**9))
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    capsys.readouterr()
    assert main(args) == 0
    assert "(3 generated now, 3 already there)" in capsys.readouterr().out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept, "an existing image was rewritten"
    assert snapshot(out) == before
    assert not list(out.rglob(".*.tmp"))


def test_different_run_is_refused_unless_overwrite(tmp_path, model_args, capsys):
    out = tmp_path / "out"
    assert main(sample_args(model_args, out)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(sample_args(model_args, out, "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "differs in seed" in err and len(err.splitlines()) == 1
    assert main(sample_args(model_args, out, "--batch-size", "3")) == 2
    assert "differs in batch_size" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(sample_args(model_args, out, "--seed", "1", "--overwrite")) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert (out / "images" / image_name(3, 6)).exists()


def test_foreign_images_are_refused(tmp_path, model_args, capsys):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (96, 96)).save(out / "images" / image_name(0, 0))
    assert main(sample_args(model_args, out)) == 2
    assert "not made by litevar" in capsys.readouterr().err


def test_seeds_do_not_depend_on_batch_size(tmp_path, ref_dir):
    pipe = build_pipeline("fp32", ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", ref_dir / "tiny_config.json")
    jobs, quiet = JobList([2, 5], per_class=2, seed=7), RunOptions(progress=False)
    one = export_samples(pipe, tmp_path / "bs1", jobs, batch_size=1, options=quiet)
    four = export_samples(pipe, tmp_path / "bs4", jobs, batch_size=4, options=quiet)
    assert [p.name for p in one.images] == [p.name for p in four.images]
    assert one.generated == four.generated == 4
    for a, b in zip(one.images, four.images):
        # same seeds, same tokens; the decoder's GEMM rounding may move a pixel by a level or two
        assert np.abs(png(a).astype(np.int16) - png(b).astype(np.int16)).max() <= 2


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_processes_match_one_process_bytewise(tmp_path, model_args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # torchrun's per-rank default; the thread count can change float rounding
    single, multi = tmp_path / "single", tmp_path / "multi"
    cli = ["-m", "litevar.cli"]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    for out, launcher in ((single, []), (multi, torchrun)):
        done = subprocess.run([sys.executable, *launcher, *cli, *sample_args(model_args, out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote 6 images") == 1, "only rank 0 reports"
    assert sorted(snapshot(multi)) == sorted(snapshot(single))
    assert snapshot(multi) == snapshot(single)


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "0"], "--per-class must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--classes", "10"], "class id 10 out of range"),
    (["--classes", "x"], "--classes must be comma-separated integers"),
    (["--top-p", "2"], "top_p must be in [0, 1]"),
    (["--recipe", "RECIPE"], "unknown recipe keys ['colour']"),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, model_args, capsys, extra, message):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"litevar_recipe": 1, "dtype": "fp32", "steps": [], "colour": "blue"}))
    out = tmp_path / "out"
    args = ["sample", *model_args, "--no-progress", "--out", str(out), *extra]
    assert main([str(recipe) if a == "RECIPE" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, model_args, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(sample_args(model_args, blocker / "sub")) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_torchrun_environment_is_read_strictly():
    assert env_ranks({}) is None
    assert env_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ValueError, match="LOCAL_RANK not set"):
        env_ranks({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        env_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
