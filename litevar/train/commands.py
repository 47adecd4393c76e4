"""``litevar train-vae`` and ``litevar train-var``: the default model's recipe, every setting overridable."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from . import recipes


def _train_config(args: argparse.Namespace, base) -> "recipes.TrainConfig":
    return dataclasses.replace(base, steps=args.steps or base.steps, batch_size=args.batch_size or base.batch_size,
                               lr=args.lr or base.lr, seed=base.seed if args.seed is None else args.seed,
                               bf16=base.bf16 and not args.fp32)


def _common(parser: argparse.ArgumentParser, out_default: str | None) -> None:
    parser.add_argument("--data", default="fashion-mnist",
                        help="'fashion-mnist' or an image folder with one sub-folder per class (or train/<class>/)")
    parser.add_argument("--out", default=out_default,
                        help="run folder (rerun the same command to resume)" + (
                            "" if out_default else "; default runs/default/var, or runs/default/mvar with --arch mvar"))
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the default model's recipe)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--fp32", action="store_true",
                        help="train in float32 instead of bf16 autocast (much faster on CPUs without bf16 instructions)")
    parser.add_argument("--no-progress", action="store_true")


def _setup(args: argparse.Namespace, image_size: int):
    from ..data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_dataset(args.data, "train", size=image_size)


def cmd_train_vae(args: argparse.Namespace) -> None:
    from .vae import VAE_WEIGHTS, train_vae

    cfg = dataclasses.replace(recipes.DEFAULT_VAE, vocab_size=args.vocab_size or recipes.DEFAULT_VAE.vocab_size,
                              z_channels=args.z_channels or recipes.DEFAULT_VAE.z_channels,
                              ch=args.ch or recipes.DEFAULT_VAE.ch)
    summary = train_vae(_setup(args, cfg.image_size), cfg, _train_config(args, recipes.DEFAULT_VAE_TRAIN), args.out,
                        progress=not args.no_progress)
    print(f"VQ-VAE: {Path(args.out) / VAE_WEIGHTS} ({summary})")


def cmd_train_var(args: argparse.Namespace) -> None:
    from .vae import load_trained_vae
    from .var import VAR_WEIGHTS, train_var

    vae_cfg = load_trained_vae(args.vae).cfg
    data = _setup(args, vae_cfg.image_size)
    base = recipes.DEFAULT_MVAR if args.arch == "mvar" else recipes.DEFAULT_VAR
    cfg = dataclasses.replace(base, depth=args.depth or base.depth, width=None, heads=None,
                              num_classes=int(data.labels.max()) + 1, vocab_size=vae_cfg.vocab_size,
                              z_channels=vae_cfg.z_channels, patch_nums=vae_cfg.patch_nums)
    out = args.out or f"runs/default/{args.arch}"
    summary = train_var(data, args.vae, cfg, _train_config(args, recipes.DEFAULT_VAR_TRAIN), out,
                        label_drop=args.label_drop, progress=not args.no_progress)
    print(f"{'M-VAR' if args.arch == 'mvar' else 'VAR'}: {Path(out) / VAR_WEIGHTS} ({summary})")


def add_train_commands(sub) -> None:
    vae = sub.add_parser("train-vae", help="train a multi-scale VQ-VAE (resumable)")
    _common(vae, "runs/default/vae")
    vae.add_argument("--vocab-size", type=int)
    vae.add_argument("--z-channels", type=int)
    vae.add_argument("--ch", type=int, help="base channel width (a multiple of 32: GroupNorm has 32 groups)")
    vae.set_defaults(func=cmd_train_vae)
    var = sub.add_parser("train-var", help="train a class-conditional VAR on a trained VQ-VAE (resumable)")
    _common(var, None)
    var.add_argument("--vae", default="runs/default/vae/vae.safetensors", help="VQ-VAE from train-vae")
    var.add_argument("--depth", type=int, help="transformer depth (width 64 * depth, heads = depth)")
    var.add_argument("--arch", choices=("var", "mvar"), default="var",
                     help="var (the default model's) or mvar (M-VAR: intra-scale attention + Mamba-2), same recipe")
    var.add_argument("--label-drop", type=float, default=0.1, help="share of labels replaced by the null class")
    var.set_defaults(func=cmd_train_var)
