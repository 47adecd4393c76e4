"""litevar generate: files, grid, tokens, resume without rewriting, refusal to mix runs, one-line errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from litevar.cli import main
from litevar.cli_args import image_name


@pytest.fixture
def base_args(ref_dir):
    return ["generate", "--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
            "--top-k", "16", "--no-progress"]


def test_generate_writes_images_grid_and_tokens(tmp_path, base_args, tiny_pipe):
    out = tmp_path / "out"
    assert main(base_args + ["--classes", "2,7", "--per-class", "3", "--seed", "4", "--out", str(out),
                             "--save-tokens", str(tmp_path / "tok.pt"), "--batch-size", "4"]) == 0
    names = sorted(p.name for p in out.glob("class*.png"))
    assert names == sorted([image_name(2, s) for s in (4, 5, 6)] + [image_name(7, s) for s in (7, 8, 9)])
    assert (out / "grid.png").exists() and (out / "run.json").exists()
    tokens = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert tokens["labels"].tolist() == [2, 2, 2, 7, 7, 7] and tokens["seeds"].tolist() == [4, 5, 6, 7, 8, 9]
    direct = tiny_pipe.generate([7], seed=[8], top_k=16, progress=False)
    assert torch.equal(tokens["tokens.4"][4], direct.tokens[4][0])


def test_resume_skips_written_images(tmp_path, base_args):
    out = tmp_path / "out"
    args = base_args + ["--classes", "1", "--per-class", "3", "--out", str(out)]
    assert main(args) == 0
    kept = out / image_name(1, 0)
    removed = out / image_name(1, 2)
    before = np.asarray(Image.open(removed), dtype=np.int16)
    os.utime(kept, (1, 1))
    removed.unlink()
    assert main(args) == 0
    assert kept.stat().st_mtime == 1, "an existing image was rewritten"
    # its whole chunk of jobs is generated again, so the batch composition and the bytes are the same
    assert np.array_equal(np.asarray(Image.open(removed), dtype=np.int16), before)
    assert not list(out.glob(".*.tmp"))


def test_different_run_is_refused_unless_overwrite(tmp_path, base_args, capsys):
    out = tmp_path / "out"
    assert main(base_args + ["--classes", "1", "--out", str(out)]) == 0
    assert main(base_args + ["--classes", "1", "--out", str(out), "--cfg", "3"]) == 2
    assert "differs in cfg" in capsys.readouterr().err
    assert main(base_args + ["--classes", "1", "--out", str(out), "--cfg", "3", "--overwrite"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--classes", "10"], "class id 10 out of range"),
    (["--classes", "a,b"], "--classes must be comma-separated integers"),
    (["--classes", "1", "--cfg", "-1"], "cfg must be >= 0"),
    (["--classes", "1", "--top-p", "2"], r"top_p must be in [0, 1]"),
    (["--classes", "1", "--top-k", "-3"], "top_k must be an integer >= 0"),
    (["--classes", "1", "--per-class", "0"], "--per-class must be a positive integer, got 0"),
    (["--classes", "1", "--dtype", "fp8"], "unsupported dtype"),
])
def test_bad_arguments_fail_in_one_line_and_write_nothing(tmp_path, base_args, capsys, extra, message):
    out = tmp_path / "out"
    assert main(base_args + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, base_args, capsys):
    locked = tmp_path / "locked"
    locked.write_text("a file, not a folder")
    assert main(base_args + ["--classes", "1", "--out", str(locked / "sub")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_bad_checkpoint_in_cli(tmp_path, ref_dir, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    args = ["generate", "--var-ckpt", str(bad), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"), "--classes", "1",
            "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_with_a_recipe_matches_the_recipe_pipeline(tmp_path, base_args, ref_dir):
    import json

    from litevar import load_pipeline
    from litevar.recipe import apply_recipe, load_recipe

    step = {"type": "rtn", "w_bits": 6, "a_bits": 6}
    recipe_path = tmp_path / "rtn.json"
    recipe_path.write_text(json.dumps({"litevar_recipe": 1, "dtype": "fp32", "steps": [step]}))
    out = tmp_path / "out"
    args = base_args + ["--classes", "3", "--out", str(out), "--save-tokens", str(tmp_path / "tok.pt")]
    assert main(args + ["--recipe", str(recipe_path)]) == 0
    tokens = torch.load(tmp_path / "tok.pt", weights_only=True)
    fresh = load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
    quantized = apply_recipe(fresh, load_recipe(recipe_path))  # not the shared fixture: recipes act in place
    direct = quantized.generate([3], seed=[0], top_k=16, progress=False)
    assert all(torch.equal(tokens[f"tokens.{si}"][0], t[0]) for si, t in enumerate(direct.tokens))
    assert main(args) == 2  # the dense model into the same folder: refused, nothing overwritten
