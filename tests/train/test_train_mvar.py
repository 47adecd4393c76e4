"""M-VAR training (``train-var --arch mvar``): the loss goes down, a killed run resumes to the identical result, and
the trained file loads as an M-VAR."""
from __future__ import annotations

import pytest
import litevar
from litevar.models.configs import MVARConfig
from litevar.models.mvar import MVAR
from litevar.train.var import VAR_WEIGHTS

from .test_train import train_straight_and_resumed, trained_vae  # noqa: F401 - trained_vae is a fixture

MVAR_CFG = MVARConfig(depth=1, num_classes=2, patch_nums=(1, 2, 4), vocab_size=16, z_channels=8)


@pytest.mark.slow
def test_mvar_trains_resumes_identically_and_loads(tmp_path, monkeypatch, trained_vae):  # noqa: F811
    vae_file = trained_vae / "vae.safetensors"
    straight_dir, meta, a = train_straight_and_resumed(tmp_path, monkeypatch, vae_file, MVAR_CFG, 8, 3)
    assert meta["mvar"]["d_state"] == 64 and "blocks.0.mamba.A_log" in a
    pipe = litevar.load_pipeline(straight_dir / VAR_WEIGHTS, vae_file)
    assert isinstance(pipe.var, MVAR) and pipe.config.var == MVAR_CFG
    assert pipe.generate([0, 1], seed=0, progress=False).images.shape == (2, 3, 8, 8)


def test_ship_installs_an_mvar_selectable_by_name(tmp_path, monkeypatch, trained_vae):  # noqa: F811
    from litevar.models import default as shipped
    from litevar.models.loading import CheckpointError
    from litevar.train.ship import ship, write_card
    from litevar.train.var import train_var

    from .test_train import fast, stripes

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "vae").symlink_to(trained_vae, target_is_directory=True)
    train_var(stripes(), trained_vae / "vae.safetensors", MVAR_CFG, fast(3), runs / "mvar",
              progress=False)
    with pytest.raises(CheckpointError, match="no finished training run"):
        ship(runs, dest=tmp_path / "assets" / "default")  # there is no runs/var
    monkeypatch.setattr(shipped, "ASSETS_DIR", tmp_path / "assets")
    with pytest.raises(CheckpointError, match="default-mvar is missing.*make default-mvar"):
        litevar.load_pipeline("default-mvar")
    dest = ship(runs, dest=tmp_path / "assets" / "default-mvar", class_names=("h", "v"), model="mvar")
    card = shipped.default_model("default-mvar")[2]
    assert card["name"] == "litevar-fashion-mnist-mvar-d1" and set(card["config"]) == {"mvar", "vae"}
    assert card["training"]["mvar"]["steps"] == 3 and card["command"] == "make default-mvar"
    pipe = litevar.load_pipeline("default-mvar")
    assert isinstance(pipe.var, MVAR) and pipe.sampling["cfg"] == 1.5 and pipe.class_names == ["h", "v"]
    with pytest.raises(CheckpointError, match="brings its own VQ-VAE"):
        litevar.load_pipeline("default-mvar", trained_vae / "vae.safetensors")
    quality = tmp_path / "quality"
    quality.mkdir()
    text = write_card(dest, quality).read_text()
    assert "M-VAR (intra-scale attention + Mamba-2" in text
    assert f"litevar quality generated --var-ckpt {dest.name}" in text
