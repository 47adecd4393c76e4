"""The tiny M-VAR of tests/fixtures/upstream (random weights, upstream outputs; see the README there)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def mvar_reference(ref_dir):
    return torch.load(ref_dir / "mvar_tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def mvar_pipe(ref_dir):
    """The tiny M-VAR with its configuration inferred from the file (tests must not change it)."""
    import litevar
    return litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth")


@pytest.fixture
def fresh_mvar_pipe(ref_dir):
    """The tiny M-VAR loaded anew: for tests that configure it."""
    import litevar
    return litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth",
                                 config=ref_dir / "mvar_tiny_config.json")
