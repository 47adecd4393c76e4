"""Recipes: how a candidate model is made from the dense one, as data.

A recipe is a precision for weights/activations plus an ordered list of transform steps (each a config
dataclass with a handler, registered in :mod:`litevar.registry` by the technique that provides it). It is saved
as versioned JSON next to every artifact, and ``eval``/``bench``/``sample`` accept it, so a result always says
what produced it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import error_cause, reading
from .pipeline import Pipeline, load_pipeline, parse_dtype, random_pipeline
from .registry import PHASES, STEPS

RECIPE_VERSION = 1
MAX_SHOWN = 80
_KEYS = {"litevar_recipe", "name", "dtype", "steps"}


class RecipeError(ValueError):
    """A recipe that cannot be read or applied."""


def _parse_step(raw: Any, position: int) -> Any:
    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        kind = next((name for name, s in STEPS.items() if isinstance(raw, s.config_cls)), None)
        if kind is None:
            raise RecipeError(f"recipe step {position}: {type(raw).__name__} is not a registered step config")
        return raw
    if not isinstance(raw, dict) or "type" not in raw:
        raise RecipeError(f"recipe step {position} must be an object with a \"type\" key, got {_short(raw)}")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in STEPS:
        known = ", ".join(sorted(STEPS)) or "none in this version"
        raise RecipeError(f"recipe step {position}: unknown type {kind!r} (known: {known})")
    config_cls = STEPS[kind].config_cls
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(raw) - fields - {"type"})
    if unknown:
        raise RecipeError(f"recipe step {position} ({kind}): unknown keys {unknown}; allowed: {sorted(fields)}")
    try:
        return config_cls(**{k: v for k, v in raw.items() if k != "type"})
    except Exception as err:  # noqa: BLE001 - the parse boundary of recipe data: any field a config cannot take
        raise RecipeError(f"recipe step {position} ({kind}): {error_cause(err)}") from None


def _short(value: Any) -> str:
    """``repr(value)``, cut to one short line for error messages."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _json_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A step's fields with tuples as lists, so ``to_dict`` equals what its JSON reads back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def _step_type(step: Any) -> str:
    return next(name for name, s in STEPS.items() if isinstance(step, s.config_cls))


@dataclass(frozen=True)
class Recipe:
    """A precision and an ordered list of transform steps applied to the dense model.

    Args:
        dtype: "fp32", "bf16" or "fp16": the weights are cast once (the VQ-VAE quantizer and logits stay fp32).
        steps: registered step configs (or their ``{"type": ..., ...}`` dicts), applied in order.
        name: a label for tables; defaults to a description of the above.

    Example:
        >>> Recipe(dtype="bf16").to_dict()
        {'litevar_recipe': 1, 'name': 'bf16', 'dtype': 'bf16', 'steps': []}
    """

    dtype: str = "fp32"
    steps: tuple = ()
    name: str = ""

    def __post_init__(self) -> None:
        try:
            parse_dtype(self.dtype)
        except ValueError as err:
            raise RecipeError(f"recipe dtype: {err}") from None
        if isinstance(self.dtype, torch.dtype):
            raise RecipeError("recipe dtype must be a name: fp32, bf16 or fp16")
        if not isinstance(self.steps, (list, tuple)):
            raise RecipeError(f"recipe steps must be a list, got {type(self.steps).__name__}")
        object.__setattr__(self, "steps", tuple(_parse_step(s, i) for i, s in enumerate(self.steps)))
        if not self.name:
            parts = [self.dtype] + [_step_type(s) for s in self.steps]
            object.__setattr__(self, "name", "+".join(parts))

    @property
    def is_dense(self) -> bool:
        return not self.steps

    def to_dict(self) -> dict[str, Any]:
        steps = [{"type": _step_type(s), **dataclasses.asdict(s, dict_factory=_json_dict)} for s in self.steps]
        return {"litevar_recipe": RECIPE_VERSION, "name": self.name, "dtype": self.dtype, "steps": steps}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Recipe":
        if not isinstance(raw, dict):
            raise RecipeError(f"a recipe is a JSON object, got {type(raw).__name__}")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}; allowed: {sorted(_KEYS)}")
        version = raw.get("litevar_recipe", RECIPE_VERSION)
        if isinstance(version, bool) or version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {_short(version)} is not supported (this litevar reads version "
                              f"{RECIPE_VERSION})")
        if not isinstance(raw.get("name", ""), str) or not isinstance(raw.get("dtype", "fp32"), str):
            raise RecipeError(f"recipe name and dtype must be strings, got {_short(raw.get('name'))} and "
                              f"{_short(raw.get('dtype'))}")
        return cls(dtype=raw.get("dtype", "fp32"), steps=raw.get("steps", ()), name=raw.get("name", ""))

    def fingerprint(self) -> str:
        """Short hash of what the recipe does (its name excluded)."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def load_recipe(source: str | Path | dict | Recipe | None = None) -> Recipe:
    """A recipe from None (dense fp32), a precision name ("fp32", "bf16", "fp16"), a JSON file or a dict.

    Example:
        >>> load_recipe("bf16").dtype
        'bf16'
    """
    if source is None:
        return Recipe()
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return Recipe.from_dict(source)
    text = str(source)
    if text in ("fp32", "bf16", "fp16"):
        return Recipe(dtype=text)
    path = Path(text)
    if not path.is_file():
        raise RecipeError(f"recipe {text!r} is neither a precision (fp32, bf16, fp16) nor an existing JSON file")
    with reading(path, RecipeError, "recipe file", "fix it, or write it again with Recipe.save"):
        try:
            raw = json.loads(path.read_text())
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise RecipeError(f"recipe file {path} is not valid JSON ({error_cause(err)}); fix it, or write it "
                              "again with Recipe.save") from None
        return Recipe.from_dict(raw)


def execution_order(recipe: Recipe) -> list[Any]:
    """The recipe's steps in the order they run: by :data:`PHASES`, in recipe order within a phase."""
    return sorted(recipe.steps, key=lambda step: PHASES.index(STEPS[_step_type(step)].phase))


# Steps that act on attention across scales (the KV cache) or on CFG sharing of KV-cached calls: M-VAR's attention
# stays within each scale and has no KV cache, so on it they would compute nothing or something else.
MVAR_REFUSED = {
    "mdwa": "its windows select keys of earlier scales",
    "kv-compress": "it evicts keys of earlier scales from the KV cache",
    "draft-refine": "its refiner continues from KV-cached drafted scales, which an M-VAR drafter does not leave",
    "kv-cache": "it changes how the KV cache stores keys and values",
    "token-prune": "it leaves tokens out of the KV-cached late layers, and M-VAR's Mamba scan needs every token",
}


def _check_architecture(pipe: Pipeline, recipe: Recipe) -> None:
    """Refuse steps that need cross-scale attention on an M-VAR (and M-VAR's own steps on a VAR), naming the step and
    the conflict."""
    if pipe.config.arch != "mvar":
        if any(_step_type(step) == "mamba-state" for step in recipe.steps):
            raise RecipeError(f"recipe {recipe.name!r}: step 'mamba-state' needs an M-VAR; this model is a VAR, which "
                              "carries a KV cache instead (its storage: the kv-cache step)")
        return
    for step in recipe.steps:
        kind = _step_type(step)
        if kind in MVAR_REFUSED:
            raise RecipeError(f"recipe {recipe.name!r}: step {kind!r} cannot run on an M-VAR ({MVAR_REFUSED[kind]}; "
                              "M-VAR attends only within each scale, without a KV cache): remove the step")


def apply_recipe(pipe: Pipeline, recipe: Recipe) -> Pipeline:
    """Run the recipe's steps on a pipeline already loaded in the recipe's dtype (in place), in
    :func:`execution_order`. Steps that claim the same attention component are refused, naming both."""
    from .attention.components import ComponentConflict

    if pipe.dtype != parse_dtype(recipe.dtype):
        raise RecipeError(f"the pipeline is {pipe.dtype} but the recipe asks for {recipe.dtype}; load it in that dtype")
    _check_architecture(pipe, recipe)
    for step in execution_order(recipe):
        try:
            STEPS[_step_type(step)].handler(pipe, step)
        except ComponentConflict as err:
            raise RecipeError(f"recipe {recipe.name!r}: {err}") from None
    return pipe


def build_pipeline(recipe: Recipe | str | dict | None = None, var_ckpt: str | Path | None = None,
                   vae_ckpt: str | Path | None = None, config: Any = None, random_shape: str | None = None,
                   device: str | torch.device = "cpu", seed: int = 0) -> Pipeline:
    """Load a model (or a released shape with seeded random weights) and apply a recipe to it.

    Args:
        recipe: see :func:`load_recipe`.
        var_ckpt, vae_ckpt, config: as in :func:`litevar.load_pipeline` (all None: the shipped default model).
        random_shape: a preset name such as "var-d16": random weights of that shape instead of checkpoints.
        device: where to run.
        seed: weight seed for ``random_shape``.

    Example:
        >>> pipe = build_pipeline("bf16")  # doctest: +SKIP
    """
    recipe = load_recipe(recipe)
    if random_shape is not None:
        if var_ckpt is not None or vae_ckpt is not None:
            raise RecipeError("give either checkpoints or a random shape, not both")
        pipe = random_pipeline(random_shape, seed=seed, device=device, dtype=recipe.dtype)
    else:
        pipe = load_pipeline(var_ckpt, vae_ckpt, config=config, device=device, dtype=recipe.dtype)
    return apply_recipe(pipe, recipe)
