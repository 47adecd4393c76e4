"""The KV-cache compression tables from `litevar eval` and `litevar bench` JSONs.

    python benchmarks/kv_table.py --results benchmarks/results/kv
prints two Markdown tables: the default model (eval_<name>.json and bench_<name>.json per recipe, names
<policy>_r<percent removed>[_variant]) and the released shapes with random weights (shapes/memory_*.json from benchmarks/bench_kv_memory.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from litevar.eval.tables import SUMMARY_HEADER, summary_cells

MIB = 2 ** 20


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _memory_cells(be: dict | None) -> list[str]:
    """Reserved KV (MiB, share of dense), peak memory (MB) and batch time ratio of one bench report."""
    if be is None:
        return ["-"] * 3
    d, c = be["dense"], be["candidate"]
    return [f"{c['kv_reserved_bytes'] / MIB:.2f} ({100 * c['kv_reserved_bytes'] / d['kv_reserved_bytes']:.0f}%)",
            f"{d['peak_memory_mb']:.0f} / {c['peak_memory_mb']:.0f}",
            f"{be['ratios']['throughput_time']:.2f}x"]


def default_table(folder: Path) -> list[str]:
    names = sorted({p.stem.split("_", 1)[1] for p in folder.glob("eval_*.json")} |
                   {p.stem.split("_", 1)[1] for p in folder.glob("bench_*.json")})
    lines = ["| recipe | " + " | ".join(SUMMARY_HEADER[:1]) + " | KL per token | " + " | ".join(SUMMARY_HEADER[1:])
             + " | reserved KV, batch 8 (MiB, of dense) | peak MB, dense / candidate | speed-up (batch 8) |",
             "|" + "---|" * 10]
    for name in names:
        ev, be = _load(folder / f"eval_{name}.json"), _load(folder / f"bench_{name}.json")
        cells = summary_cells(ev)
        kl = f"{ev['fidelity']['kl_mean']:.3f}" if ev else "-"
        lines.append("| " + " | ".join([name, cells[0], kl, *cells[1:], *_memory_cells(be)]) + " |")
    return lines


def shapes_table(folder: Path) -> list[str]:
    """One row per (file, batch) of ``benchmarks/bench_kv_memory.py`` reports."""
    lines = ["| file | shape | dtype | batch | reserved KV MiB, dense -> candidate (share) | generation peak RSS MiB, "
             "dense -> candidate | peak saving / KV saving | s per image, dense -> candidate | speed-up (median, "
             "range; rounds) |", "|" + "---|" * 9]
    for path in sorted(folder.glob("memory_*.json")):
        report = json.loads(path.read_text())
        for row in report["summary"]:
            d, c, batch = row["dense"], row["candidate"], row["batch"]
            kv_saved = (d["kv_reserved_bytes"] - c["kv_reserved_bytes"]) / MIB
            lo, hi = row["speedup_range"]
            lines.append(f"| {path.name} | {report['shape']} | {report['dtype']} | {batch} | "
                         f"{d['kv_reserved_bytes'] / MIB:.1f} -> {c['kv_reserved_bytes'] / MIB:.1f} "
                         f"({100 * c['kv_reserved_bytes'] / d['kv_reserved_bytes']:.1f}%) | "
                         f"{d['peak_rss_mb']:.0f} -> {c['peak_rss_mb']:.0f} | "
                         f"{100 * (d['peak_rss_mb'] - c['peak_rss_mb']) / kv_saved:.0f}% | "
                         f"{d['seconds'] / batch:.1f} -> {c['seconds'] / batch:.1f} | "
                         f"{row['speedup_median']:.2f}x ({lo:.2f}-{hi:.2f}; {report['rounds']}) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results/kv")
    args = parser.parse_args()
    folder = Path(args.results)
    print("\n".join(default_table(folder)))
    if (folder / "shapes").is_dir():
        print()
        print("\n".join(shapes_table(folder / "shapes")))


if __name__ == "__main__":
    main()
