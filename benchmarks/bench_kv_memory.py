"""KV-cache memory and time of a ``kv-compress`` recipe next to the dense model on a released shape.

Each (variant, batch) runs one whole generation in a fresh spawned process (seeded random weights, the same
labels and per-image seeds), so peak RSS belongs to that variant alone; ``--rounds`` alternates the variants
(A B, B A, ...). Per run: seconds, the peak RSS of the generation (the kernel's high-water mark reset after
loading, so it includes the resident weights but not the loading transient), and the KV bytes reserved (allocated)
and held at the end. Lighter than ``litevar bench`` (no FLOP count, no attention-layer timing), for shapes where
one generation takes minutes. Writes JSON.

    python benchmarks/bench_kv_memory.py --shape var-d30 --recipe benchmarks/recipes/kv/shapes/hack_r70_var-d30.json \
        --batch 8 1 --threads 2 --out benchmarks/results/kv/shapes/memory_var-d30_hack_r70.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import statistics
import time
from pathlib import Path

import torch

from litevar import load_recipe
from litevar.eval.bench import machine_info, peak_rss_mb, reset_peak_rss, rss_mb
from litevar.jobs import JobList


def _run(spec: dict) -> dict:
    """One generation of one variant (inside the spawned process)."""
    from litevar.recipe import build_pipeline

    torch.set_num_threads(spec["threads"])
    pipe = build_pipeline(load_recipe(spec["recipe"]), random_shape=spec["shape"])
    labels, seeds = JobList(range(pipe.num_classes), samples=spec["batch"], seed=0).batch(range(spec["batch"]))
    rss_loaded = rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        out = pipe.generate(labels, seed=seeds, progress=False, timings=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_loaded_mb": rss_loaded,
            "kv_reserved_bytes": out.timings["kv_reserved_bytes"], "kv_cache_bytes": out.timings["kv_cache_bytes"],
            "transformer_s": out.timings["transformer"], "dtype": str(pipe.dtype).removeprefix("torch.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--recipe", required=True, help="candidate recipe JSON (its dtype is the dense one's too)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or choose another --out")
    candidate = load_recipe(args.recipe)
    variants = {"dense": {"litevar_recipe": 1, "name": "dense", "dtype": candidate.dtype, "steps": []},
                "candidate": candidate.to_dict()}
    runs: dict[str, dict[int, list[dict]]] = {v: {b: [] for b in args.batch} for v in variants}
    context = multiprocessing.get_context("spawn")
    for r in range(args.rounds):
        for batch in args.batch:
            for name in (("dense", "candidate") if r % 2 == 0 else ("candidate", "dense")):
                spec = {"recipe": variants[name], "shape": args.shape, "batch": batch, "threads": args.threads}
                with ProcessPoolExecutor(1, mp_context=context) as pool:
                    result = pool.submit(_run, spec).result()
                runs[name][batch].append(result)
                print(f"round {r} batch {batch} {name}: {result['seconds']:.1f} s, peak {result['peak_rss_mb']:.0f} MiB, "
                      f"KV reserved {result['kv_reserved_bytes'] / 2**20:.1f} MiB", flush=True)
    summary = []
    for batch in args.batch:
        d, c = runs["dense"][batch], runs["candidate"][batch]
        ratios = [a["seconds"] / b["seconds"] for a, b in zip(d, c)]
        summary.append({"batch": batch,
                        "dense": {k: statistics.median(x[k] for x in d) for k in ("seconds", "peak_rss_mb")}
                        | {"kv_reserved_bytes": d[-1]["kv_reserved_bytes"], "kv_cache_bytes": d[-1]["kv_cache_bytes"]},
                        "candidate": {k: statistics.median(x[k] for x in c) for k in ("seconds", "peak_rss_mb")}
                        | {"kv_reserved_bytes": c[-1]["kv_reserved_bytes"], "kv_cache_bytes": c[-1]["kv_cache_bytes"]},
                        "speedup_median": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]})
    report = {"litevar_kv_memory": 1, "shape": args.shape, "recipe": candidate.to_dict(), "dtype": candidate.dtype,
              "rounds": args.rounds, "threads": args.threads, "machine": machine_info(),
              "summary": summary, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
