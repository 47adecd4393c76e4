"""Shared fixtures: the upstream reference data (read from ../shared/reference relative to the repo root)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REF = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    assert REF.is_dir(), f"reference data missing: expected {REF} (the project's shared/reference folder)"
    return REF


@pytest.fixture(scope="session")
def reference(ref_dir):
    return torch.load(ref_dir / "tiny_reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_pipe(ref_dir):
    import litevar
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
