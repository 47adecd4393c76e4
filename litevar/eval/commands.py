"""``litevar quality``: the default model's quality numbers (README table), one JSON per measurement."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..files import FileFormatError, read_npz, reading, write_atomic
from ..jobs import JobList
from ..models.default import is_shipped
from .quality import FEATURE_SIZE


def _machine() -> dict:
    from .bench import machine_info

    return {**machine_info(), "threads": torch.get_num_threads()}


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

    jobs = JobList(range(pipe.num_classes), args.per_class, seed=args.seed)
    labels, seeds = jobs.labels, jobs.seeds
    settings = {"per_class": args.per_class, "seed": args.seed, "dtype": args.dtype, **sampling}
    path = out / f"{_generated_name(sampling)}.npz"
    if path.exists():
        advice = "delete it to generate the images again"
        cached = read_npz(path, "generated-image cache", advice, ("settings",))
        with reading(path, FileFormatError, "generated-image cache", advice):
            if json.loads(str(cached["settings"])) == settings:
                images, cached_labels = cached["arr_0"], cached["labels"]
                if images.ndim != 4 or not np.array_equal(cached_labels, labels):
                    raise ValueError("its arrays do not hold one image per label of these settings")
                return images, cached_labels
    images = generate_set(pipe, labels, seeds, batch_size=args.batch_size, progress=not args.no_progress, **sampling)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), arr_0=images, labels=labels,
                                            settings=json.dumps(settings)))
    return images, labels


def cmd_quality(args: argparse.Namespace) -> None:
    from ..pipeline import load_pipeline
    from ..data import load_dataset
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
            report |= {"model": str(args.var_ckpt or "default"), "sampling": sampling, "dtype": args.dtype,
                       "generated_images": len(images),
                       **generation_report(images, labels, test, features, load_classifier())}
            name = _generated_name(sampling)
    report["seconds"] = round(time.perf_counter() - start, 1)
    _write(out, name, report)


def cmd_eval(args: argparse.Namespace) -> None:
    from ..cli_args import UsageError, check_writable, parse_classes, positive, safe_name
    from .evaluate import EvalSettings, evaluate, write_report
    from .tables import compare_markdown

    if args.compare:
        reports = []
        for path in args.compare:
            report = json.loads(Path(path).read_text())
            if report.get("litevar_eval") is None:
                raise UsageError(f"{path} is not a litevar eval report (no litevar_eval key)")
            reports.append(report)
        print(compare_markdown(reports))
        return
    if args.threads:
        torch.set_num_threads(positive("--threads", args.threads))
    default_model = is_shipped(args.var_ckpt) and args.vae_ckpt is None
    data = (("fashion-mnist" if default_model else None) if args.data == "auto" else
            None if args.data == "none" else args.data)
    out = Path(args.out)
    settings = EvalSettings(per_class=args.per_class, classes=parse_classes(args.classes) if args.classes else None,
                            seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, data=data,
                            batch_size=args.batch_size, device=args.device, cache_dir=out / "cache",
                            feature_size=args.feature_size, inception_weights=args.inception_weights)
    from ..recipe import load_recipe
    recipe = load_recipe(args.recipe)
    check_writable(out)
    path = out / f"eval_{safe_name(args.name or recipe.name)}.json"
    if path.exists() and not args.overwrite:
        raise UsageError(f"{path} exists; pass --name to keep both, or --overwrite to replace it")
    report = evaluate(recipe, settings, var_ckpt=args.var_ckpt, vae_ckpt=args.vae_ckpt, config=args.config,
                      progress=not args.no_progress)
    json_path, md_path = write_report(report, path)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


def _share(text: str) -> float:
    """'2%' or '0.02' -> 0.02."""
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def cmd_tune(args: argparse.Namespace) -> None:
    from ..cli_args import UsageError, parse_classes, positive
    from .tune import TuneSettings, tune

    if args.threads:
        torch.set_num_threads(positive("--threads", args.threads))
    if not Path(args.space).is_file():
        raise UsageError(f"--space {args.space}: no such file (a search space: see docs/techniques.md, litevar tune)")
    default_model = is_shipped(args.var_ckpt) and args.vae_ckpt is None
    data = (("fashion-mnist" if default_model else None) if args.data == "auto" else
            None if args.data == "none" else args.data)
    try:
        settings = TuneSettings(var_ckpt=args.var_ckpt, vae_ckpt=args.vae_ckpt, config=args.config, shape=args.shape,
                                speed=args.speed, batch=args.batch, repeats=args.repeats,
                                proxy_per_class=args.proxy_per_class, per_class=args.per_class,
                                classes=tuple(parse_classes(args.classes)) if args.classes else None, data=data,
                                finalists=args.finalists, min_agreement=args.min_agreement,
                                max_fd_increase=_share(args.max_fd_increase), max_cc_drop=args.max_cc_drop,
                                noise_check=args.noise_check)
    except ValueError as err:
        raise UsageError(f"litevar tune: {err}") from None
    report = tune(args.space, settings, args.out)
    for c in report["candidates"]:
        speed = c.get("speed", {}).get("speedup")
        agree = c.get("proxy", {}).get("fidelity", {}).get("token_agreement")
        state = c.get("refused") or (f"speed-up {speed:.3f}x, agreement {agree:.4f}" +
                                     (" (Pareto)" if c["name"] in report["pareto"] else ""))
        print(f"{c['name']}: {state}")
    print(f"chosen: {report['chosen']['name']} (budget: {report['budget']})")
    if noise := report["noise"]:
        print(f"noise: dense on seeds {noise['seeds'][1]}.. vs {noise['seeds'][0]}..: FD-EffLite0 "
              f"{100 * noise['fd_change']:+.1f}%, class-consistency {noise['cc_change_points']:+.1f} points"
              + (" (the budget is within this noise)" if noise["budget_within_noise"] else ""))
    print(f"wrote {Path(args.out) / 'tune.json'}, pareto.png and chosen_recipe.json")


def add_tune_command(sub) -> None:
    from ..cli_args import add_model_args

    t = sub.add_parser("tune", help="search compositions of recipe steps for the fastest within a quality budget")
    t.add_argument("--space", required=True, help="search space JSON: slots of alternative steps (null = off)")
    add_model_args(t, random_shapes=True)
    t.add_argument("--speed", choices=("flops", "time"), default="flops",
                   help="speed proxy: FLOPs per image (deterministic) or measured throughput (litevar bench)")
    t.add_argument("--batch", type=int, default=8, help="--speed time: images per batch")
    t.add_argument("--repeats", type=int, default=3, help="--speed time: timed runs per variant")
    t.add_argument("--proxy-per-class", type=int, default=2, help="images per class of the proxy evaluation")
    t.add_argument("--per-class", type=int, default=50, help="images per class of the finalists' evaluation")
    t.add_argument("--classes", help="comma-separated class ids (default: every class)")
    t.add_argument("--data", default="auto", help="dataset of the finalists' quality (as in litevar eval)")
    t.add_argument("--finalists", type=int, default=3, help="fastest proxy-passing candidates evaluated in full")
    t.add_argument("--min-agreement", type=float, default=0.0, help="least proxy token agreement with dense")
    t.add_argument("--max-fd-increase", default="2%", help="most FD-EffLite0 increase over dense, e.g. 2%% or 0.02")
    t.add_argument("--max-cc-drop", type=float, default=1.0, help="most class-consistency drop, in points")
    t.add_argument("--noise-check", action="store_true",
                   help="also evaluate dense on a second seed set: how far quality moves with the seeds alone")
    t.add_argument("--threads", type=int)
    t.add_argument("--out", default="runs/tune", help="folder; rerun the same command to resume")
    t.set_defaults(func=cmd_tune)


def add_eval_commands(sub) -> None:
    from ..cli_args import SEED_HELP, add_model_args, add_recipe_arg, add_sampling_args

    e = sub.add_parser("eval", help="fidelity of a recipe to the dense fp32 model, and quality vs data")
    add_model_args(e)
    add_recipe_arg(e, default="bf16")
    e.add_argument("--per-class", type=int, default=100, help="images per class")
    e.add_argument("--classes", help="comma-separated class ids (default: every class)")
    e.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    add_sampling_args(e, more_smooth=False)
    e.add_argument("--data", default="auto", help="dataset for quality vs data: fashion-mnist, an image folder, or "
                   "none (default auto: fashion-mnist for the shipped model, none otherwise)")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int)
    e.add_argument("--feature-size", type=int, default=FEATURE_SIZE, help="EfficientNet-Lite0 input side")
    e.add_argument("--inception-weights", help="local torch-fidelity Inception weights: also report FID and IS")
    e.add_argument("--out", default="runs/eval", help="folder for eval_<recipe>.json/.md and the reference cache")
    e.add_argument("--name", help="report name (default: the recipe's)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing report of the same name")
    e.add_argument("--compare", nargs="+", metavar="JSON", help="print these eval reports side by side and exit")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

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
    q.add_argument("--seed", type=int, default=0, help=SEED_HELP + " (train-image subset for 'real')")
    q.add_argument("--dtype", default="bf16", help="generation precision (fp32, bf16)")
    q.add_argument("--batch-size", type=int, default=100)
    q.add_argument("--feature-size", type=int, default=FEATURE_SIZE, help="EfficientNet-Lite0 input side")
    q.add_argument("--threads", type=int)
    q.add_argument("--out", default="runs/quality")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_quality)
