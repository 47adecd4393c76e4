"""The shipped default model: a small class-conditional VAR + VQ-VAE trained on Fashion-MNIST by litevar."""
from __future__ import annotations

import json
from pathlib import Path

from .loading import CheckpointError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"
CARD_FILE = "model.json"
VAR_FILE = "var.safetensors"
VAE_FILE = "vae.safetensors"


def default_model(folder: Path = DEFAULT_DIR) -> tuple[Path, Path, dict]:
    """(VAR file, VQ-VAE file, model card dict with ``config``, ``sampling``, ``metrics``, ``training``)."""
    files = [folder / VAR_FILE, folder / VAE_FILE, folder / CARD_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"the default model is missing from this install ({', '.join(missing)}); reinstall "
                              "litevar, or rebuild it with `make default-model`")
    return files[0], files[1], json.loads(files[2].read_text())
