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
