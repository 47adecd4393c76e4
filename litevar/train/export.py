"""Writing trained weights: safetensors with the config in the metadata, written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import reading, write_atomic


def save_model(path: str | Path, state: dict[str, torch.Tensor], meta: dict, dtype: torch.dtype | None = None) -> None:
    """Save a state_dict as ``.safetensors`` with ``meta`` (JSON) under the metadata key ``litevar``.

    Args:
        dtype: cast floating-point tensors to this dtype (e.g. float16 to halve the file), None keeps them.
    """
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items()}
    write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"litevar": json.dumps(meta)}))


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, litevar metadata) of a file written by :func:`save_model`."""
    from safetensors import safe_open

    from ..models.loading import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist; train it first or pass the right path")
    with reading(path, CheckpointError, "model file", "train it again or pass the right path"):
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("litevar", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        if not isinstance(meta, dict):
            raise CheckpointError("its litevar metadata is not a JSON object")
    return state, meta
