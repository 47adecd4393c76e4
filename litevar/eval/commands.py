"""``litevar quality``: the default model's quality numbers (README table), one JSON per measurement."""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..files import write_atomic
from .quality import FEATURE_SIZE


def _machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _write(out: Path, name: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")


def _generated_name(sampling: dict) -> str:
    return f"generated_cfg{sampling['cfg']:g}_topk{sampling['top_k']}_topp{sampling['top_p']:g}"


def _generated_images(pipe, args: argparse.Namespace, sampling: dict, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Generate (or reuse, when the same settings made them before) ``per_class`` images of every class."""
    from .quality import generate_set

    labels = np.repeat(np.arange(pipe.num_classes), args.per_class)
    seeds = args.seed + np.arange(len(labels))
    settings = {"per_class": args.per_class, "seed": args.seed, "dtype": args.dtype, **sampling}
    path = out / f"{_generated_name(sampling)}.npz"
    if path.exists():
        cached = np.load(path)
        if json.loads(str(cached["settings"])) == settings:
            return cached["arr_0"], cached["labels"]
    images = generate_set(pipe, labels, seeds, batch_size=args.batch_size, progress=not args.no_progress, **sampling)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), arr_0=images, labels=labels,
                                            settings=json.dumps(settings)))
    return images, labels


def cmd_quality(args: argparse.Namespace) -> None:
    from ..pipeline import load_pipeline
    from ..train.data import load_dataset
    from .classifier import load_classifier
    from .quality import FeatureCache, compare_to_data, generation_report, reconstruction_report

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    features = FeatureCache(out / "features", input_size=args.feature_size, progress=not args.no_progress)
    test = load_dataset(args.data, "test")
    report = {"what": args.what, "metric": f"FD-EffLite0@{args.feature_size}px (EfficientNet-Lite0 ImageNet features; "
              "not Inception FID)", "test_images": len(test), "machine": _machine()}
    start = time.perf_counter()
    if args.what == "real":
        train = load_dataset(args.data, "train").subset(args.n, seed=args.seed)
        report |= {"train_images": len(train), **compare_to_data(features(test.images), features(train.images))}
        name = "real"
    else:
        pipe = load_pipeline(args.var_ckpt, args.vae_ckpt, dtype=args.dtype)
        if args.what == "recon":
            report |= reconstruction_report(pipe.vae, test, features, progress=not args.no_progress)
            name = "recon"
        else:
            sampling = pipe.resolve_sampling(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=False)
            images, labels = _generated_images(pipe, args, sampling, out)
            report |= {"sampling": sampling, "dtype": args.dtype, "generated_images": len(images),
                       **generation_report(images, labels, test, features, load_classifier())}
            name = _generated_name(sampling)
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write(out, name, report)


def add_eval_commands(sub) -> None:
    q = sub.add_parser("quality", help="FD-EffLite0, precision/recall, class-consistency, PSNR of the default model")
    q.add_argument("what", choices=("real", "recon", "generated"),
                   help="real: train vs test images (the floor); recon: VQ-VAE reconstructions vs test; "
                        "generated: samples vs test")
    q.add_argument("--data", default="fashion-mnist")
    q.add_argument("--var-ckpt", help="default: the shipped model")
    q.add_argument("--vae-ckpt")
    q.add_argument("--n", type=int, default=10000, help="train images for 'real'")
    q.add_argument("--per-class", type=int, default=1000, help="generated images per class")
    q.add_argument("--cfg", type=float)
    q.add_argument("--top-k", type=int)
    q.add_argument("--top-p", type=float)
    q.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    q.add_argument("--dtype", default="bf16", help="generation precision (fp32, bf16)")
    q.add_argument("--batch-size", type=int, default=100)
    q.add_argument("--feature-size", type=int, default=FEATURE_SIZE, help="EfficientNet-Lite0 input side")
    q.add_argument("--threads", type=int)
    q.add_argument("--out", default="runs/quality")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quality)
