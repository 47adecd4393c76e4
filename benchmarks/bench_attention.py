"""Attention time of KV-cached sampling: dense SDPA vs MDWA (masked dense kernel, the PyTorch gathered kernel,
and the compiled interval kernel that sampling uses where it is built).

For a model shape (e.g. var-d16 at the 256 px pyramid, or its 512 px pyramid), every query scale k runs
queries [2B, H, n_k^2, d] over the cached keys [2B, H, L_k, d], as sampling does. The window plan is either a
calibrated plan file (tiled over layers/heads when its model is smaller) or a uniform plan whose kept fraction
is closest to ``--kept-fraction``. Reports per-scale and total attention seconds for all layers and the ratios.

    python benchmarks/bench_attention.py --shape var-d16 --kept-fraction 0.3 --out benchmarks/results/attention_d16_256.json
    python benchmarks/bench_attention.py --shape var-d16 --pyramid 1 2 3 4 6 9 13 18 24 32 --kept-fraction 0.3 ...
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from litevar.attention.calibrate import load_plan, save_plan
from litevar.attention.native import interval_kernel_supports
from litevar.attention.sparse import GatheredLayout, gathered_attention, sparse_attention, sparse_layout
from litevar.attention.windows import WindowPlan
from litevar.eval.bench import machine_info
from litevar.models.configs import load_config
from litevar.pipeline import parse_dtype


def uniform_plan(patch_nums, depth, heads, geometry, width) -> WindowPlan:
    K = len(patch_nums)
    windows = torch.full((depth, heads, K, K), width, dtype=torch.int32)
    return WindowPlan(tuple(patch_nums), windows, geometry)


def closest_uniform_plan(patch_nums, depth, heads, geometry, target) -> WindowPlan:
    """The uniform-width plan (same width for every block beyond the first scales) nearest to ``target``."""
    best = None
    for width in range(1, max(patch_nums) ** 2 + 2):
        plan = uniform_plan(patch_nums, 1, 1, geometry, width)
        fraction = plan.kept_fraction()
        if best is None or abs(fraction - target) < abs(best[1] - target):
            best = (width, fraction)
        if fraction >= 1.0:
            break
    return uniform_plan(patch_nums, depth, heads, geometry, best[0])


def tiled_plan(plan: WindowPlan, depth: int, heads: int) -> WindowPlan:
    """A calibrated plan of a smaller model repeated over layers and heads (same pyramid)."""
    windows = plan.windows[torch.arange(depth) % plan.depth][:, torch.arange(heads) % plan.heads]
    return WindowPlan(plan.patch_nums, windows, plan.geometry, plan.full_query_scales, plan.kept_key_scales)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def run(args) -> dict:
    cfg = load_config(args.shape).var
    patch_nums = tuple(args.pyramid or cfg.patch_nums)
    depth, heads, d = cfg.depth, cfg.heads, cfg.head_dim
    if args.plan:
        source = load_plan(args.plan)
        if tuple(source.patch_nums) != patch_nums:
            raise SystemExit(f"the plan's pyramid {source.patch_nums} differs from {patch_nums}")
        plan = tiled_plan(source, depth, heads)
    else:
        plan = closest_uniform_plan(patch_nums, depth, heads, args.geometry, args.kept_fraction)
        plan.meta = {"uniform": True, "target_kept_fraction": args.kept_fraction}
        if args.save_plan:  # e.g. for an `mdwa` recipe step on the random-weight shape (the plan names no model)
            save_plan(plan, args.save_plan)
    dtype = parse_dtype(args.dtype)
    native = interval_kernel_supports(torch.empty(1, 1, 1, d, dtype=dtype))
    rows = 2 * args.batch
    g = torch.Generator().manual_seed(0)
    L_total = sum(p * p for p in patch_nums)
    k_all = torch.randn(rows, heads, L_total, d, generator=g).to(dtype)
    v_all = torch.randn(rows, heads, L_total, d, generator=g).to(dtype)
    signature = {}  # layers with identical windows are timed once
    for layer in range(depth):
        signature.setdefault(tuple(plan.windows[layer].flatten().tolist()), []).append(layer)
    per_scale = []
    begin = 0
    for k, n in enumerate(patch_nums):
        l = n * n
        end = begin + l
        q = torch.randn(rows, heads, l, d, generator=g).to(dtype)
        keys, values = k_all[:, :, :end], v_all[:, :, :end]
        dense_s = _median_time(lambda: F.scaled_dot_product_attention(q, keys, values, scale=1.0), args.repeats) * depth
        masked_s = gathered_s = native_s = 0.0
        kept = total = computed = native_computed = 0
        tiles = set()
        for layers in signature.values():
            layer = layers[0]
            keep = plan.keep_mask(layer, k)
            bias = plan.attn_bias(layer, k, dtype, "cpu")
            layout = GatheredLayout.from_mask(keep, "cpu", tile=args.tile)
            masked_s += len(layers) * _median_time(
                lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=1.0), args.repeats)
            gathered_s += len(layers) * _median_time(lambda: gathered_attention(q, keys, values, 1.0, layout),
                                                     args.repeats)
            if native:
                chosen = sparse_layout(keep, q)
                native_s += len(layers) * _median_time(lambda: sparse_attention(q, keys, values, 1.0, chosen),
                                                       args.repeats)
                native_computed += len(layers) * chosen.kept_pairs * rows
            kept += len(layers) * int(keep.sum())
            computed += len(layers) * layout.kept_pairs * rows
            tiles.add(layout.tile)
            total += len(layers) * keep.numel()
        per_scale.append({"scale": k, "side": n, "queries": l, "keys": end, "kept_fraction": kept / total,
                          "computed_fraction": computed / (total * rows), "tiles": sorted(tiles),
                          "native_computed_fraction": native_computed / (total * rows) if native else None,
                          "dense_s": dense_s, "masked_s": masked_s, "gathered_s": gathered_s,
                          "native_s": native_s if native else None})
        begin = end
    dense = sum(s["dense_s"] for s in per_scale)
    masked = sum(s["masked_s"] for s in per_scale)
    gathered = sum(s["gathered_s"] for s in per_scale)
    seconds = {"dense": dense, "masked": masked, "gathered": gathered}
    ratios = {"dense_over_gathered": dense / gathered, "dense_over_masked": dense / masked}
    weight = [s["queries"] * s["keys"] for s in per_scale]
    if native:
        seconds["native"] = sum(s["native_s"] for s in per_scale)
        ratios["dense_over_native"] = dense / seconds["native"]
    return {"shape": args.shape, "patch_nums": list(patch_nums), "tokens": L_total, "depth": depth, "heads": heads,
            "head_dim": d, "batch": args.batch, "rows": rows, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "plan": args.plan or f"uniform {plan.geometry} width {int(plan.windows.max())}",
            "kept_fraction": plan.kept_fraction(), "attention_flop_reduction": 1 - plan.kept_fraction(),
            "computed_fraction": sum(s["computed_fraction"] * w for s, w in zip(per_scale, weight)) / sum(weight),
            "native_computed_fraction": sum(s["native_computed_fraction"] * w for s, w in zip(per_scale, weight))
            / sum(weight) if native else None,
            "tile": args.tile, "repeats": args.repeats, "seconds": seconds, "ratios": ratios,
            "per_scale": per_scale, "machine": machine_info()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="var-d16")
    parser.add_argument("--pyramid", type=int, nargs="+", help="patch sides (default: the shape's)")
    parser.add_argument("--plan", help="a calibrated plan file (tiled over layers/heads); default: a uniform plan")
    parser.add_argument("--kept-fraction", type=float, default=0.3, help="target kept fraction of the uniform plan")
    parser.add_argument("--geometry", default="2d", choices=("raster", "2d"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tile", type=int, help="queries per tile of the gathered kernel (default: chosen per scale)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--save-plan", help="also write the uniform plan used here (a plan file)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    s, r = report["seconds"], report["ratios"]
    native = f", native {s['native']:.3f}s ({r['dense_over_native']:.2f}x)" if "native" in s else ""
    print(f"{report['shape']} {report['tokens']} tokens, kept {report['kept_fraction']:.3f}: attention dense "
          f"{s['dense']:.3f}s, masked {s['masked']:.3f}s, gathered {s['gathered']:.3f}s "
          f"({r['dense_over_gathered']:.2f}x){native}; wrote {out}")


if __name__ == "__main__":
    main()
