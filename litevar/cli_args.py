"""Pieces the subcommands share: model/recipe arguments, output-folder checks, the run guard."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from .files import write_atomic

RUN_FILE = "run.json"
SEED_HELP = ("image i of the class-major job list (each class in turn, --per-class images each) uses seed + i: "
             "the same images in generate, sample and eval")


class UsageError(ValueError):
    """A command-line argument that cannot work."""


def add_model_args(parser: argparse.ArgumentParser, random_shapes: bool = False) -> None:
    """--var-ckpt / --vae-ckpt / --config (and --shape for random weights of a released shape)."""
    parser.add_argument("--var-ckpt", help="VAR or M-VAR checkpoint (.pth/.safetensors), a released name (var-d16 ... "
                        "var-d36, mvar-d16 ... mvar-d32) or a shipped one (default-mvar, default-d2); default: the shipped "
                        "Fashion-MNIST VAR")
    parser.add_argument("--vae-ckpt", help="VQ-VAE checkpoint (optional with a released name)")
    parser.add_argument("--config", help="config JSON (litevar or upstream keywords); default: inferred from the files")
    if random_shapes:
        parser.add_argument("--shape", help="a released shape with seeded random weights instead of checkpoints, "
                            "e.g. var-d16 (timing and FLOPs do not depend on the weights)")


def add_sampling_args(parser: argparse.ArgumentParser, more_smooth: bool = True) -> None:
    """--cfg / --top-k / --top-p (and --more-smooth); None = the model card's setting."""
    parser.add_argument("--cfg", type=float, help="classifier-free guidance strength (default: the model card's, else 1.5)")
    parser.add_argument("--top-k", type=int, help="default: the model card's, else 900")
    parser.add_argument("--top-p", type=float, help="default: the model card's, else 0.96")
    if more_smooth:
        parser.add_argument("--more-smooth", action="store_true", default=None,
                            help="Gumbel-softmax token features (smoother images)")


def add_recipe_arg(parser: argparse.ArgumentParser, default: str = "fp32") -> None:
    parser.add_argument("--recipe", default=default,
                        help=f"candidate recipe: a JSON file, or a precision fp32 / bf16 / fp16 (default {default})")


def as_flags(message: str, args: argparse.Namespace) -> str:
    """A library error in the words of this command: each `argument` it names that the command has a flag for
    becomes that flag (`per_class` -> --per-class); library messages quote argument names in backticks."""
    given = vars(args)
    return re.sub(r"`(\w+)`", lambda m: "--" + m[1].replace("_", "-") if m[1] in given else m[0], message)


def parse_classes(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes:
        raise UsageError("--classes is empty; give e.g. --classes 207,360")
    return classes


def image_name(label: int, seed: int) -> str:
    return f"class{label:04d}_seed{seed:06d}.png"


def safe_name(text: str) -> str:
    """A file-name-safe form of a recipe or model name."""
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_writable(folder: Path) -> None:
    """Fail before any work if the folder (or the nearest existing parent that would hold it) is not writable."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to output folder {folder} ({existing} is not a writable folder); "
                         "choose another `out` folder")


def check_run(folder: Path, run: dict, overwrite: bool, pattern: str = "class*_seed*.png",
              write: bool = True) -> None:
    """Resume only the same run; refuse to mix outputs of different settings unless ``overwrite``. Library code
    calls it too, so its messages name the arguments `out` and `overwrite` (the CLI shows them as flags)."""
    path = folder / RUN_FILE
    if path.exists() and not overwrite:
        previous = json.loads(path.read_text())
        changed = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
        if changed:
            raise UsageError(f"{folder} holds outputs of a different run (differs in {', '.join(changed)}); "
                             "use another `out` folder, or `overwrite` to replace them")
    elif not path.exists() and not overwrite and any(folder.glob(pattern)):
        raise UsageError(f"{folder} already holds files ({pattern}) not made by litevar; use another `out` folder or "
                         "`overwrite`")
    if write:
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(run, indent=1)))
