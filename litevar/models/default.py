"""The shipped models: small class-conditional transformers + one VQ-VAE trained on Fashion-MNIST by litevar.

``default`` is a VAR, ``default-mvar`` an M-VAR of the same depth, recipe and budget on the same VQ-VAE,
``default-d2`` a depth-2 VAR on it (draft-refine's refiner); each lives
in ``assets/<name>/`` (weights + ``model.json`` card) and is selected by name wherever a checkpoint is accepted.
"""
from __future__ import annotations

import json
from pathlib import Path

from .loading import CheckpointError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"default": "make default-model", "default-mvar": "make default-mvar",
           "default-d2": "make default-d2"}  # name -> the command that builds it
DEFAULT_DIR = ASSETS_DIR / "default"
CARD_FILE = "model.json"
VAR_FILE = "var.safetensors"
VAE_FILE = "vae.safetensors"


def is_shipped(var_ckpt: str | Path | None) -> bool:
    """Whether ``var_ckpt`` names a shipped model (None: the default one); an existing file of that name wins."""
    return var_ckpt is None or (str(var_ckpt) in SHIPPED and not Path(str(var_ckpt)).exists())


def default_model(folder: str | Path = "default") -> tuple[Path, Path, dict]:
    """(VAR file, VQ-VAE file, model card dict with ``config``, ``sampling``, ``metrics``, ``training``) of a shipped
    model name (``"default"``, ``"default-mvar"``) or of a folder laid out like ``assets/default``."""
    name = str(folder)
    folder = ASSETS_DIR / name if name in SHIPPED else Path(folder)
    if name not in SHIPPED and not folder.is_dir():
        raise CheckpointError(f"{name!r} is neither a shipped model ({', '.join(SHIPPED)}) nor a model folder")
    files = [folder / VAR_FILE, folder / VAE_FILE, folder / CARD_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        rebuild = SHIPPED.get(name, "litevar.train.ship")
        raise CheckpointError(f"the model {name} is missing from this install ({', '.join(missing)}); reinstall "
                              f"litevar, or rebuild it with `{rebuild}`")
    return files[0], files[1], json.loads(files[2].read_text())
