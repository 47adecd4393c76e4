"""``litevar calibrate-attention`` (MDWA window plans) and ``litevar analyze-attention`` (LiteVAR Fig. 2 figures).

calibrate-attention generates once, records attention mass (:func:`collect_stats`), and derives one plan per
geometry x threshold. The raw statistics are saved too (``attention_stats.safetensors``), so
``--from-stats`` derives more plans later without loading the model or generating anything.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..cli_args import UsageError, add_model_args, check_writable, positive
from ..files import reading, write_atomic
from .calibrate import AttentionStats, collect_stats, load_plan, model_identity, save_plan
from .windows import DROP, FULL, GEOMETRIES, WindowPlan

STATS_FILE = "attention_stats.safetensors"
SUMMARY_FILE = "calibration.json"
STATS_VERSION = 1
SUMMARY_VERSION = 1
# Collection settings: given with --from-stats they would be ignored, so they are refused there.
_COLLECTION_ARGS = {"var_ckpt": "--var-ckpt", "vae_ckpt": "--vae-ckpt", "config": "--config", "samples": "--samples",
                    "batch_size": "--batch-size", "seed": "--seed", "cfg": "--cfg", "top_k": "--top-k",
                    "top_p": "--top-p", "dtype": "--dtype", "prob_floor": "--prob-floor"}
_COLLECTION_DEFAULTS = {"samples": 64, "batch_size": 16, "seed": 0, "dtype": "bf16", "prob_floor": 0.003}


def save_stats(stats: AttentionStats, path: str | Path, collection: dict[str, Any]) -> None:
    """Write the raw calibration histograms (float64) and how they were collected, as safetensors.

    Example:
        >>> save_stats(collect_stats(pipe, 32), "stats.safetensors", {"model": model_identity(pipe.var)})  # doctest: +SKIP
    """
    from safetensors.torch import save

    tensors = {"queries": stats.queries.contiguous()}
    for geometry, blocks in stats.hist.items():
        for (k, j), hist in blocks.items():
            tensors[f"hist.{geometry}.{k}.{j}"] = hist.contiguous()
    metadata = {"litevar_attention_stats": str(STATS_VERSION), "patch_nums": json.dumps(list(stats.patch_nums)),
                "depth": str(stats.depth), "heads": str(stats.heads), "prob_floor": repr(stats.prob_floor),
                "collection": json.dumps(collection)}
    write_atomic(Path(path), lambda tmp: tmp.write_bytes(save(tensors, metadata=metadata)))


def _stats_layout(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> tuple[list[int], int, int]:
    """(patch_nums, depth, heads) of a statistics file, checked against its tensors before anything is allocated
    for them: a corrupt header cannot ask for more than the file holds."""
    patch_nums, depth, heads = json.loads(metadata["patch_nums"]), int(metadata["depth"]), int(metadata["heads"])
    sides_ok = isinstance(patch_nums, list) and all(type(p) is int and p >= 1 for p in patch_nums)
    if not sides_ok or min(depth, heads) < 1:
        raise UsageError("patch_nums, depth or heads are malformed")
    queries = tensors.get("queries")
    diagonal = [tensors.get(f"hist.raster.{k}.{k}") for k in range(len(patch_nums))]
    if (queries is None or tuple(queries.shape) != (depth, len(patch_nums))
            or any(h is None or h.dim() != 3 or tuple(h.shape[:2]) != (depth, heads) or h.shape[2] <= p * p
                   for h, p in zip(diagonal, patch_nums))):
        raise UsageError("its tensors do not match its patch_nums, depth and heads")
    return patch_nums, depth, heads


def load_stats(path: str | Path) -> tuple[AttentionStats, dict[str, Any]]:
    """Read a file written by :func:`save_stats`: the statistics and their collection settings (incl. ``model``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"attention statistics {path} not found; make them with `litevar calibrate-attention`")
    with reading(path, UsageError, "attention statistics", "recalibrate without --from-stats"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("litevar_attention_stats") != str(STATS_VERSION):
            raise UsageError(f"{path} holds no litevar attention statistics (version {STATS_VERSION}); recalibrate "
                             "without --from-stats")
        stats = AttentionStats(*_stats_layout(metadata, tensors), float(metadata["prob_floor"]))
        collection = json.loads(metadata["collection"])
        if not isinstance(collection, dict):
            raise UsageError("its collection settings are not an object")
    expected = {"queries": stats.queries}
    expected |= {f"hist.{g}.{k}.{j}": h for g, blocks in stats.hist.items() for (k, j), h in blocks.items()}
    wrong = sorted(name for name, t in expected.items()
                   if name not in tensors or tensors[name].shape != t.shape)
    if wrong or set(tensors) != set(expected):
        raise UsageError(f"{path} is damaged or from another litevar version (bad or missing {wrong[:3]}); recalibrate")
    stats.queries = tensors["queries"].double()
    for geometry, blocks in stats.hist.items():
        for (k, j) in blocks:
            blocks[(k, j)] = tensors[f"hist.{geometry}.{k}.{j}"].double()
    return stats, collection


def plan_name(geometry: str, threshold: float) -> str:
    return f"plan_{geometry}_t{threshold:g}.json"


def plan_summary(plan: WindowPlan) -> dict[str, Any]:
    """Kept fraction of query-key pairs, attention-FLOP reduction and DROP/FULL counts of the windowed blocks."""
    K = len(plan.patch_nums)
    blocks = [plan.windows[:, :, k, j] for k in range(plan.full_query_scales, K)
              for j in range(plan.kept_key_scales, k + 1)]
    windows = torch.stack(blocks) if blocks else torch.zeros(0, dtype=torch.int32)
    kept = plan.kept_fraction()
    return {"kept_fraction": kept, "attention_flop_reduction": 1 - kept, "windowed_blocks": windows.numel(),
            "drop_blocks": int((windows == DROP).sum()), "full_blocks": int((windows == FULL).sum())}


def _floats(values: list[float], name: str, low_open: float, high: float) -> list[float]:
    for v in values:
        if not low_open < v <= high:
            raise UsageError(f"{name} must be in ({low_open:g}, {high:g}], got {v:g}")
    return list(dict.fromkeys(values))


def _check_plan_args(args: argparse.Namespace, scales: int) -> None:
    if not 0 <= args.drop_share < 1:
        raise UsageError(f"--drop-share must be in [0, 1), got {args.drop_share:g}")
    if not 0 <= args.full_query_scales <= scales:
        raise UsageError(f"--full-query-scales must be in 0..{scales} for this {scales}-scale model, "
                         f"got {args.full_query_scales}")
    if not 1 <= args.kept_key_scales <= scales:
        raise UsageError(f"--kept-key-scales must be in 1..{scales} for this {scales}-scale model, "
                         f"got {args.kept_key_scales}")


def _check_outputs(out: Path, names: list[str], collection: dict, overwrite: bool) -> list[dict]:
    """Refuse to replace plan files or to mix calibrations in one folder; returns the earlier summary entries to
    keep (those of the same calibration that this run does not replace)."""
    if not overwrite:
        for name in names:
            if (out / name).exists():
                raise UsageError(f"{out / name} exists; use another --out, or --overwrite to replace it")
    summary_path = out / SUMMARY_FILE
    if not summary_path.exists():
        return []
    try:
        previous = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        previous = {}
    if not isinstance(previous, dict) or previous.get("collection") != collection:
        if overwrite:
            return []
        raise UsageError(f"{out} holds plans of another calibration ({summary_path}); use another --out, or "
                         "--overwrite to replace it")
    return [p for p in previous.get("plans", []) if p.get("file") not in names]


def _collection_args(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) if getattr(args, key) is not None else _COLLECTION_DEFAULTS.get(key)
            for key in _COLLECTION_ARGS}


def _collect(args: argparse.Namespace) -> tuple[AttentionStats | None, dict, Any]:
    """(None, collection settings, pipeline) after loading the model (nothing generated yet), or with
    --from-stats (stats, their collection settings, None) without loading a model."""
    if args.from_stats is not None:
        given = [flag for key, flag in _COLLECTION_ARGS.items() if getattr(args, key) is not None]
        if given:
            raise UsageError(f"--from-stats takes the model and collection settings from the statistics file; "
                             f"drop {', '.join(given)}")
        stats, collection = load_stats(args.from_stats)
        return stats, collection, None
    settings = _collection_args(args)
    positive("--samples", settings["samples"])
    positive("--batch-size", settings["batch_size"])
    if not 0 <= settings["prob_floor"] < 1:
        raise UsageError(f"--prob-floor must be in [0, 1), got {settings['prob_floor']:g}")
    from ..pipeline import check_sampling_args
    from ..recipe import build_pipeline

    pipe = build_pipeline(settings["dtype"], args.var_ckpt, args.vae_ckpt, args.config, device=args.device)
    sampling = pipe.resolve_sampling(cfg=settings["cfg"], top_k=settings["top_k"], top_p=settings["top_p"],
                                     more_smooth=False)
    check_sampling_args(sampling["cfg"], sampling["top_k"], sampling["top_p"])
    collection = {"model": model_identity(pipe.var), "var_ckpt": str(args.var_ckpt or "default"),
                  "vae_ckpt": str(args.vae_ckpt or "default"), "config": str(args.config), "dtype": settings["dtype"],
                  "samples": settings["samples"], "batch_size": settings["batch_size"], "seed": settings["seed"],
                  "sampling": sampling, "prob_floor": settings["prob_floor"]}
    return None, collection, pipe


def cmd_calibrate(args: argparse.Namespace) -> None:
    thresholds = _floats(args.threshold, "--threshold", 0.0, 1.0)
    geometries = list(dict.fromkeys(args.geometry))
    bad = [g for g in geometries if g not in GEOMETRIES]
    if bad:
        raise UsageError(f"unknown --geometry {bad[0]!r}; use one of {', '.join(GEOMETRIES)}")
    out = Path(args.out)
    check_writable(out)
    stats, collection, pipe = _collect(args)
    scales = len(collection["model"]["patch_nums"])
    _check_plan_args(args, scales)
    jobs = [(g, t) for g in geometries for t in thresholds]
    names = [plan_name(g, t) for g, t in jobs]
    kept_entries = _check_outputs(out, names, collection, args.overwrite)
    stats_path = out / STATS_FILE
    same_stats = args.from_stats is not None and stats_path.exists() and stats_path.samefile(args.from_stats)
    if stats_path.exists() and not same_stats and not args.overwrite:
        raise UsageError(f"{stats_path} exists; derive more plans from it with --from-stats {stats_path}, use "
                         "another --out, or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if stats is None:
        stats = collect_stats(pipe, collection["samples"], collection["batch_size"], collection["seed"],
                              collection["prob_floor"], progress=not args.no_progress, **collection["sampling"])
    if not same_stats:
        save_stats(stats, stats_path, collection)
    entries = []
    for (geometry, threshold), name in zip(jobs, names):
        plan = stats.plan(geometry, threshold, args.drop_share, args.full_query_scales, args.kept_key_scales,
                          model=collection["model"])
        plan.meta |= {k: collection[k] for k in ("samples", "seed", "sampling", "dtype")}
        save_plan(plan, out / name)
        entries.append({"file": name, "geometry": geometry, "threshold": threshold, "drop_share": args.drop_share,
                        "full_query_scales": args.full_query_scales, "kept_key_scales": args.kept_key_scales,
                        **plan_summary(plan)})
    summary = {"litevar_attention_calibration": SUMMARY_VERSION, "collection": collection, "stats_file": STATS_FILE,
               "plans": kept_entries + entries}
    write_atomic(out / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
    print(_table(entries))
    print(f"wrote {len(entries)} plans, {out / SUMMARY_FILE} and {stats_path}")


def _table(entries: list[dict]) -> str:
    lines = ["| geometry | threshold | kept pairs | attention FLOPs saved | DROP / FULL / windowed blocks | file |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['geometry']} | {e['threshold']:g} | {e['kept_fraction']:.1%} | "
                     f"{e['attention_flop_reduction']:.1%} | {e['drop_blocks']} / {e['full_blocks']} / "
                     f"{e['windowed_blocks']} | {e['file']} |")
    return "\n".join(lines)


def _index_list(text: str | None, name: str, size: int, default: list[int]) -> list[int]:
    if text is None:
        return default
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < size]
    if not values or bad:
        raise UsageError(f"{name} must list values in 0..{size - 1}, got {text!r}")
    return list(dict.fromkeys(values))


def _kv_step(source: str | None):
    """(recipe, its kv-compress config) of ``--kv-recipe``, read before any work; (None, None) without it."""
    if source is None:
        return None, None
    from ..kvcompress.steps import KVCompressConfig
    from ..recipe import load_recipe

    recipe = load_recipe(source)
    step = next((s for s in recipe.steps if isinstance(s, KVCompressConfig)), None)
    if step is None:
        raise UsageError(f"--kv-recipe {source}: the recipe has no kv-compress step; give a recipe with "
                         '{"type": "kv-compress", ...} among its steps')
    if step.heads is not None and not Path(step.heads).is_file():
        raise UsageError(f"--kv-recipe {source}: its heads file {step.heads} is not found; make it with "
                         "`litevar calibrate-kv` or fix the path")
    return recipe, step


def cmd_analyze(args: argparse.Namespace) -> None:
    from ..pipeline import check_sampling_args
    from ..recipe import build_pipeline
    from .analysis import collect_attention_maps, draw_attention_maps, draw_cfg_similarity
    from .cfg_shared import measure_cfg_similarity

    positive("--samples", args.samples)
    positive("--batch-size", args.batch_size)
    out = Path(args.out)
    check_writable(out)
    kv_recipe, kv_step = _kv_step(args.kv_recipe)
    pipe = build_pipeline(args.dtype, args.var_ckpt, args.vae_ckpt, args.config, device=args.device)
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    layers = _index_list(args.layers, "--layers", cfg.depth, list(range(cfg.depth)))
    heads = _index_list(args.heads, "--heads", cfg.heads, list(range(min(2, cfg.heads))))
    scales = _index_list(args.scales, "--scales", K, list(range(max(0, K - 3), K)))
    plan = load_plan(args.plan, pipe.var) if args.plan else None
    sampling = pipe.resolve_sampling(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=False)
    check_sampling_args(sampling["cfg"], sampling["top_k"], sampling["top_p"])
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    maps = collect_attention_maps(pipe, layers, heads, scales, args.samples, args.batch_size, args.seed,
                                  progress=progress, **sampling)
    draw_attention_maps(maps, cfg.patch_nums, layers, heads, scales, out / "attention_maps.png", plan)
    similarity = measure_cfg_similarity(pipe, args.samples, args.batch_size, args.seed, progress=progress, **sampling)
    draw_cfg_similarity(similarity, cfg.patch_nums, out / "cfg_similarity.png")
    report = {"similarity": similarity.tolist(), "patch_nums": list(cfg.patch_nums), "model": model_identity(pipe.var),
              "samples": args.samples, "seed": args.seed, "dtype": args.dtype, "sampling": sampling,
              "what": "mean cosine similarity [layer][scale] of the cond and uncond attention outputs (after proj)"}
    write_atomic(out / "cfg_similarity.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    lowest = similarity.min().item()
    print(f"cond/uncond attention-output similarity: mean {similarity.mean().item():.3f}, lowest {lowest:.3f}")
    print(f"wrote {out / 'attention_maps.png'}, {out / 'cfg_similarity.png'} and {out / 'cfg_similarity.json'}")
    if kv_recipe is not None:
        from ..kvcompress.figures import write_kv_figures

        del pipe, maps  # the recipe's pipeline is loaded anew: at most one model in memory
        kv_pipe = build_pipeline(kv_recipe, args.var_ckpt, args.vae_ckpt, args.config, device=args.device)
        written = write_kv_figures(kv_pipe, kv_step, layers, (args.samples, args.batch_size, args.seed), out,
                                   progress=progress, extra={"recipe": kv_recipe.to_dict(), "model": report["model"]},
                                   **sampling)
        print(f"wrote {', '.join(str(p) for p in written)}")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", type=float, help="classifier-free guidance strength (default: the model card's, else 1.5)")
    p.add_argument("--top-k", type=int, help="default: the model card's, else 900")
    p.add_argument("--top-p", type=float, help="default: the model card's, else 0.96")


def add_attention_commands(sub: Any) -> None:
    """Register ``litevar calibrate-attention`` and ``litevar analyze-attention``."""
    c = sub.add_parser("calibrate-attention", help="calibrate MDWA window plans (LiteVAR) on generated samples",
                       description="Generates --samples images once, records where the attention mass lies, and "
                       "writes OUT/plan_{geometry}_t{threshold}.json per geometry x threshold, OUT/calibration.json "
                       f"(kept fractions, FLOP reduction) and the raw statistics OUT/{STATS_FILE}.")
    add_model_args(c)
    c.add_argument("--threshold", type=float, nargs="+", default=[0.95],
                   help="share of each block's attention mass the window must hold, in (0, 1] (default 0.95)")
    c.add_argument("--geometry", nargs="+", default=list(GEOMETRIES), help="raster and/or 2d (default both)")
    c.add_argument("--samples", type=int, help="calibration images (default 64)")
    c.add_argument("--batch-size", type=int, help="default 16")
    c.add_argument("--seed", type=int, help="image i uses seed + i (default 0)")
    _sampling_args(c)
    c.add_argument("--dtype", choices=("fp32", "bf16"), help="generation precision (default bf16)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--drop-share", type=float, default=0.02,
                   help="drop blocks holding less than this share of their queries' mass (default 0.02)")
    c.add_argument("--full-query-scales", type=int, default=3, help="queries of the first N scales attend fully")
    c.add_argument("--kept-key-scales", type=int, default=3, help="keys of the first N scales are always kept")
    c.add_argument("--prob-floor", type=float, help="probabilities below this count as zero (default 0.003)")
    c.add_argument("--from-stats", metavar="FILE",
                   help=f"derive plans from saved statistics ({STATS_FILE}) instead of generating")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace existing plan files")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser("analyze-attention", help="attention maps and cond/uncond similarity figures (LiteVAR Fig. 2); "
                       "kept-key figures of a kv-compress recipe",
                       description="Writes OUT/attention_maps.png (mean attention of chosen layers/heads/query "
                       "scales over all cached keys), OUT/cfg_similarity.png and OUT/cfg_similarity.json; with "
                       "--kv-recipe also OUT/kv_kept_keys.png and .json (which keys the recipe's KV policy keeps "
                       "per layer, head and scale) and, for policy hack, OUT/kv_heads.png (the head types).")
    add_model_args(a)
    a.add_argument("--layers", help="comma-separated layers (default: all)")
    a.add_argument("--heads", help="comma-separated heads (default: 0,1)")
    a.add_argument("--scales", help="comma-separated query scales to draw (default: the last three)")
    a.add_argument("--samples", type=int, default=8)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    _sampling_args(a)
    a.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    a.add_argument("--device", default="cpu")
    a.add_argument("--plan", help="a window plan JSON: outline its kept region on the maps")
    a.add_argument("--kv-recipe", metavar="RECIPE",
                   help="a recipe JSON with a kv-compress step: also draw which keys its KV policy keeps (the same "
                   "samples, in the recipe's dtype)")
    a.add_argument("--out", required=True, help="output folder (its figures are replaced)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_analyze)
