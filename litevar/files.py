"""Crash-safe file writes (write under a temporary name next to the target, then rename) and JSON-safe values."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``, so a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """JSON has no infinity: non-finite floats (e.g. PSNR of identical image sets) become "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
