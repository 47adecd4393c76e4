"""The ``litevar`` command: thin subcommands that build arguments and call the API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .cli_args import (UsageError, add_model_args, add_sampling_args, check_run, check_writable, image_name,
                       parse_classes)
from .files import write_atomic
from .images import grid, save_png_atomic, to_uint8_hwc
from .models.configs import ConfigError
from .models.loading import CheckpointError
from .pipeline import SAMPLING_DEFAULTS, check_sampling_args, load_pipeline, parse_dtype
from .recipe import build_pipeline, load_recipe
from .attention.commands import add_attention_commands
from .quant.commands import add_quant_commands
from .eval.bench import add_bench_command
from .eval.commands import add_eval_commands
from .samples import add_sample_command
from .train.commands import add_train_commands
from .train.loop import TrainingError
from .train.data import DatasetError

def cmd_generate(args: argparse.Namespace) -> None:
    classes = parse_classes(args.classes) if args.classes is not None else None
    if args.per_class < 1:
        raise UsageError(f"--per-class must be >= 1, got {args.per_class}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
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
    sampling = pipe.resolve_sampling(**given)
    classes = list(range(pipe.num_classes)) if classes is None else classes
    pipe.check_labels(classes)
    run = {"var_ckpt": str(args.var_ckpt or "default"), "vae_ckpt": str(args.vae_ckpt or "default"),
           "config": str(args.config), "dtype": recipe.dtype if recipe else args.dtype, "seed": args.seed, **sampling}
    if recipe is not None:
        run["recipe"] = recipe.fingerprint()
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, run, args.overwrite)
    jobs = [(c, args.seed + i) for c in classes for i in range(args.per_class)]
    todo = [j for j in jobs if args.overwrite or not (out / image_name(*j)).exists()]
    token_dir = out / ".tokens"
    if args.save_tokens:
        token_dir.mkdir(exist_ok=True)
        todo = [j for j in jobs if j in todo or not (token_dir / (image_name(*j) + ".pt")).exists()]
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.no_progress)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        result = pipe.generate([c for c, _ in batch], seed=[s for _, s in batch], progress=False, **sampling)
        for row, (label, seed) in enumerate(batch):
            save_png_atomic(to_uint8_hwc(result.images[row]), out / image_name(label, seed))
            if args.save_tokens:
                row_tokens = [t[row].clone() for t in result.tokens]
                write_atomic(token_dir / (image_name(label, seed) + ".pt"), lambda tmp: torch.save(row_tokens, tmp))
        bar.update(len(batch))
    bar.close()
    tiles = [np.asarray(Image.open(out / image_name(*j)).convert("RGB")) for j in jobs]
    labelled = grid(tiles, args.per_class, [pipe.class_names[c] if c >= 0 else "uncond" for c in classes])
    write_atomic(out / "grid.png", lambda tmp: labelled.save(tmp, format="PNG"))
    if args.save_tokens:
        _write_tokens(Path(args.save_tokens), token_dir, jobs)
    print(f"wrote {len(jobs)} images ({len(jobs) - len(todo)} already there) and {out / 'grid.png'}")


def _write_tokens(path: Path, token_dir: Path, jobs: list[tuple[int, int]]) -> None:
    per_image = [torch.load(token_dir / (image_name(*j) + ".pt"), weights_only=True) for j in jobs]
    tokens = [torch.stack([img[si] for img in per_image]) for si in range(len(per_image[0]))]
    payload = {"labels": torch.tensor([c for c, _ in jobs]), "seeds": torch.tensor([s for _, s in jobs]),
               **{f"tokens.{si}": t for si, t in enumerate(tokens)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(payload, tmp))
    print(f"wrote tokens of {len(jobs)} images to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="litevar", description="Load, compress and measure VAR image generators.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample class-conditional images to PNG files")
    add_model_args(gen)
    gen.add_argument("--classes", help="comma-separated class ids, e.g. 207,360 (default: every class)")
    gen.add_argument("--per-class", type=int, default=1, help="images per class")
    gen.add_argument("--seed", type=int, default=0, help="image i of each class uses seed + i")
    add_sampling_args(gen)
    gen.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    gen.add_argument("--recipe", help="a recipe JSON (e.g. quantization, attention steps); its dtype replaces --dtype")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--save-tokens", help="also write the sampled tokens of every image to this .pt file")
    gen.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of resuming")
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=cmd_generate)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_bench_command(sub)
    add_sample_command(sub)
    add_attention_commands(sub)
    add_quant_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, CheckpointError, ConfigError, ValueError, TrainingError, DatasetError) as err:
        print(f"litevar: error: {err}", file=sys.stderr)
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
