"""M-VAR against VAR, whole generations side by side: latency at batch 1, throughput at a batch, peak memory, and
what each carries between scales (VAR's KV cache vs M-VAR's conv rows + SSM state).

    python benchmarks/bench_mvar_vs_var.py --pair default:default-mvar --batch 8 --rounds 3 \
        --out benchmarks/results/mvar/pairs_default.json
    python benchmarks/bench_mvar_vs_var.py --pair var-d16:mvar-d16 --pair var-d24:mvar-d24 --pair var-d30:mvar-d32 \
        --batch 1 --rounds 2 --out benchmarks/results/mvar/pairs_released_shapes_fp32.json

A model is a shipped name (default, default-mvar), a checkpoint path, or a released shape (var-d16, mvar-d32, ...)
with seeded random weights (timing and memory do not depend on them). Every measurement is one fresh spawned
process (so its peak RSS is its own) that loads the model, warms up on one image, then times one generation at
batch 1 and one at --batch. The two models of a pair alternate (A B, then B A, ...) so drifting load hits both
alike; medians over rounds, and the ratios VAR / M-VAR (> 1: M-VAR is faster or smaller).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from litevar import build_pipeline  # noqa: E402
from litevar.eval.bench import machine_info, peak_rss_mb, reset_peak_rss, run_isolated  # noqa: E402
from litevar.jobs import JobList  # noqa: E402


def measure_model(spec: dict) -> dict:
    """One model in this (spawned) process: load, warm up, batch 1, then spec["batch"]."""
    torch.set_num_threads(spec["threads"])
    reset_peak_rss()
    name = spec["model"]
    shape = name if name.startswith(("var-", "mvar-")) else None  # a released shape
    start = time.perf_counter()
    pipe = build_pipeline(spec["dtype"], None if shape else name, random_shape=shape)
    load_s = time.perf_counter() - start
    batch = spec["batch"]
    labels, seeds = JobList(range(pipe.num_classes), samples=batch, seed=0).batch(range(batch))
    pipe.generate(labels[:1], seed=seeds[:1], progress=False)
    runs = {}
    for b in sorted({1, batch}):
        start = time.perf_counter()
        out = pipe.generate(labels[:b], seed=seeds[:b], progress=False, timings=True)
        runs[b] = {"seconds": time.perf_counter() - start, **{k: v for k, v in out.timings.items() if k != "per_scale"}}
    carried = runs[batch].get("mamba_state_bytes", runs[batch]["kv_cache_bytes"])
    return {"arch": type(pipe.var).__name__, "params": sum(p.numel() for p in pipe.var.parameters()),
            "latency_s": runs[1]["seconds"], "images_per_s": batch / runs[batch]["seconds"],
            "peak_rss_mb": peak_rss_mb(), "carried_bytes": carried, "load_s": load_s,
            "stages_batch1_s": {k: runs[1][k] for k in ("transformer", "sampling", "decoder")}}


def bench_pair(pair: tuple[str, str], base: dict, rounds: int) -> dict:
    measured: dict[str, list[dict]] = {name: [] for name in pair}
    for r in range(rounds):
        for name in (pair if r % 2 == 0 else pair[::-1]):
            m = run_isolated(name, {**base, "model": name}, measure_model)
            measured[name].append(m)
            print(f"round {r} {name}: batch 1 {m['latency_s']:.2f} s, batch {base['batch']} "
                  f"{m['images_per_s']:.3f} img/s, peak {m['peak_rss_mb']:.0f} MiB", flush=True)
    report = {}
    for name, runs in measured.items():
        report[name] = {**{k: runs[-1][k] for k in ("arch", "params", "carried_bytes")},
                        **{k: statistics.median(m[k] for m in runs) for k in ("latency_s", "images_per_s", "peak_rss_mb")},
                        "latency_all_s": [m["latency_s"] for m in runs], "images_per_s_all": [m["images_per_s"] for m in runs],
                        "stages_batch1_s": runs[-1]["stages_batch1_s"]}
    var, mvar = (report[name] for name in pair)
    ratios = {"latency": var["latency_s"] / mvar["latency_s"], "throughput": mvar["images_per_s"] / var["images_per_s"],
              "peak_rss": var["peak_rss_mb"] / mvar["peak_rss_mb"], "carried_bytes": var["carried_bytes"] / mvar["carried_bytes"],
              "latency_per_round": [v / m for v, m in zip(var["latency_all_s"], mvar["latency_all_s"])]}
    return {"var": pair[0], "mvar": pair[1], "models": report, "ratios_var_over_mvar": ratios}


def parse_pair(text: str) -> tuple[str, str]:
    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(f"--pair takes VAR:M-VAR, e.g. var-d16:mvar-d16, got {text!r}")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", type=parse_pair, action="append", required=True, help="VAR:M-VAR (repeatable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="fp32", help="fp32 (AVX2-only CPUs run bf16 ~10x slower), bf16, fp16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    base = {"dtype": args.dtype, "threads": args.threads, "batch": args.batch}
    pairs = [bench_pair(pair, base, args.rounds) for pair in args.pair]
    report = {"what": "M-VAR vs VAR, whole generations", "settings": {**base, "rounds": args.rounds,
                                                                      "sampling": "each model's defaults"},
              "machine": machine_info(), "pairs": pairs, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for pair in pairs:
        r = pair["ratios_var_over_mvar"]
        print(f"{pair['var']} / {pair['mvar']}: latency {r['latency']:.2f}x, throughput {r['throughput']:.2f}x, "
              f"peak RSS {r['peak_rss']:.2f}x, carried bytes {r['carried_bytes']:.1f}x")


if __name__ == "__main__":
    main()
