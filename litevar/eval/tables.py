"""Markdown tables of eval reports: one report (reference vs candidate) or several side by side."""
from __future__ import annotations

from typing import Any


def _get(report: dict, dotted: str) -> Any:
    value: Any = report
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(f"{v:.{digits}f}" for v in value)
    return f"{value:.{digits}f}"


# (row label, key in the candidate report, key of the same quantity for the dense reference, digits)
ROWS = [
    ("token agreement (all scales)", "fidelity.token_agreement", None, 4),
    ("token agreement per scale", "fidelity.token_agreement_per_scale", None, 3),
    ("KL(ref || cand), mean", "fidelity.kl_mean", None, 6),
    ("KL per scale", "fidelity.kl_per_scale", None, 5),
    ("PSNR to reference (dB)", "fidelity.psnr_db", None, 2),
    ("SSIM to reference", "fidelity.ssim", None, 4),
    ("identical images", "fidelity.identical_images", None, 3),
    ("FD-EffLite0 to reference", "fidelity.fd_to_reference", None, 2),
    ("FD-EffLite0 vs data", "quality.fd_effl0", "reference.quality.fd_effl0", 2),
    ("precision", "quality.precision", "reference.quality.precision", 3),
    ("recall", "quality.recall", "reference.quality.recall", 3),
    ("class-consistency", "quality.class_consistency", "reference.quality.class_consistency", 4),
    ("images/s (generation)", "images_per_s", "reference.images_per_s", 2),
]


def _present(reports: list[dict], key: str) -> bool:
    return any(_get(r, key) is not None for r in reports)


def eval_markdown(report: dict) -> str:
    """Reference vs candidate for one report, with the settings that produced it."""
    name = report["recipe"]["name"]
    lines = [f"# litevar eval: {name} vs dense fp32", "",
             f"{report['images']} images ({report['per_class']} per class, seeds {report['seed']}+i), "
             f"sampling {report['sampling']}, data: {report['data'] or 'none'}; {report['metric']}.", "",
             f"| metric | dense fp32 (reference) | {name} |", "|---|---|---|"]
    for label, key, ref_key, digits in ROWS:
        if not _present([report], key):
            continue
        ref = _fmt(_get(report, ref_key), digits) if ref_key else "(identity)"
        lines.append(f"| {label} | {ref} | {_fmt(_get(report, key), digits)} |")
    lines += ["", f"Inception: {report['inception'].get('note') or report['inception']}", ""]
    return "\n".join(lines)


def compare_markdown(reports: list[dict], names: list[str] | None = None) -> str:
    """Several eval reports side by side (one column each, plus the dense reference of the first)."""
    names = names or [r["recipe"]["name"] for r in reports]
    settings = {(r["model"]["weights_sha256"], str(r["sampling"]), r["images"], r["seed"]) for r in reports}
    header = ["metric", "dense fp32"] + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key, ref_key, digits in ROWS:
        if not _present(reports, key):
            continue
        ref = _fmt(_get(reports[0], ref_key), digits) if ref_key else "(identity)"
        lines.append("| " + " | ".join([label, ref] + [_fmt(_get(r, key), digits) for r in reports]) + " |")
    if len(settings) > 1:
        lines.append("")
        lines.append("Warning: these reports differ in model, sampling, image count or seed; columns are not comparable.")
    return "\n".join(lines) + "\n"


SUMMARY_HEADER = ["token agreement", "PSNR to dense (dB)", "FD-EffLite0 to dense", "FD-EffLite0 vs data (change)",
                  "class-consistency % (change)"]


def summary_cells(report: dict | None) -> list[str]:
    """One eval report as the README's summary cells (see ``SUMMARY_HEADER``); dashes when it is missing."""
    if report is None:
        return ["-"] * len(SUMMARY_HEADER)
    f, q, rq = report["fidelity"], report.get("quality", {}), report["reference"].get("quality", {})
    psnr = f["psnr_db"] if isinstance(f["psnr_db"], str) else f"{f['psnr_db']:.1f}"
    cells = [f"{f['token_agreement']:.3f}", psnr, f"{f['fd_to_reference']:.1f}"]
    cells.append(f"{q['fd_effl0']:.1f} ({100 * (q['fd_effl0'] / rq['fd_effl0'] - 1):+.1f}%)" if "fd_effl0" in q else "-")
    cells.append(f"{100 * q['class_consistency']:.1f} ({100 * (q['class_consistency'] - rq['class_consistency']):+.1f})"
                 if "class_consistency" in q else "-")
    return cells
