"""The ``litevar`` command: thin subcommands that build arguments and call the API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import (SEED_HELP, UsageError, add_model_args, add_sampling_args, as_flags, check_writable,
                       parse_classes, positive)
from .data import DatasetError
from .jobs import JobList
from .models.configs import ConfigError
from .models.loading import CheckpointError
from .pipeline import SAMPLING_DEFAULTS, check_sampling_args, load_pipeline, parse_dtype
from .recipe import build_pipeline, load_recipe
from .attention.commands import add_attention_commands
from .kvcompress.commands import add_kv_commands
from .quant.commands import add_quant_commands
from .eval.bench import add_bench_command
from .eval.commands import add_eval_commands, add_tune_command
from .samples import RunOptions, add_sample_command, generate_images
from .train.commands import add_train_commands
from .train.loop import TrainingError

def cmd_generate(args: argparse.Namespace) -> None:
    classes = parse_classes(args.classes) if args.classes is not None else None
    positive("--per-class", args.per_class)
    positive("--batch-size", args.batch_size)
    given = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
    check_sampling_args(*(SAMPLING_DEFAULTS[k] if given[k] is None else given[k] for k in ("cfg", "top_k", "top_p")))
    recipe = load_recipe(args.recipe) if args.recipe else None
    dtype = parse_dtype(recipe.dtype if recipe else args.dtype)
    out = Path(args.out)
    check_writable(out)
    if recipe is not None:  # compression steps (quantization calibrates here) on the model in the recipe's dtype
        pipe = build_pipeline(recipe, args.var_ckpt, args.vae_ckpt, args.config, device=args.device)
    else:
        pipe = load_pipeline(args.var_ckpt, args.vae_ckpt, config=args.config, device=args.device, dtype=dtype)
    jobs = JobList(range(pipe.num_classes) if classes is None else classes, args.per_class, seed=args.seed)
    run = {"var_ckpt": str(args.var_ckpt or "default"), "vae_ckpt": str(args.vae_ckpt or "default"),
           "config": str(args.config), "dtype": recipe.dtype if recipe else args.dtype}
    if recipe is not None:
        run["recipe"] = recipe.fingerprint()
    options = RunOptions(run, args.overwrite, not args.no_progress)
    result = generate_images(pipe, out, jobs, args.batch_size, given, options, args.save_tokens)
    print(f"wrote {len(result.images)} images ({len(result.images) - result.generated} already there) and "
          f"{result.grid}" + (f"; tokens of every image in {result.tokens}" if result.tokens else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litevar", description="Load, compress and measure VAR image generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample class-conditional images to PNG files")
    add_model_args(gen)
    gen.add_argument("--classes", help="comma-separated class ids, e.g. 207,360 (default: every class)")
    gen.add_argument("--per-class", type=int, default=1, help="images per class")
    gen.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    add_sampling_args(gen)
    gen.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    gen.add_argument("--recipe", help="a recipe JSON (e.g. quantization, attention steps); its dtype replaces --dtype")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--batch-size", type=int, default=16,
                     help="images per chunk (default 16, as in sample); the same flags give the same images")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--save-tokens", help="also write the sampled tokens of every image to this .pt file")
    gen.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of resuming")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=cmd_generate)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_bench_command(sub)
    add_tune_command(sub)
    add_sample_command(sub)
    add_attention_commands(sub)
    add_kv_commands(sub)
    add_quant_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, CheckpointError, ConfigError, ValueError, TrainingError, DatasetError) as err:
        print(f"litevar: error: {as_flags(str(err), args)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"litevar: error: {err.strerror or err}: {err.filename or ''}; check the path and permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("litevar: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
