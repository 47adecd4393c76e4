"""``litevar quantize``: calibrate and quantize a model with a recipe, and save it (see :mod:`litevar.quant.io`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from ..cli_args import UsageError, add_model_args, check_writable, positive
from ..recipe import build_pipeline, load_recipe
from .decoder import DecoderInt8Config
from .io import VAR_FILE, save_quantized
from .layers import layer_type, linear_layers
from .sensitivity import add_sensitivity_command
from .transform import QuantConfig

QUANT_STEPS = (QuantConfig, DecoderInt8Config)


def weight_bytes(var) -> dict[str, int]:
    """Bytes of the Linear weights per layer type (quantized modules report what they store)."""
    totals: dict[str, int] = {}
    for name, module in linear_layers(var).items():
        size = module.weight_nbytes() if hasattr(module, "weight_nbytes") else module.weight.numel() * module.weight.element_size()
        totals[layer_type(name)] = totals.get(layer_type(name), 0) + size
    return totals


def cmd_quantize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if (out / VAR_FILE).exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a quantized model; pass --overwrite to replace it or choose another --out")
    check_writable(out)
    recipe = load_recipe(args.recipe)
    if not any(isinstance(step, QUANT_STEPS) for step in recipe.steps):
        raise UsageError(f"recipe {args.recipe} has no quantization step (rtn, litevar-mp, smoothquant, osplus, rotation, "
                         "gps, stwq, ptq4arvg, decoder-int8)")
    if args.calib_samples is not None:
        positive("--calib-samples", args.calib_samples)
        steps = [dataclasses.replace(s, calib_samples=args.calib_samples) if isinstance(s, QUANT_STEPS) else s
                 for s in recipe.steps]
        recipe = dataclasses.replace(recipe, steps=tuple(steps))
    dense = build_pipeline(recipe.dtype, args.var_ckpt, args.vae_ckpt, args.config, args.shape, args.device)
    before = weight_bytes(dense.var)
    del dense
    start = time.perf_counter()
    pipe = build_pipeline(recipe, args.var_ckpt, args.vae_ckpt, args.config, args.shape, args.device)
    seconds = time.perf_counter() - start
    after = weight_bytes(pipe.var)
    summary = {"recipe": recipe.name, "quantize_seconds": round(seconds, 2),
               "weight_bytes": {"dense": before, "quantized": after,
                                "ratio": sum(after.values()) / max(sum(before.values()), 1)},
               "calibration": getattr(pipe, "quant_calibration", None),
               "decoder_int8": getattr(pipe, "decoder_int8_report", None)}
    save_quantized(pipe, recipe, out, extra=summary)
    (out / "quantize.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"saved to {out} (load with litevar.quant.io.load_quantized)")


def add_quant_commands(sub) -> None:
    q = sub.add_parser("quantize", help="calibrate and quantize a model with a recipe and save it")
    add_model_args(q, random_shapes=True)
    q.add_argument("--recipe", required=True, help="recipe JSON with a quantization step")
    q.add_argument("--calib-samples", type=int, help="calibration generations (overrides the recipe's)")
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_quantize)
    add_sensitivity_command(sub)
