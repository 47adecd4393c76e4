"""M-VAR training (``train-var --arch mvar``): the loss goes down, a killed run resumes to the identical result, and
the trained file loads as an M-VAR."""
from __future__ import annotations

import pytest
import torch

import litevar
from litevar.models.configs import MVARConfig
from litevar.models.mvar import MVAR
from litevar.train.export import read_model
from litevar.train.loop import read_log
from litevar.train.var import VAR_WEIGHTS, train_var

from .test_train import fast, interrupted_after, stripes, trained_vae  # noqa: F401 - trained_vae is a fixture

MVAR_CFG = MVARConfig(depth=1, num_classes=2, patch_nums=(1, 2, 4), vocab_size=16, z_channels=8)


@pytest.mark.slow
def test_mvar_trains_resumes_identically_and_loads(tmp_path, monkeypatch, trained_vae):  # noqa: F811
    vae_file = trained_vae / "vae.safetensors"
    straight_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    train_var(stripes(), vae_file, MVAR_CFG, fast(8), straight_dir, progress=False)
    log = read_log(straight_dir / "log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]
    interrupted_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_var(stripes(), vae_file, MVAR_CFG, fast(8), resumed_dir, progress=False)
    monkeypatch.undo()
    train_var(stripes(), vae_file, MVAR_CFG, fast(8), resumed_dir, progress=False)
    a, meta = read_model(straight_dir / VAR_WEIGHTS)
    b, _ = read_model(resumed_dir / VAR_WEIGHTS)
    assert meta["mvar"]["d_state"] == 64 and "blocks.0.mamba.A_log" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    pipe = litevar.load_pipeline(straight_dir / VAR_WEIGHTS, vae_file)
    assert isinstance(pipe.var, MVAR) and pipe.config.var == MVAR_CFG
    assert pipe.generate([0, 1], seed=0, progress=False).images.shape == (2, 3, 8, 8)
