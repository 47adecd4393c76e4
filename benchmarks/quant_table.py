"""The README's quantization table from the `litevar eval` JSONs of benchmarks/recipes/quant/default (make quant-default).

    python benchmarks/quant_table.py --results benchmarks/results/quant
prints one Markdown row per recipe (bit widths, method, fidelity to dense fp32, quality vs data); recipes without
an eval report yet are listed as not run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from litevar.eval.tables import SUMMARY_HEADER, summary_cells


def _bits(step: dict) -> str:
    w, a = step.get("w_bits", 8), step.get("a_bits", 8)
    group = f" g{step['w_group_size']}" if step.get("w_group_size") else ""
    attn = f", attention {step['attn_bits']} bit" if step.get("attn_bits") else ""
    return f"W{w}A{a if a is not None else 16}{group}{attn}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="benchmarks/recipes/quant/default")
    parser.add_argument("--results", default="benchmarks/results/quant")
    args = parser.parse_args()
    rows = []
    for path in sorted(Path(args.recipes).glob("*.json")):
        step = json.loads(path.read_text())["steps"][0]
        report_path = Path(args.results) / f"eval_{path.stem}.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        cells = summary_cells(report) if report else ["not run yet"] + ["-"] * (len(SUMMARY_HEADER) - 1)
        rows.append((_bits(step), step["type"], cells))
    print("| bits | method | " + " | ".join(SUMMARY_HEADER) + " |")
    print("|" + "---|" * (2 + len(SUMMARY_HEADER)))
    for bits, method, cells in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"| {bits} | {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
