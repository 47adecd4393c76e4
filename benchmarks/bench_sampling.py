"""Sampling throughput of the litevar engine (random weights of a released shape), optionally side by side
with the upstream VAR sampler run on the same weights in the same benchmark.

    python benchmarks/bench_sampling.py --model var-d16 --dtypes fp32 bf16 --batches 1 8 \
        --out benchmarks/results/sampling_cpu.json [--upstream PATH_TO_UPSTREAM_VAR_CHECKOUT]

Writes JSON: per (dtype, batch) images/s, seconds per batch, the transformer / sampling / decoder split,
seconds per scale, peak RSS (CPU) or max allocated (GPU), plus the CPU flags. With ``--upstream`` the
upstream ``autoregressive_infer_cfg`` (bf16/fp16 autocast or fp32, as upstream runs it) is timed in a
subprocess on a copy of the same weights and the ratios are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from litevar.pipeline import parse_dtype, random_pipeline  # noqa: E402

CFG, TOP_K, TOP_P = 1.5, 900, 0.96


def cpu_flags() -> dict:
    flags = set()
    model = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"]
    return {"model": model or platform.processor(), "threads": torch.get_num_threads(),
            "flags": [f for f in wanted if f in flags], "torch": torch.__version__}


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak counters: CUDA's, and Linux's per-process peak RSS (VmHWM) via clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Max allocated (GPU) or peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited from the
    parent across fork/exec, so a subprocess reports its own peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_litevar(model: str, dtype: str, batch: int, repeats: int, device: torch.device) -> dict:
    reset_peak_memory(device)
    pipe = random_pipeline(model, seed=0, device=device, dtype=dtype)
    labels = [i % pipe.num_classes for i in range(batch)]
    pipe.generate(labels, seed=0, cfg=CFG, top_k=TOP_K, top_p=TOP_P, progress=False)
    runs = []
    for r in range(repeats):
        start = time.perf_counter()
        out = pipe.generate(labels, seed=r, cfg=CFG, top_k=TOP_K, top_p=TOP_P, progress=False, timings=True)
        runs.append((time.perf_counter() - start, out.timings))
    best_s, best_t = min(runs, key=lambda run: run[0])
    return {"engine": "litevar", "dtype": dtype, "batch": batch, "seconds_per_batch": best_s,
            "seconds_per_batch_median": statistics.median(r[0] for r in runs), "images_per_s": batch / best_s,
            "transformer_s": best_t["transformer"], "sampling_s": best_t["sampling"], "decoder_s": best_t["decoder"],
            "per_scale_transformer_s": best_t["per_scale"], "kv_cache_bytes": best_t["kv_cache_bytes"],
            "peak_memory_mb": peak_memory_mb(device), "repeats": repeats}


def run_upstream(upstream: Path, weights: Path, dtype: str, batch: int, repeats: int) -> dict:
    """Time upstream's sampler (imported from the user's checkout) in a fresh process."""
    cmd = [sys.executable, __file__, "--_upstream-worker", str(upstream), str(weights), dtype, str(batch),
           str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"upstream run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _upstream_worker(upstream: str, weights: str, dtype: str, batch: int, repeats: int) -> None:
    sys.path.insert(0, upstream)
    from models import build_vae_var  # upstream code, from the user's checkout

    state = torch.load(weights, weights_only=True)
    vae, var = build_vae_var(device="cpu")
    vae.load_state_dict(state["vae"], strict=True)
    var.load_state_dict(state["var"], strict=True)
    var.eval()
    vae.eval()
    labels = torch.arange(batch) % 1000
    low = parse_dtype(dtype)

    def once(seed: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=low, enabled=low != torch.float32):
            var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=seed, cfg=CFG, top_k=TOP_K, top_p=TOP_P)
        return time.perf_counter() - start

    once(0)
    times = [once(r) for r in range(repeats)]
    print(json.dumps({"engine": "upstream", "dtype": dtype, "batch": batch, "seconds_per_batch": min(times),
                      "seconds_per_batch_median": statistics.median(times), "images_per_s": batch / min(times),
                      "peak_memory_mb": peak_memory_mb(torch.device("cpu")), "repeats": repeats}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_upstream-worker":
        _upstream_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="var-d16")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--upstream", type=Path, default=None, help="a checkout of FoundationVision/VAR to time too")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for dtype in args.dtypes:
        for batch in args.batches:
            row = {"litevar": bench_litevar(args.model, dtype, batch, args.repeats, device)}
            print(json.dumps(row["litevar"]), flush=True)
            results.append(row)
    if args.upstream is not None:
        pipe = random_pipeline(args.model, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "weights.pth"
            torch.save({"var": pipe.var.state_dict(), "vae": pipe.vae.state_dict()}, weights)
            del pipe
            for row in results:
                lv = row["litevar"]
                row["upstream"] = run_upstream(args.upstream, weights, lv["dtype"], lv["batch"], args.repeats)
                row["speedup_vs_upstream"] = row["upstream"]["seconds_per_batch"] / lv["seconds_per_batch"]
                print(json.dumps(row["upstream"]), f"speedup {row['speedup_vs_upstream']:.2f}x", flush=True)
    report = {"benchmark": "sampling", "model_shape": args.model, "random_weights": True, "cfg": CFG, "top_k": TOP_K,
              "top_p": TOP_P, "device": str(device), "cpu": cpu_flags(),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "upstream_reference_MACHINE_md": {"bf16_batch8_images_per_s": 0.24, "bf16_batch8_s": 33.1},
              "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
