"""Quantized models on disk: one folder with the transformer's quantized state, the VQ-VAE and the recipe.

``var.safetensors`` holds every tensor of the quantized transformer (int8 weights and scales, calibrated
activation ranges, AdaLN folds) and, as metadata, the recipe and the model config; ``vae.safetensors`` holds the
VQ-VAE (with its int8 decoder convolutions when the recipe has a ``decoder-int8`` step). Loading rebuilds the module
structure from the recipe without calibrating and loads both states strictly. Nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..files import write_atomic
from ..models.configs import load_config
from ..models.loading import CheckpointError
from ..models.var import VAR
from ..models.vqvae import VQVAE
from ..pipeline import Pipeline, parse_dtype
from ..recipe import Recipe, RecipeError, load_recipe

FORMAT_VERSION = 1
VAR_FILE, VAE_FILE, RECIPE_FILE = "var.safetensors", "vae.safetensors", "recipe.json"


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


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Pipeline, Recipe]:
    """Load a folder written by :func:`save_quantized` (or ``litevar quantize``): the pipeline and its recipe.

    Example:
        >>> pipe, recipe = load_quantized("runs/w8a8")  # doctest: +SKIP
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .decoder import DecoderInt8Config, quantize_decoder_
    from .transform import QuantConfig, quantize_

    folder = Path(folder)
    missing = [f for f in (VAR_FILE, VAE_FILE) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a quantized model folder: {', '.join(missing)} missing "
                              "(make one with `litevar quantize`)")
    try:
        with safe_open(str(folder / VAR_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        vae_state = load_file(str(folder / VAE_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {folder}: {err}") from None
    if metadata.get("litevar_quantized") != str(FORMAT_VERSION):
        raise CheckpointError(f"{folder / VAR_FILE} is not a litevar quantized model (version {FORMAT_VERSION})")
    recipe = load_recipe(json.loads(metadata["recipe"]))
    config = load_config(json.loads(metadata["config"]))
    var, vae = VAR(config.var), VQVAE(config.vae)
    dtype = parse_dtype(recipe.dtype)
    var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device).eval().requires_grad_(False)
    vae.cast_(dtype)
    pipe = Pipeline(var, vae, config, json.loads(metadata["sampling"]), json.loads(metadata["class_names"]))
    for key, value in tensors.items():  # AdaLN folds add per-channel buffers
        owner, _, name = key.rpartition(".")
        if name.startswith("aln_unit"):
            var.get_submodule(owner).register_buffer(name, torch.empty_like(value, device=device))
    for step in recipe.steps:
        if isinstance(step, QuantConfig):
            quantize_(pipe, step, skeleton=True)
        elif isinstance(step, DecoderInt8Config):
            quantize_decoder_(pipe, step, skeleton=True)
        else:
            raise RecipeError(f"{folder}: only quantization steps can be restored from a saved model, got {step!r}")
    state = dict(tensors)
    state.update(json.loads(metadata.get("module_extra", "{}")))
    try:
        var.load_state_dict(state, strict=True)
        vae.load_state_dict(vae_state, strict=True)  # after the skeleton: int8 decoder convolutions load too
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: the saved state does not match its recipe: {err}") from None
    return pipe, recipe
