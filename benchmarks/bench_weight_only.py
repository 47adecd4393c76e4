"""Weight-only quantized Linear vs the bf16 Linear on CPU, for the Linear shapes of VAR-d16.

    python benchmarks/bench_weight_only.py --threads 1 --out benchmarks/results/weight_only_cpu.json [--quick]

Variants per (M, K, N): ``bf16`` (``F.linear``), and for int8 and int4 (group 128) both paths of the module:
``kernel`` (the fused ATen CPU kernel, forced) and ``dequant`` (dequantize + ``F.linear``, forced). The variants
alternate within every repetition so that drifting machine load hits all of them alike; the median is reported.
Writes JSON: machine info, then one row per shape with median/min milliseconds per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sampling import cpu_flags  # noqa: E402
from litevar.quant.weight_only import WeightOnlyInt4Linear, WeightOnlyInt8Linear, aten_int4_packing  # noqa: E402

ROWS = (16, 256, 4096)
# d16 (width 1024): qkv 1024->3072, fc1 1024->4096, fc2 4096->1024
SHAPES = ((1024, 3072), (1024, 4096), (4096, 1024))


def variants(K: int, N: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(torch.bfloat16)
    int8 = WeightOnlyInt8Linear.from_linear(linear)
    int4 = WeightOnlyInt4Linear.from_linear(linear, group_size=128)

    def forced(module, max_rows):
        def run(x):
            module.kernel_max_rows = max_rows
            return module(x)
        return run

    return {"bf16": lambda x: F.linear(x, linear.weight, linear.bias),
            "int8_kernel": forced(int8, sys.maxsize), "int8_dequant": forced(int8, 0),
            "int4_kernel": forced(int4, sys.maxsize), "int4_dequant": forced(int4, 0)}


def time_shape(M: int, K: int, N: int, repeats: int) -> dict:
    fns = variants(K, N)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {"M": M, "K": K, "N": N, "repeats": repeats,
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "min_ms": {k: 1e3 * min(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="one small case only (M=16, 1024->3072)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(16, *SHAPES[0])] if args.quick else [(M, K, N) for M in ROWS for K, N in SHAPES]
    rows = []
    for M, K, N in cases:
        row = time_shape(M, K, N, max(args.repeats, 10))
        rows.append(row)
        print(f"M={M:5d} {K}->{N}: " + "  ".join(f"{k} {v:.3f}" for k, v in row["median_ms"].items()) + " ms",
              flush=True)
    machine = {**cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "int4_packing": aten_int4_packing()}
    result = {"machine": machine, "dtype": "bf16", "int4_group_size": 128, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
