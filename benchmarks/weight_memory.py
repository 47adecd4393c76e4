"""Transformer weight memory of quantized recipes next to bf16, on a released shape with random weights.

    python benchmarks/weight_memory.py --shape var-d16 --out benchmarks/results/quant/weight_memory_d16.json

Bytes are what the modules store (int8/int4 weights plus their scales and zero points, float biases and every
parameter and buffer that stays in bf16): the whole transformer, and its Linear weights alone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from litevar.eval.bench import _weight_bytes, machine_info
from litevar.quant.commands import weight_bytes
from litevar.recipe import build_pipeline

RECIPES = {"bf16": "bf16", "W8A8 int8": "benchmarks/recipes/quant/w8a8_stwq_int8_bf16.json",
           "W8 weight-only int8": "benchmarks/recipes/quant/w8_int8_bf16.json",
           "W4 g128 weight-only int4": "benchmarks/recipes/quant/w4_int4_bf16.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="var-d16")
    parser.add_argument("--out", default="benchmarks/results/quant/weight_memory_d16.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for name, recipe in RECIPES.items():
        pipe = build_pipeline(recipe, random_shape=args.shape)
        rows[name] = {"recipe": recipe, "transformer_bytes": _weight_bytes(pipe.var),
                      "linear_weight_bytes": sum(weight_bytes(pipe.var).values())}
        del pipe
    base = rows["bf16"]
    for row in rows.values():
        row["transformer_ratio"] = row["transformer_bytes"] / base["transformer_bytes"]
        row["linear_weight_ratio"] = row["linear_weight_bytes"] / base["linear_weight_bytes"]
    report = {"shape": args.shape, "random_weights": True, "machine": machine_info(), "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, row in rows.items():
        print(f"{name:26s} {row['transformer_bytes'] / 2**20:8.1f} MiB  {row['transformer_ratio']:.3f} of bf16")


if __name__ == "__main__":
    main()
