"""The layer-type sensitivity study as a Markdown table and a bar chart (see :mod:`litevar.quant.sensitivity`)."""
from __future__ import annotations

import math
from pathlib import Path

from ..files import write_atomic


def bits_label(bits) -> str:
    """``(8, 4)`` -> ``W8A4``; activation bits None (weight-only) -> ``A16``."""
    return f"W{bits[0]}A{'16' if bits[1] is None else bits[1]}"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _model(settings: dict) -> str:
    if settings["shape"] is not None:
        return f"random {settings['shape']}"
    return settings["var_ckpt"] or "the shipped default model"


def sensitivity_markdown(report: dict) -> str:
    """The study as a Markdown table (dense reference, base run, one row per studied type) with the plan rule."""
    s, plan = report["settings"], report["plan"]
    base, low = bits_label(s["base"]), bits_label(s["low"])
    count = f"{s['per_class']} per class" if s["per_class"] is not None else "the classes in turn"
    lines = [f"# Layer-type sensitivity: {_model(s)}, method {s['method']}, base {base}, studied type at {low}", "",
             f"{s['images']} images ({count}, seeds {s['seed']}+i; cfg {s['sampling']['cfg']}, top-k "
             f"{s['sampling']['top_k']}, top-p {s['sampling']['top_p']}), each run compared with the dense fp32 model "
             "on the same labels and seeds. Base run: every layer of "
             f"{', '.join(s['base_layers'])} at {base}; each type row: that type at {low}, the rest as in the base run. "
             "Token agreement is over every position of every scale; drops are the base run's value minus the row's.",
             "",
             "| run | bits | token agreement | drop vs base | PSNR (dB) | PSNR drop (dB) | SSIM | class-consistency "
             "| seconds | sensitive |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ref = report["reference"]
    lines.append(f"| {ref['name']} | - | {_fmt(ref['token_agreement'])} | - | {_fmt(ref['psnr_db'], 2)} | - | - "
                 f"| {_fmt(ref['class_consistency'], 3)} | {_fmt(ref['generate_seconds'], 1)} | - |")
    for row in report["rows"]:
        sensitive = "-" if row["type"] is None else ("**yes**" if row["sensitive"] else "no")
        seconds = row["quantize_seconds"] + row["generate_seconds"]
        lines.append(f"| {row['name']} | {row['bits']} | {_fmt(row['token_agreement'])} "
                     f"| {_fmt(row['token_agreement_drop'])} | {_fmt(row['psnr_db'], 2)} | {_fmt(row['psnr_drop_db'], 2)} "
                     f"| {_fmt(row['ssim'], 4)} | {_fmt(row['class_consistency'], 3)} | {_fmt(seconds, 1)} | {sensitive} |")
    how = (f"tolerance {plan['tolerance']}" if plan["tolerance"] is not None
           else "twice the median drop over the studied types")
    kept = ", ".join(plan["sensitive"]) or "no type"
    lines += ["", f"Plan rule: {plan['rule']}.", "",
              f"Threshold: {_fmt(plan['threshold'])} ({how}). Kept in 16 bit: {kept}. "
              f"plan.json: recipe \"{plan['recipe']['name']}\" (load it with `--recipe plan.json`)."]
    if report["class_consistency_note"]:
        lines += ["", report["class_consistency_note"] + "."]
    return "\n".join(lines) + "\n"


def _finite_or_zero(values: list[float]) -> tuple[list[float], list[bool]]:
    finite = [v is not None and math.isfinite(v) for v in values]
    return [v if ok else 0.0 for v, ok in zip(values, finite)], finite


def plot_sensitivity(report: dict, path: Path) -> None:
    """Bars: each type's drop in token agreement and in PSNR below the base run (the zero line), with the plan's
    threshold dashed and sensitive types in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"][1:]
    s = report["settings"]
    names = [row["name"] for row in rows]
    colours = ["tab:red" if row["sensitive"] else "tab:blue" for row in rows]
    fig = Figure(figsize=(4 + 0.9 * len(rows), 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tokens, ax_psnr = fig.subplots(2, 1, sharex=True)
    base, low = f"base {bits_label(s['base'])}", bits_label(s["low"])
    panels = ((ax_tokens, "token_agreement_drop", "drop in token agreement",
               f"agreement {report['rows'][0]['token_agreement']:.4f}"),
              (ax_psnr, "psnr_drop_db", "drop in PSNR (dB)", f"PSNR {_fmt(report['rows'][0]['psnr_db'], 2)} dB"))
    for ax, key, label, base_value in panels:
        heights, finite = _finite_or_zero([row[key] for row in rows])
        ax.bar(names, heights, color=colours)
        for x, ok in enumerate(finite):
            if not ok:
                ax.annotate("inf", (x, 0), ha="center", va="bottom")
        ax.axhline(0.0, color="black", linewidth=1.0, label=f"{base} ({base_value})")
        ax.set_ylabel(label)
        ax.legend(fontsize="small", loc="upper left")
    threshold = report["plan"]["threshold"]
    ax_tokens.axhline(max(threshold, 0.0), color="tab:red", linestyle="--", linewidth=1.0,
                      label=f"threshold {threshold:.4f}")
    ax_tokens.legend(fontsize="small", loc="upper left")
    ax_tokens.set_title(f"one layer type at {low}, the rest at {base} ({s['method']}); red: kept in 16 bit by the plan")
    ax_psnr.set_xlabel("layer type")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
