"""Trainers on a tiny synthetic set: loss goes down, a killed run resumes to the identical result."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from litevar.models.configs import VARConfig, VQVAEConfig
from litevar.train import loop
from litevar.data import ImageSet
from litevar.train.export import read_model
from litevar.train.loop import TrainConfig, TrainingError, read_log
from litevar.train.vae import VAE_WEIGHTS, load_trained_vae, train_vae
from litevar.train.var import VAR_WEIGHTS, train_var

VAE_CFG = VQVAEConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                      using_mid_sa=False, patch_nums=(1, 2, 4))
VAR_CFG = VARConfig(depth=1, num_classes=2, patch_nums=(1, 2, 4), vocab_size=16, z_channels=8)


def stripes(n: int = 32, size: int = 8) -> ImageSet:
    """Class 0: horizontal stripes, class 1: vertical stripes, random phase."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        lines = (np.arange(size) + rng.integers(2)) % 2 * 255
        images[i] = (lines[:, None] if label == 0 else lines[None, :])[..., None].repeat(size, 0 if label else 1)[:size, :size]
    return ImageSet(images, labels.astype(np.int64), ("h", "v"))


def fast(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every_s=0,
                       bf16=False, **kw)


def interrupted_after(monkeypatch, step: int) -> None:
    original = loop.Trainer.update

    def update(self, loss, metrics):
        original(self, loss, metrics)
        if self.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "update", update)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    train_vae(stripes(), VAE_CFG, fast(12), out, progress=False)
    return out


def test_vae_loss_goes_down_and_files_written(trained_vae):
    log = read_log(trained_vae / "log.jsonl")
    assert len(log) == 12
    assert log[-1]["rec"] < 0.7 * log[0]["rec"]
    assert (trained_vae / "loss.png").stat().st_size > 0
    assert json.loads((trained_vae / "done.json").read_text())["steps"] == 12
    vae = load_trained_vae(trained_vae / VAE_WEIGHTS)
    assert vae.cfg == VAE_CFG


def test_vae_resume_is_identical(tmp_path, monkeypatch, trained_vae):
    interrupted_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_vae(stripes(), VAE_CFG, fast(12), tmp_path, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / VAE_WEIGHTS).exists()
    train_vae(stripes(), VAE_CFG, fast(12), tmp_path, progress=False)
    resumed, _ = read_model(tmp_path / VAE_WEIGHTS)
    straight, _ = read_model(trained_vae / VAE_WEIGHTS)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, 13))


def test_other_settings_in_same_folder_refused(trained_vae):
    with pytest.raises(TrainingError, match="different training run"):
        train_vae(stripes(), VAE_CFG, fast(13), trained_vae, progress=False)


def train_straight_and_resumed(tmp_path, monkeypatch, vae_file, cfg, steps: int, interrupt_at: int):
    """Train once straight and once interrupted after ``interrupt_at`` then resumed.

    Asserts the loss fell and the two runs give equal weights; returns (straight folder, metadata, weights).
    """
    straight_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    train_var(stripes(), vae_file, cfg, fast(steps), straight_dir, progress=False)
    log = read_log(straight_dir / "log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    interrupted_after(monkeypatch, interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        train_var(stripes(), vae_file, cfg, fast(steps), resumed_dir, progress=False)
    monkeypatch.undo()
    train_var(stripes(), vae_file, cfg, fast(steps), resumed_dir, progress=False)
    a, meta = read_model(straight_dir / VAR_WEIGHTS)
    b, _ = read_model(resumed_dir / VAR_WEIGHTS)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return straight_dir, meta, a


def test_var_trains_and_resumes_identically(tmp_path, monkeypatch, trained_vae):
    _, meta, _ = train_straight_and_resumed(tmp_path, monkeypatch, trained_vae / VAE_WEIGHTS, VAR_CFG, 10, 4)
    assert meta["var"]["depth"] == 1


def test_var_rejects_labels_beyond_classes(tmp_path, trained_vae):
    data = stripes()
    data.labels[0] = 5
    with pytest.raises(ValueError, match="labels up to 5"):
        train_var(data, trained_vae / VAE_WEIGHTS, VAR_CFG, fast(2), tmp_path, progress=False)


def test_ship_installs_a_loadable_model_with_card(tmp_path, trained_vae):
    from litevar.models.default import default_model
    from litevar.pipeline import load_pipeline
    from litevar.train.ship import ship, write_card

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "vae").symlink_to(trained_vae, target_is_directory=True)
    train_var(stripes(), trained_vae / VAE_WEIGHTS, VAR_CFG, fast(3), runs / "var", progress=False)
    dest = ship(runs, dest=tmp_path / "default", sampling={"cfg": 2.0}, class_names=("h", "v"))
    var_file, vae_file, card = default_model(dest)
    assert card["sampling"]["cfg"] == 2.0 and card["training"]["var"]["steps"] == 3
    pipe = load_pipeline(var_file, vae_file, config=card["config"])
    assert pipe.generate([0, 1], seed=[0, 1], progress=False).images.shape == (2, 3, 8, 8)
    quality_dir = tmp_path / "quality"
    quality_dir.mkdir()
    (quality_dir / "recon.json").write_text(json.dumps({"fd": 1.5, "precision": 0.5, "recall": 0.25,
                                                        "psnr_db": 30.0, "codebook_usage": 0.75}))
    text = write_card(dest, quality_dir).read_text()
    assert "| recon | 1.500 | 0.500 | 0.250 | PSNR 30.00 dB, codebook usage 75.0% |" in text
    assert json.loads((dest / "model.json").read_text())["metrics"]["recon"]["fd"] == 1.5


def test_ship_refuses_unfinished_runs(tmp_path):
    from litevar.models.loading import CheckpointError
    from litevar.train.ship import ship

    with pytest.raises(CheckpointError, match="no finished training run"):
        ship(tmp_path, dest=tmp_path / "default")
