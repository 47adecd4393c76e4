"""The README's LiteVAR attention table from `litevar eval` and `litevar bench` JSONs (one pair per recipe).

    python benchmarks/attention_table.py --results benchmarks/results/attention
reads eval_<name>.json and bench_<name>.json for every recipe name found and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from litevar.eval.tables import SUMMARY_HEADER, summary_cells


def _plan_kept(recipe: dict) -> str:
    from litevar.attention.calibrate import load_plan

    plans = [step["plan"] for step in recipe["steps"] if step["type"] == "mdwa"]
    return f"{100 * load_plan(plans[0]).kept_fraction():.1f}%" if plans else "100%"


def _row(name: str, ev: dict | None, be: dict | None) -> str:
    cells = [name]
    recipe = (be or {}).get("candidate_recipe") or (ev or {}).get("recipe")
    cells.append(_plan_kept(recipe) if recipe else "-")
    if be is not None:
        d, c = be["dense"], be["candidate"]
        reduction = 1 - c["flops"]["attention"] / d["flops"]["attention"]
        cells += [f"{100 * reduction:.1f}%", f"{d['attention_layer_s']:.2f} / {c['attention_layer_s']:.2f}",
                  f"{be['ratios']['throughput_time']:.2f}x"]
    else:
        cells += ["-", "-", "-"]
    cells += summary_cells(ev)
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="benchmarks/results/attention")
    args = parser.parse_args()
    folder = Path(args.results)
    names = sorted({p.stem.split("_", 1)[1] for p in folder.glob("eval_*.json")} |
                   {p.stem.split("_", 1)[1] for p in folder.glob("bench_*.json")})
    print("| recipe | query-key pairs kept by the plan | attention FLOPs saved (computed) | attention layers s, dense / candidate (batch 8) | end-to-end speed-up "
          "(batch 8) | " + " | ".join(SUMMARY_HEADER) + " |")
    print("|" + "---|" * 11)
    for name in names:
        ev_path, be_path = folder / f"eval_{name}.json", folder / f"bench_{name}.json"
        ev = json.loads(ev_path.read_text()) if ev_path.exists() else None
        be = json.loads(be_path.read_text()) if be_path.exists() else None
        print(_row(name, ev, be))


if __name__ == "__main__":
    main()
