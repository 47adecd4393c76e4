"""Shared fixtures: the upstream reference data in tests/fixtures/upstream (see the README there)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REF = Path(__file__).resolve().parent / "fixtures" / "upstream"


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    assert REF.is_dir(), f"reference data missing: expected {REF} (tests/fixtures/upstream of the repository)"
    return REF


@pytest.fixture(scope="session")
def reference(ref_dir):
    return torch.load(ref_dir / "tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_pipe(ref_dir):
    import litevar
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")


@pytest.fixture
def fresh_pipe(ref_dir):
    """The tiny reference model loaded anew: for tests that configure it (recipe steps, attention components)."""
    import litevar
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
