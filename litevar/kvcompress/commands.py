"""``litevar calibrate-kv``: HACK's head classification and ScaleKV's layer selectivity for a model, as a file
(and a figure of the heads)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..cli_args import UsageError, add_model_args, check_writable, positive
from .figures import draw_heads
from .heads import classify, measure_heads, natural_alpha, save_heads


def cmd_calibrate_kv(args: argparse.Namespace) -> None:
    from ..recipe import build_pipeline

    positive("--samples", args.samples)
    positive("--batch-size", args.batch_size)
    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out must name a .json file, got {out}")
    check_writable(out.parent)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; use another --out or --overwrite to replace it")
    pipe = build_pipeline(args.dtype, args.var_ckpt, args.vae_ckpt, args.config, args.shape, args.device)
    variance, scale_selectivity = measure_heads(pipe, args.samples, args.batch_size, args.seed,
                                                progress=not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = save_heads(out, variance, pipe.identity(), args.samples, scale_selectivity)
    draw_heads(variance, payload["alpha"], out.with_suffix(".png"))
    contextual = classify(variance, natural_alpha(variance))
    print(f"wrote {out} ({int(contextual.sum())} of {contextual.numel()} heads contextual at the calibrated alpha "
          f"{payload['alpha']:.3f}) and {out.with_suffix('.png')}")


def add_kv_commands(sub: Any) -> None:
    """Register ``litevar calibrate-kv``."""
    c = sub.add_parser("calibrate-kv", help="classify attention heads (HACK) and layers (ScaleKV) for kv-compress",
                       description="Generates --samples images, measures each head's column variance of last-scale "
                       "attention and each (layer, scale)'s attention selectivity, writes OUT (variances, calibrated "
                       "alpha, selectivity, model identity) and OUT with .png.")
    add_model_args(c, random_shapes=True)
    c.add_argument("--samples", type=int, default=16, help="calibration images (default 16; HACK: stable from 1)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seed", type=int, default=100000, help="image i uses seed + i (kept apart from eval seeds)")
    c.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True, help="output .json file")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_calibrate_kv)
