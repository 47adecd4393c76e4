"""Every file reader, fed random bytes, mutated valid files and random or mutated JSON, either loads or raises the
project's one error class with a one-line message naming the file (never an IndexError from an unpickler, a
KeyError from metadata, a UnicodeDecodeError from a JSON file ...).

The fast tests run a few hundred cases per reader and input kind; the ``slow`` ones run at least 10,000 cases per
reader in total (``make test`` runs both; ``pytest -m "not slow"`` only the fast ones). Hypothesis runs
derandomized with no example database, so every run tries the same cases.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from litevar.attention.calibrate import AttentionStats, load_plan, save_plan
from litevar.attention.commands import load_stats, save_stats
from litevar.attention.windows import PlanError, WindowPlan
from litevar.cli_args import UsageError
from litevar.eval.classifier import FORMAT, ClassifierError, FashionClassifier, load_classifier
from litevar.files import FileFormatError, read_npy, read_npz
from litevar.models.loading import CheckpointError, read_state_dict
from litevar.pipeline import random_pipeline
from litevar.quant.io import load_quantized, read_quantized, save_quantized
from litevar.recipe import RecipeError, Recipe, apply_recipe, load_recipe
from litevar.train.export import read_model, save_model

MAX_RANDOM_BYTES = 4096
TINY_CONFIG = {
    "var": {"depth": 1, "embed_dim": 32, "num_heads": 1, "mlp_ratio": 1.0, "num_classes": 2, "patch_nums": [1, 2]},
    "vae": {"vocab_size": 8, "z_channels": 2, "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "share_quant_resi": 1,
            "using_sa": False, "using_mid_sa": False, "v_patch_nums": [1, 2]},
}


def _safetensors_header(data: bytes) -> int:
    """Bytes of a safetensors file before its tensor data (where mutations change the most)."""
    return 8 + int.from_bytes(data[:8], "little")


def _pth(folder: Path, legacy: bool) -> bytes:
    path = folder / ("legacy.pth" if legacy else "zip.pth")
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int8)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _safetensors(folder: Path) -> bytes:
    save_file({"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int8)}, str(folder / "v.safetensors"))
    return (folder / "v.safetensors").read_bytes()


def _model_file(folder: Path) -> bytes:
    save_model(folder / "model.safetensors", {"w": torch.ones(3)}, {"config": {"depth": 1}})
    return (folder / "model.safetensors").read_bytes()


def _classifier(folder: Path) -> bytes:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FashionClassifier((2, 2, 2), 3)
    metadata = {"format": FORMAT, "widths": "[2, 2, 2]", "num_classes": "3"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "c.safetensors"), metadata)
    return (folder / "c.safetensors").read_bytes()


def _plan_doc() -> dict[str, Any]:
    plan = WindowPlan.full((1, 2, 3), depth=1, heads=2, full_query_scales=1, kept_key_scales=1,
                           model={"depth": 1, "heads": 2}, meta={"threshold": 0.9})
    plan.windows[0, 1, 2, 1] = 2
    plan.windows[0, 0, 2, 2] = 0
    return {"litevar_window_plan": 1, **plan.to_state()}


def _recipe_doc() -> dict[str, Any]:
    steps = [{"type": "mdwa", "plan": "plan.json"}, {"type": "asc", "min_similarity": 0.5},
             {"type": "rtn", "w_bits": 4, "a_bits": None, "keep": ["head"], "overrides": {"fc2": [8, None]}},
             {"type": "decoder-int8", "skip": ["up.0.*"]}]
    return Recipe.from_dict({"name": "fuzz", "dtype": "bf16", "steps": steps}).to_dict()


def _stats(folder: Path) -> bytes:
    stats = AttentionStats((1, 2, 3), 1, 2)
    stats.queries += 1
    save_stats(stats, folder / "stats.safetensors", {"model": {"depth": 1}, "samples": 2})
    return (folder / "stats.safetensors").read_bytes()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((2, 2, 2, 3), np.uint8), labels=np.arange(2), settings=json.dumps({"cfg": 1.5}))
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(12, dtype=np.float32).reshape(3, 4))
    return buffer.getvalue()


def _quantized(folder: Path) -> Path:
    pipe = random_pipeline(TINY_CONFIG)
    recipe = load_recipe({"dtype": "fp32", "steps": [{"type": "rtn"}]})
    return save_quantized(apply_recipe(pipe, recipe), recipe, folder / "quantized")


@dataclass
class Reader:
    """A reader under test: ``read(path)`` must load or raise ``error`` naming the file."""

    read: Callable[[Path], Any]
    error: type[Exception]
    name: str  # the fuzzed file's name
    base: bytes  # a valid file of this kind
    hot: int | None = None  # mutate the first ``hot`` bytes (the header) in half of the edits
    doc: Any = None  # the valid file's JSON document, for JSON readers
    named: Callable[[Path], str] = str  # what the message must contain


@pytest.fixture(scope="module")
def readers(tmp_path_factory) -> dict[str, Reader]:
    folder = tmp_path_factory.mktemp("valid")
    quantized = _quantized(folder)
    var_bytes = (quantized / "var.safetensors").read_bytes()
    files = {"pth": _pth(folder, legacy=False), "legacy": _pth(folder, legacy=True), "st": _safetensors(folder),
             "model": _model_file(folder), "classifier": _classifier(folder), "stats": _stats(folder)}
    plan, recipe = _plan_doc(), _recipe_doc()
    found = {
        "checkpoint-pth": Reader(read_state_dict, CheckpointError, "ckpt.pth", files["pth"]),
        "checkpoint-legacy-pth": Reader(read_state_dict, CheckpointError, "ckpt.pth", files["legacy"], hot=512),
        "checkpoint-safetensors": Reader(read_state_dict, CheckpointError, "ckpt.safetensors", files["st"],
                                         _safetensors_header(files["st"])),
        "trained-model": Reader(lambda p: read_model(p), CheckpointError, "model.safetensors", files["model"],
                                _safetensors_header(files["model"])),
        "classifier": Reader(lambda p: load_classifier(p), ClassifierError, "classifier.safetensors",
                             files["classifier"], _safetensors_header(files["classifier"])),
        "plan": Reader(lambda p: load_plan(p), PlanError, "plan.json", json.dumps(plan).encode(), doc=plan),
        "recipe": Reader(load_recipe, RecipeError, "recipe.json", json.dumps(recipe).encode(), doc=recipe),
        "attention-stats": Reader(load_stats, UsageError, "attention_stats.safetensors", files["stats"],
                                  _safetensors_header(files["stats"])),
        "quantized": Reader(lambda p: read_quantized(p.parent), CheckpointError, "var.safetensors", var_bytes,
                            _safetensors_header(var_bytes)),
        "npz": Reader(lambda p: read_npz(p, "cache", "delete it", ("arr_0",)), FileFormatError, "cache.npz", _npz()),
        "npy": Reader(lambda p: read_npy(p, "cache", "delete it"), FileFormatError, "cache.npy", _npy(), hot=128),
    }
    found["quantized-load"] = Reader(lambda p: load_quantized(p.parent), CheckpointError, "var.safetensors",
                                     var_bytes, _safetensors_header(var_bytes), named=lambda p: str(p.parent))
    found["_vae"] = Reader(None, Exception, "vae.safetensors", (quantized / "vae.safetensors").read_bytes())
    return found


@st.composite
def mutated(draw, base: bytes, hot: int | None) -> bytes:
    """``base`` after 1-4 edits (bit flip, truncation, insertion, deletion, overwrite); with ``hot``, half of the
    edits land in the first ``hot`` bytes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        limit = min(hot, len(data)) if hot and draw(st.booleans()) else len(data)
        at = draw(st.integers(0, max(limit - 1, 0)))
        edit = draw(st.sampled_from(("flip", "flip", "truncate", "insert", "delete", "overwrite")))
        if edit == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "truncate":
            del data[at:]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif edit == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
    return bytes(data)


JSON_KEYS = st.sampled_from(["type", "steps", "dtype", "name", "litevar_recipe", "litevar_window_plan", "patch_nums",
                             "windows", "geometry", "model", "meta", "plan", "w_bits", "layers", "overrides"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2, 4) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["rtn", "mdwa", "asc", "fp32", "bf16", "raster", "2d", "fc2"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS | st.text(max_size=6), inner, max_size=4),
    max_leaves=10)


def _slots(doc: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value inside ``doc``."""
    found, todo = [], [doc]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            found.append((node, key))
            todo.append(value)
    return found


@st.composite
def json_mutated(draw, doc: Any) -> Any:
    """``doc`` with 1-3 values replaced, deleted or added (keys of the file formats or random)."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(doc)
        if not slots:
            return draw(JSON_VALUES)
        node, key = draw(st.sampled_from(slots))
        edit = draw(st.sampled_from(("replace", "replace", "delete", "add")))
        if edit == "replace":
            node[key] = draw(JSON_VALUES)
        elif edit == "delete":
            del node[key]
        elif isinstance(node, dict):
            node[draw(JSON_KEYS | st.text(max_size=6))] = draw(JSON_VALUES)
        else:
            node.insert(key, draw(JSON_VALUES))
    return doc


def _check(reader: Reader, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        reader.read(path)
    except reader.error as err:
        message = str(err)
        assert reader.named(path) in message and "\n" not in message, message


def _fuzz(reader: Reader, path: Path, kind: str, examples: int) -> None:
    if kind == "random":
        strategy = st.binary(max_size=MAX_RANDOM_BYTES)
    elif kind == "mutated":
        strategy = mutated(reader.base, reader.hot)
    elif kind == "json":
        strategy = st.one_of(json_mutated(reader.doc), JSON_VALUES).map(lambda doc: json.dumps(doc).encode())
    else:
        strategy = st.text(max_size=200).map(str.encode)
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

    cases = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=checks)
    @given(strategy)
    def run(data: bytes) -> None:
        cases.append(len(data))
        _check(reader, path, data)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpickler warns about the random pickle protocols garbage names
        run()
    assert len(cases) >= examples


def _path(readers: dict[str, Reader], name: str, tmp_path: Path) -> Path:
    """Where the fuzzed file goes (next to the quantized model's valid VQ-VAE file for the quantized readers)."""
    if name.startswith("quantized"):
        (tmp_path / "vae.safetensors").write_bytes(readers["_vae"].base)
    return tmp_path / readers[name].name


BYTE_READERS = ["checkpoint-pth", "checkpoint-legacy-pth", "checkpoint-safetensors", "trained-model", "classifier",
                "plan", "recipe", "attention-stats", "quantized", "npz", "npy"]
JSON_READERS = ["plan", "recipe"]
# Cases per input kind, fast and slow: with the slow run every reader gets >= 10,000 cases in total (10,600;
# the JSON readers 1,200 fast + 4,000 bytes and 6,000 JSON slow).
FAST, SLOW = {"random": 200, "mutated": 400}, {"random": 3000, "mutated": 7000}
SLOW_BYTES_OF_JSON_READERS = {"random": 1500, "mutated": 2500}
FAST_JSON, SLOW_JSON = {"json": 500, "text": 100}, {"json": 5000, "text": 1000}


@pytest.mark.parametrize("kind", list(FAST))
@pytest.mark.parametrize("name", BYTE_READERS)
def test_reader_bytes(readers, tmp_path, name, kind):
    _fuzz(readers[name], _path(readers, name, tmp_path), kind, FAST[kind])


@pytest.mark.parametrize("kind", list(FAST_JSON))
@pytest.mark.parametrize("name", JSON_READERS)
def test_reader_json(readers, tmp_path, name, kind):
    _fuzz(readers[name], _path(readers, name, tmp_path), kind, FAST_JSON[kind])


def test_quantized_load_mutated(readers, tmp_path):
    """The whole load (models built, skeleton quantized, states loaded) on mutated files: a few, each is slower."""
    _fuzz(readers["quantized-load"], _path(readers, "quantized-load", tmp_path), "mutated", 60)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SLOW))
@pytest.mark.parametrize("name", BYTE_READERS)
def test_reader_bytes_many(readers, tmp_path, name, kind):
    examples = (SLOW_BYTES_OF_JSON_READERS if name in JSON_READERS else SLOW)[kind]
    _fuzz(readers[name], _path(readers, name, tmp_path), kind, examples)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SLOW_JSON))
@pytest.mark.parametrize("name", JSON_READERS)
def test_reader_json_many(readers, tmp_path, name, kind):
    _fuzz(readers[name], _path(readers, name, tmp_path), kind, SLOW_JSON[kind])


@pytest.mark.slow
def test_quantized_load_mutated_many(readers, tmp_path):
    _fuzz(readers["quantized-load"], _path(readers, "quantized-load", tmp_path), "mutated", 1000)


def test_valid_files_load(readers, tmp_path):
    """The bases of the mutations are valid: the fuzz starts from files that load."""
    for name, reader in readers.items():
        if name != "_vae":
            path = _path(readers, name, tmp_path)
            path.write_bytes(reader.base)
            assert reader.read(path) is not None, name


def test_huge_header_claims_are_refused_without_allocating(tmp_path):
    """An .npy header claiming a petabyte is refused from the file size, before anything is allocated."""
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (125000000000000,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64)
    with pytest.raises(FileFormatError, match="claims 1000000000000000 bytes"):
        read_npy(tmp_path / "huge.npy", "cache", "delete it")
