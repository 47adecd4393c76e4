"""Quantized models on disk: one folder with the transformer's quantized state, the VQ-VAE and the recipe.

``var.safetensors`` holds every tensor of the quantized transformer (int8 weights and scales, calibrated
activation ranges, AdaLN folds) and, as metadata, the recipe and the model config; ``vae.safetensors`` holds the
VQ-VAE (with its int8 decoder convolutions when the recipe has a ``decoder-int8`` step). Loading rebuilds the module
structure from the recipe without calibrating and loads both states strictly. Nothing is unpickled.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..files import error_cause, reading, write_atomic
from ..models.configs import load_config
from ..models.loading import CheckpointError
from ..models.mvar import build_transformer
from ..models.vqvae import VQVAE
from ..pipeline import Pipeline, parse_dtype
from ..recipe import Recipe, RecipeError, load_recipe

FORMAT_VERSION = 2  # 2: AdaLN folds saved by the norms that own them (blocks.i.norm1.unit, ...)
VAR_FILE, VAE_FILE, RECIPE_FILE = "var.safetensors", "vae.safetensors", "recipe.json"
# A config may ask for 8x the weights the files hold (int4 packing stores 8 in an int32), plus a little.
PACKING, MIN_SLACK = 8, 1 << 20
ADVICE = "save the model again with `litevar quantize`"


def save_quantized(pipe: Pipeline, recipe: Recipe, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``folder/{var,vae}.safetensors`` and ``recipe.json`` for a pipeline built with ``recipe``.

    Example:
        >>> save_quantized(build_pipeline(recipe), recipe, "runs/w8a8")  # doctest: +SKIP
    """
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = pipe.var.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)}
    module_extra = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    metadata = {"litevar_quantized": str(FORMAT_VERSION), "recipe": json.dumps(recipe.to_dict()),
                "config": json.dumps(pipe.config.to_dict()), "sampling": json.dumps(pipe.sampling),
                "class_names": json.dumps(pipe.class_names), "module_extra": json.dumps(module_extra),
                "extra": json.dumps(extra or {})}
    write_atomic(folder / VAR_FILE, lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))
    vae_state = {k: v.detach().contiguous().cpu() for k, v in pipe.vae.state_dict().items()}
    write_atomic(folder / VAE_FILE, lambda tmp: tmp.write_bytes(save(vae_state)))
    write_atomic(folder / RECIPE_FILE, lambda tmp: tmp.write_text(json.dumps(recipe.to_dict(), indent=1)))
    return folder


def _json_meta(metadata: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    value = json.loads(metadata[key] if default is None else metadata.get(key, default))
    if not isinstance(value, kind):
        raise CheckpointError(f"its {key} metadata is not a JSON {kind.__name__}")
    return value


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


@lru_cache(maxsize=8)
def _weights_asked(config_json: str) -> tuple[int, int]:
    """How many weights (VAR, VQ-VAE) a config builds, counted on the meta device (nothing allocated)."""
    config = load_config(json.loads(config_json))
    with torch.device("meta"):
        return _numel(build_transformer(config.var)), _numel(VQVAE(config.vae))


def read_quantized(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Parse the files of a quantized model folder, building nothing: (metadata, VAR tensors, VQ-VAE tensors).

    ``metadata`` holds the ``recipe`` (a :class:`Recipe`), ``config``, ``sampling``, ``class_names`` and
    ``module_extra``. Any failure is a :class:`CheckpointError` naming the file; a config asking for more
    weights than the files hold is refused before any model is allocated.

    Example:
        >>> meta, var_state, vae_state = read_quantized("runs/w8a8")  # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in (VAR_FILE, VAE_FILE) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a quantized model folder: {', '.join(missing)} missing "
                              "(make one with `litevar quantize`)")
    var_path, vae_path = folder / VAR_FILE, folder / VAE_FILE
    with reading(var_path, CheckpointError, "quantized model file", ADVICE):
        with safe_open(str(var_path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("litevar_quantized") != str(FORMAT_VERSION):
            raise CheckpointError(f"{var_path} is not a litevar quantized model (version {FORMAT_VERSION}); {ADVICE}")
        meta = {"recipe": load_recipe(_json_meta(metadata, "recipe", dict)),
                "config": load_config(_json_meta(metadata, "config", dict)),
                "sampling": _json_meta(metadata, "sampling", dict),
                "class_names": _json_meta(metadata, "class_names", list),
                "module_extra": _json_meta(metadata, "module_extra", dict, "{}")}
        var_numel, vae_numel = _weights_asked(json.dumps(meta["config"].to_dict(), sort_keys=True))
        if var_numel > PACKING * sum(t.numel() for t in tensors.values()) + MIN_SLACK:
            raise CheckpointError(f"its config asks for {var_numel} transformer weights, far more than it holds")
    with reading(vae_path, CheckpointError, "quantized model file", ADVICE):
        vae_state = load_file(str(vae_path))
        if vae_numel > PACKING * sum(t.numel() for t in vae_state.values()) + MIN_SLACK:
            raise CheckpointError(f"its model config asks for {vae_numel} VQ-VAE weights, far more than it holds")
    return meta, tensors, vae_state


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Pipeline, Recipe]:
    """Load a folder written by :func:`save_quantized` (or ``litevar quantize``): the pipeline and its recipe.

    Example:
        >>> pipe, recipe = load_quantized("runs/w8a8")  # doctest: +SKIP
    """
    from .decoder import DecoderInt8Config, quantize_decoder_
    from .transform import QuantConfig, quantize_

    folder = Path(folder)
    meta, tensors, vae_state = read_quantized(folder)
    recipe, config = meta["recipe"], meta["config"]
    var, vae = build_transformer(config.var), VQVAE(config.vae)
    dtype = parse_dtype(recipe.dtype)
    var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device).eval().requires_grad_(False)
    vae.cast_(dtype)
    pipe = Pipeline(var, vae, config, meta["sampling"], meta["class_names"])
    for step in recipe.steps:
        if isinstance(step, QuantConfig):
            quantize_(pipe, step, skeleton=True)
        elif isinstance(step, DecoderInt8Config):  # a probe's choice is the saving machine's: read it from the file
            saved = [k.removeprefix("decoder.").removesuffix(".weight_int8") for k in vae_state
                     if k.startswith("decoder.") and k.endswith(".weight_int8")]
            quantize_decoder_(pipe, step, skeleton=True, names=saved if step.select == "probe" else None)
        else:
            raise RecipeError(f"{folder}: only quantization steps can be restored from a saved model, got {step!r}")
    state = dict(tensors)
    state.update(meta["module_extra"])
    try:
        var.load_state_dict(state, strict=True)  # AdaLN folds' buffers come back with the norms that own them
        var.to(device)
        vae.load_state_dict(vae_state, strict=True)  # after the skeleton: int8 decoder convolutions load too
    except Exception as err:  # noqa: BLE001 - file content checked by loading it: also a module's set_extra_state
        raise CheckpointError(f"{folder}: the saved state does not match its recipe ({error_cause(err)}); "
                              f"{ADVICE}") from None
    return pipe, recipe
