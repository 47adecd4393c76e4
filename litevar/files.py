"""Crash-safe file writes (write under a temporary name next to the target, then rename), JSON-safe values, and
the parse boundary of reading files: every failure to parse a file's bytes becomes one error naming the file."""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

MAX_CAUSE_CHARS = 200
MAX_DEFLATE_RATIO = 1032  # deflate's largest possible inflation
NPY_VERSIONS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def user_cache_dir() -> Path:
    """litevar's per-user cache folder (built kernels, measured decoder choices): ``$LITEVAR_CACHE``, else
    ``~/.cache/litevar``. Nothing in it is needed for correctness: deleting it only costs rebuilding / measuring.

    Example:
        >>> user_cache_dir().name  # doctest: +SKIP
        'litevar'
    """
    return Path(os.environ.get("LITEVAR_CACHE") or Path.home() / ".cache" / "litevar")


class FileFormatError(ValueError):
    """A file whose bytes do not hold what litevar wrote there (truncated, corrupted or of another kind)."""


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


def error_cause(err: BaseException) -> str:
    """One line saying why parsing failed: the first line of the message (at most 200 characters), led by the
    exception type where the message alone would not say it (``KeyError: 'x'``)."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip()[:MAX_CAUSE_CHARS] if lines else ""
    if isinstance(err, ValueError) and text and not isinstance(err, UnicodeDecodeError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextmanager
def reading(path: str | Path, error: type[Exception], what: str, advice: str) -> Iterator[None]:
    """The parse boundary of one file: any exception raised inside becomes ``error`` naming ``path``.

    Bytes on disk are untrusted, so whatever the parsers raise on them (zip, pickle, JSON, npy, IndexError,
    KeyError, ...) is the file's fault: the message says which file, why in one line, and ``advice``.
    Errors of class ``error`` that already name the file pass unchanged.

    Args:
        path: the file being read.
        error: the project's error class for this kind of file (e.g. ``CheckpointError``).
        what: what the file should be, e.g. "window plan".
        advice: what to do, e.g. "make a new one with `litevar calibrate-attention`".

    Example:
        >>> with reading(path, PlanError, "window plan", "calibrate a new one"):  # doctest: +SKIP
        ...     raw = json.loads(path.read_text())
    """
    try:
        yield
    except error as err:
        if str(path) in str(err) and "\n" not in str(err):
            raise
        raise error(f"{what} {path}: {error_cause(err)}; {advice}") from None
    except Exception as err:  # noqa: BLE001 - the parse boundary: every failure on untrusted bytes is the file's
        raise error(f"{what} {path} cannot be read ({error_cause(err)}); {advice}") from None


def _read_npy(fp, size: int, name: str) -> np.ndarray:
    """One ``.npy`` array from ``fp`` holding ``size`` bytes; its header's shape is checked against ``size``
    before anything is allocated, and arrays of Python objects are refused (never unpickled)."""
    version = np.lib.format.read_magic(fp)
    if version not in NPY_VERSIONS:
        raise ValueError(f"{name}: unsupported .npy format version {version}")
    shape, fortran_order, dtype = NPY_VERSIONS[version](fp)
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects, which litevar never unpickles")
    if any(n < 0 for n in shape):
        raise ValueError(f"{name}: negative dimension in shape {shape}")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > size:
        raise ValueError(f"{name}: its header claims {nbytes} bytes of data but the file holds at most {size}")
    array = np.empty(count, dtype=dtype)
    buffer = memoryview(array.view(np.uint8).reshape(-1))
    filled = 0
    while filled < nbytes:
        got = fp.readinto(buffer[filled:])
        if not got:
            raise ValueError(f"{name}: array data truncated ({filled} of {nbytes} bytes)")
        filled += got
    return array.reshape(shape, order="F" if fortran_order else "C")


def read_npy(path: str | Path, what: str, advice: str) -> np.ndarray:
    """The array of a ``.npy`` file; any failure is a :class:`FileFormatError` naming the file.

    Example:
        >>> feats = read_npy("features.npy", "feature cache", "delete it to compute the features again")  # doctest: +SKIP
    """
    path = Path(path)
    with reading(path, FileFormatError, what, advice), open(path, "rb") as fp:
        return _read_npy(fp, path.stat().st_size, path.name)


def read_npz(path: str | Path, what: str, advice: str, keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read eagerly (``np.load`` reads lazily, so its errors would surface
    later); any failure, or a missing one of ``keys``, is a :class:`FileFormatError` naming the file.

    Args:
        path: the ``.npz`` file.
        what: what it is, e.g. "reference cache".
        advice: what to do about a bad one, e.g. "delete it to generate the images again".
        keys: arrays that must be present.

    Example:
        >>> arrays = read_npz("samples.npz", "sample file", "sample again", keys=("arr_0",))  # doctest: +SKIP
    """
    path = Path(path)
    with reading(path, FileFormatError, what, advice), zipfile.ZipFile(path) as archive:
        size = path.stat().st_size
        arrays = {}
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            # A corrupt directory can claim any size: never believe more than the archive could inflate to.
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else MAX_DEFLATE_RATIO
            with archive.open(info) as fp:
                arrays[name] = _read_npy(fp, min(info.file_size, ratio * size), info.filename)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"missing arrays {missing}")
        return arrays
