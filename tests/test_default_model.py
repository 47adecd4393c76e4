"""The shipped default model: loads with no arguments, and its samples are recognised by the classifier."""
from __future__ import annotations

import pytest

import litevar
from litevar.cli import main
from litevar.eval.classifier import load_classifier, predict
from litevar.models.default import default_model

CLASSES = list(range(10))


@pytest.fixture(scope="module")
def default_pipe():
    return litevar.load_pipeline()


def test_default_model_card_and_config(default_pipe):
    _, _, card = default_model()
    assert default_pipe.config.var.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert default_pipe.config.var.depth >= 4 and default_pipe.config.var.head_dim == 64
    assert default_pipe.sampling["cfg"] == card["sampling"]["cfg"]
    assert default_pipe.class_names[9] == "Ankle boot"


@pytest.mark.slow
def test_default_samples_are_their_class(default_pipe):
    out = default_pipe.generate(CLASSES * 2, seed=list(range(20)), progress=False)
    assert out.images.shape == (20, 3, 32, 32)
    predicted = predict(load_classifier(), out.images.mul(2).sub(1))
    agree = sum(int(p) == c for p, c in zip(predicted, CLASSES * 2))
    assert agree >= 14, f"only {agree}/20 samples classified as their conditioning class"


def test_generate_cli_uses_default_model(tmp_path):
    assert main(["generate", "--classes", "7", "--per-class", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "class0007_seed000000.png").exists() and (tmp_path / "grid.png").exists()


def test_vae_ckpt_without_var_ckpt_is_refused(tmp_path):
    with pytest.raises(litevar.CheckpointError, match="without var_ckpt"):
        litevar.load_pipeline(vae_ckpt=tmp_path / "vae.safetensors")
