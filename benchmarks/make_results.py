"""Write benchmarks/RESULTS.md from the committed result files under benchmarks/results/.

    python benchmarks/make_results.py            # rewrite benchmarks/RESULTS.md
    python benchmarks/make_results.py --check    # exit 1 when RESULTS.md differs from what would be written

Everything above the log marker is generated from the JSON (and the eval/sensitivity Markdown helpers of
litevar), so the tables cannot drift from the measurements; a JSON file no section reads is listed at the end of
the generated part. Everything below the marker is the hand-written log of past sessions and is kept as it is:
add a session's notes at its end (oldest first). tests/test_docs_examples.py checks that the file is up to date.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"
LOG_MARKER = "<!-- Hand-written log below: make_results.py keeps everything after this line as it is. -->"
MIB = 2 ** 20

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Reader:
    """Loads result JSON files by path relative to benchmarks/results and remembers which were read."""

    def __init__(self) -> None:
        self.read: set[str] = set()

    def __call__(self, rel: str) -> dict:
        self.read.add(rel)
        return json.loads((RESULTS / rel).read_text())

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.glob(pattern))


@contextlib.contextmanager
def _at_root() -> Iterator[None]:
    """Recipes name their plan files relative to the repository root."""
    before = Path.cwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(before)


def _table_script(module_name: str, argv: list[str]) -> str:
    """Run one of the existing table scripts (attention_table.py, quant_table.py) and return what it prints."""
    import importlib

    module = importlib.import_module(module_name)
    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [f"{module_name}.py", *argv]
    try:
        with contextlib.redirect_stdout(buffer):
            module.main()
    finally:
        sys.argv = saved
    return buffer.getvalue().rstrip("\n")


def machine_label(machine: dict | None) -> str:
    """A short name for the CPU a result was measured on, from the machine record in its JSON."""
    if not machine:
        return "not recorded"
    name = machine.get("cpu") or machine.get("model") or "?"
    flags = set(machine.get("cpu_flags") or machine.get("flags") or [])
    if name == "x86_64" and not flags:
        return "not recorded (x86_64)"
    short = "Xeon" if "Xeon" in name else "EPYC" if "EPYC" in name else name
    isa = "AMX" if "amx_int8" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags else \
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no flags recorded"
    cores = f"{machine['cpu_count']}-core " if machine.get("cpu_count") else ""
    return f"{cores}{short} ({isa})"


def _machine_of(data: dict) -> dict | None:
    return data.get("machine") or data.get("cpu")


def _ratio(dense: float, candidate: float) -> str:
    return f"{dense / candidate:.2f}x"


# ----------------------------------------------------------------------------------------------- sections


def machines_section(load: _Reader) -> list[str]:
    seen: dict[str, dict] = {}
    for rel in load.glob("**/*.json"):
        data = json.loads((RESULTS / rel).read_text())
        machine = _machine_of(data) if isinstance(data, dict) else None
        if not isinstance(machine, dict):
            continue
        label = machine_label(machine)
        entry = seen.setdefault(label, {"files": 0, "torch": set(), "flags": set()})
        entry["files"] += 1
        entry["torch"].add(machine.get("torch") or "?")
        entry["flags"] |= set(machine.get("cpu_flags") or machine.get("flags") or [])
    lines = ["## Machines", "",
             "As recorded in the result files (`machine` / `cpu`); see docs/machines.md for what is known beyond that.",
             "", "| machine | result files | torch | SIMD/matrix flags recorded |", "|---|---|---|---|"]
    for label, entry in sorted(seen.items()):
        flags = ", ".join(sorted(f for f in entry["flags"] if f.startswith(("avx", "amx")))) or "-"
        lines.append(f"| {label} | {entry['files']} | {', '.join(sorted(entry['torch']))} | {flags} |")
    return lines


def default_model_section(load: _Reader) -> list[str]:
    lines = ["## The default model: quality against Fashion-MNIST (`make quality`)", "",
             "`results/default_model/`; FD-EffLite0 at 128 px against the 10k test images (not Inception FID). "
             "Sets of 1k images give a biased FD: compare them only with each other.", "",
             "| file | set | images | FD-EffLite0 | precision | recall | other | seconds | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rel in load.glob("default_model/*.json"):
        d = load(rel)
        if d["what"] == "real":
            what, n, other = "real train images (the floor)", d["train_images"], ""
        elif d["what"] == "recon":
            what, n = "VQ-VAE reconstructions of the test images", d["test_images"]
            other = (f"PSNR {d['psnr_db']:.2f} dB, codebook {100 * d['codebook_usage']:.0f}% used "
                     f"(perplexity {d['codebook_perplexity']:.0f})")
        else:
            s = d["sampling"]
            what, n = f"generated, cfg {s['cfg']:g}, top-k {s['top_k']}, top-p {s['top_p']:g}, {d['dtype']}", \
                d["generated_images"]
            other = f"class-consistency {100 * d['class_consistency']:.1f}%"
        lines.append(f"| {Path(rel).stem} | {what} | {n} | {d['fd']:.1f} | {d['precision']:.3f} | {d['recall']:.3f} | "
                     f"{other} | {d['seconds']:.0f} | {machine_label(d.get('machine'))} |")
    return lines


def eval_section(load: _Reader) -> list[str]:
    from litevar.eval.tables import compare_markdown

    rels = [r for r in ("eval/eval_fp32.json", "eval/eval_bf16.json") if (RESULTS / r).exists()]
    rels += [r for r in load.glob("eval/eval_*.json") if r not in rels]
    reports = [load(r) for r in rels]
    first = reports[0]
    lines = ["## Precision against the dense fp32 model (`make eval-default`)", "",
             f"`results/eval/`: `litevar eval` on the default model, {first['images']} images "
             f"({first['per_class']} per class, seeds {first['seed']}+i), sampling {first['sampling']}, batches of "
             f"{first['batch_size']}, {first['machine'].get('threads')} thread; machines: "
             + "; ".join(f"{Path(r).stem}: {machine_label(e['machine'])}" for r, e in zip(rels, reports)) + ".", ""]
    lines += compare_markdown(reports, [Path(r).stem.removeprefix("eval_") for r in rels]).rstrip("\n").split("\n")
    return lines


def _bench_files(load: _Reader) -> list[str]:
    return [r for r in load.glob("**/bench_*.json") if not r.startswith(("attention/", "kv/"))]


def bench_section(load: _Reader) -> list[str]:
    rels = _bench_files(load)
    runs = ["| file | machine | model | threads | batch | dense | candidate |", "|---|---|---|---|---|---|---|"]
    time = ["| file | throughput, batch N (img/s) | latency, batch 1 (s) | transformer s, batch N | decoder s, batch N | "
            "attention layers s, batch N |", "|---|---|---|---|---|---|"]
    memory = ["| file | weights (MiB) | peak RSS (MB) | KV cache, batch N (MiB) | GFLOP/img attention | GFLOP/img linear | "
              "GFLOP/img decoder |", "|---|---|---|---|---|---|---|"]
    for rel in rels:
        b = load(rel)
        d, c, s = b["dense"], b["candidate"], b["settings"]
        name = rel.removesuffix(".json")
        model = f"{b['model']} (random weights)" if b.get("random_weights") else b["model"]
        runs.append(f"| {name} | {machine_label(b['machine'])} | {model} | {s['threads']} | {s['batch']} | "
                    f"{b['baseline']['name']} | {b['candidate_recipe']['name']} |")
        dt, ct = d["throughput"]["stages_s"], c["throughput"]["stages_s"]
        attn = (f"{d['attention_layer_s']:.2f} -> {c['attention_layer_s']:.2f} "
                f"({_ratio(d['attention_layer_s'], c['attention_layer_s'])})" if "attention_layer_s" in d else "-")
        time.append(f"| {name} | {d['images_per_s']:.3g} -> {c['images_per_s']:.3g} "
                    f"({_ratio(c['images_per_s'], d['images_per_s'])}) | {d['latency_s']:.3g} -> {c['latency_s']:.3g} "
                    f"({_ratio(d['latency_s'], c['latency_s'])}) | {dt['transformer']:.3g} -> {ct['transformer']:.3g} "
                    f"({_ratio(dt['transformer'], ct['transformer'])}) | {dt['decoder']:.3g} -> {ct['decoder']:.3g} "
                    f"({_ratio(dt['decoder'], ct['decoder'])}) | {attn} |")
        gf = lambda v, k: f"{v['flops'][k] / 1e9:.3g}"  # noqa: E731
        memory.append(f"| {name} | {d['weight_bytes']['total'] / MIB:.1f} -> {c['weight_bytes']['total'] / MIB:.1f} | "
                      f"{d['peak_rss_mb']:.0f} -> {c['peak_rss_mb']:.0f} | {d['kv_cache_bytes'] / MIB:.1f} -> "
                      f"{c['kv_cache_bytes'] / MIB:.1f} | {gf(d, 'attention')} -> {gf(c, 'attention')} | "
                      f"{gf(d, 'linear')} -> {gf(c, 'linear')} | {gf(d, 'decoder')} -> {gf(c, 'decoder')} |")
    return ["## Speed and memory next to the dense model (`litevar bench`)", "",
            "Each file is one `litevar bench` run: the dense baseline and the candidate, each in its own process, on the "
            "same labels and seeds; medians of the repeats; `a -> b (x)` is dense -> candidate and the dense/candidate "
            "ratio (time: > 1 is faster). Compare ratios within one run: absolute times move between runs on these "
            "shared 2-core machines. The attention recipes on the default model are in the attention table below.",
            "", *runs, "", *time, "", *memory]


def attention_section(load: _Reader) -> list[str]:
    evals, benches = load.glob("attention/eval_*.json"), load.glob("attention/bench_*.json")
    for rel in evals + benches:
        load(rel)
    eval_machines = sorted({machine_label(load(r)["machine"]) for r in evals})
    bench_machines = sorted({machine_label(load(r)["machine"]) for r in benches})
    with _at_root():
        table = _table_script("attention_table", ["--results", str(RESULTS / "attention")])
    first = load(evals[0]) if evals else None
    setting = (f"Evals: {first['images']} images ({first['per_class']} per class, seeds {first['seed']}+i) against "
               f"the dense fp32 reference, on {', '.join(eval_machines)}. " if first else "")
    return ["## LiteVAR attention on the default model (`make attention-default`)", "",
            "`python benchmarks/attention_table.py` on `results/attention/` (fp32 recipes: the technique alone). "
            + setting + f"Benches (batch 8): {', '.join(bench_machines)}.", "", table]


def calibration_section(load: _Reader) -> list[str]:
    cal = load("attention/plans/calibration.json")
    for rel in load.glob("attention/plans/plan_*.json"):
        load(rel)
    col = cal["collection"]
    lines = ["### Calibrated window plans (`litevar calibrate-attention`)", "",
             f"`results/attention/plans/`: {col['samples']} generations (seeds {col['seed']}+i, {col['dtype']}).", "",
             "| plan | query-key pairs kept | attention FLOPs saved by the plan | DROP / FULL / windowed blocks |",
             "|---|---|---|---|"]
    for plan in cal["plans"]:
        lines.append(f"| {plan['file']} | {100 * plan['kept_fraction']:.1f}% | {100 * plan['attention_flop_reduction']:.1f}% | "
                     f"{plan['drop_blocks']} / {plan['full_blocks']} / {plan['windowed_blocks']} |")
    return lines


def kernel_section(load: _Reader) -> list[str]:
    lines = ["## Sparse attention kernels on the d16 shape (`benchmarks/bench_attention.py`)", "",
             "`results/attention/kernel_*.json`: attention of all layers summed over scales, one batch (CFG rows "
             "included), all kernels in one run; speed-ups over dense SDPA in that run.", "",
             "| file | plan | tokens | dtype, threads | kept | dense SDPA s | masked dense s | PyTorch gathered s | "
             "compiled kernel s | pairs computed (compiled) | last scale: dense / compiled s | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rel in load.glob("attention/kernel_*.json"):
        k = load(rel)
        t, last = k["seconds"], k["per_scale"][-1]
        lines.append(f"| {Path(rel).stem} | {k['plan']} | {k['tokens']} | {k['dtype']}, {k['threads']} | "
                     f"{100 * k['kept_fraction']:.1f}% | {t['dense']:.2f} | {t['masked']:.2f} | "
                     f"{t['gathered']:.2f} ({_ratio(t['dense'], t['gathered'])}) | {t['native']:.3f} "
                     f"({_ratio(t['dense'], t['native'])}) | {100 * k['native_computed_fraction']:.1f}% | "
                     f"{last['dense_s']:.2f} / {last['native_s']:.3f} ({_ratio(last['dense_s'], last['native_s'])}) | "
                     f"{machine_label(k['machine'])} |")
    return lines


def quant_section(load: _Reader) -> list[str]:
    from litevar.eval.tables import SUMMARY_HEADER, summary_cells
    from quant_table import _bits

    recipes = sorted((ROOT / "benchmarks" / "recipes" / "quant" / "default").glob("*.json"))
    rows = []
    for path in recipes:
        step = json.loads(path.read_text())["steps"][0]
        rel = f"quant/eval_{path.stem}.json"
        report = load(rel) if (RESULTS / rel).exists() else None
        cells = summary_cells(report) if report else ["not run yet"] + ["-"] * (len(SUMMARY_HEADER) - 1)
        rows.append((_bits(step), step["type"], cells, machine_label(report["machine"]) if report else "-"))
    first = next((load(f"quant/eval_{p.stem}.json") for p in recipes if (RESULTS / f"quant/eval_{p.stem}.json").exists()),
                 None)
    dense = first["reference"]["quality"] if first else {}
    lines = ["## Quantization on the default model (`make quant-default`)", "",
             "Rows of `python benchmarks/quant_table.py` with the machine of each eval: recipes in "
             "`benchmarks/recipes/quant/default/`, fp32 fake quantization (the method alone)"
             + (f", {first['images']} images against the dense fp32 reference; dense quality vs data on these "
                f"images: FD-EffLite0 {dense['fd_effl0']:.1f}, class-consistency {100 * dense['class_consistency']:.1f}%"
                if first else "") + ".", "",
             "| bits | method | " + " | ".join(SUMMARY_HEADER) + " | machine |", "|" + "---|" * (3 + len(SUMMARY_HEADER))]
    for bits, method, cells, machine in sorted(rows, key=lambda r: (r[0], r[1])):
        lines.append(f"| {bits} | {method} | " + " | ".join(cells) + f" | {machine} |")
    return lines


def full_recipe_section(load: _Reader) -> list[str]:
    from litevar.eval.tables import SUMMARY_HEADER, summary_cells

    lines = ["## The full LiteVAR recipe on the default model (quality)", "",
             "| file | recipe | images | " + " | ".join(SUMMARY_HEADER) + " | machine |",
             "|" + "---|" * (4 + len(SUMMARY_HEADER))]
    for rel in load.glob("litevar/eval_*.json"):
        ev = load(rel)
        lines.append(f"| {Path(rel).stem} | {ev['recipe']['name']} | {ev['images']} | " + " | ".join(summary_cells(ev))
                     + f" | {machine_label(ev['machine'])} |")
    return lines


def sensitivity_section(load: _Reader) -> list[str]:
    from litevar.quant.sensitivity_report import sensitivity_markdown

    lines = []
    for rel in load.glob("quant/sensitivity_*/sensitivity.json"):
        folder = Path(rel).parent.as_posix()
        for extra in ("run.json", "plan.json"):
            if (RESULTS / folder / extra).exists():
                load(f"{folder}/{extra}")
        text = sensitivity_markdown(load(rel)).rstrip("\n").split("\n")
        title = text[0].lstrip("# ")
        lines += [f"## {title} (`litevar sensitivity`, `results/{folder}/`)", *text[1:], ""]
    return lines[:-1] if lines else lines


def weight_memory_section(load: _Reader) -> list[str]:
    lines = ["## Transformer weight memory on the d16 shape (`benchmarks/weight_memory.py`)", ""]
    for rel in load.glob("quant/weight_memory_*.json"):
        w = load(rel)
        lines += [f"`results/{rel}`, {machine_label(w['machine'])}:", "",
                  "| variant | transformer MiB | of bf16 | Linear weights MiB | of bf16 |", "|---|---|---|---|---|"]
        for name, v in w["variants"].items():
            lines.append(f"| {name} | {v['transformer_bytes'] / MIB:.1f} | {v['transformer_ratio']:.3f} | "
                         f"{v['linear_weight_bytes'] / MIB:.1f} | {v['linear_weight_ratio']:.3f} |")
    return lines


def decoder_section(load: _Reader) -> list[str]:
    d = load("quant/decoder_int8.json")
    dec, fid = d["decoder"], d["fidelity"]
    lines = ["## int8 VQ-VAE decoder (`benchmarks/bench_decoder.py`)", "",
             f"`results/quant/decoder_int8.json`, {machine_label(d['machine'])}, {d['machine']['threads']} thread, "
             f"{d['shape']} decoder, batch {dec['batch']}, {dec['repeats']} repeats (the load average was "
             f"{d['machine']['loadavg_start'][0]:.1f} at the start: other jobs shared the machine). Time ratios are "
             "int8 / bf16 (< 1 is faster).", "",
             "| convolutions | reduction | GFLOP | median ms bf16 / int8 | int8/bf16 (median) | int8/bf16 (min) | "
             "int8 by default |", "|---|---|---|---|---|---|---|"]
    for layer in d["layers"]:
        lines.append(f"| {', '.join(layer['layers'][:2])}{' ...' if len(layer['layers']) > 2 else ''} "
                     f"({len(layer['layers'])}) | {layer['reduction']} | {layer['gflop']} | {layer['median_ms']['bf16']} / "
                     f"{layer['median_ms']['int8']} | {layer['ratio_int8_over_bf16']} | {layer['ratio_int8_over_bf16_min']} | "
                     f"{'yes' if layer['converted_by_default'] else 'no'} |")
    lines += ["", "| whole decoder | convs in int8 | median ms | int8/bf16 (median) | int8/bf16 (min) | "
              "int8/bf16 (paired median) | PSNR vs bf16 (random weights) |", "|---|---|---|---|---|---|---|"]
    for key in dec["median_ms"]:
        lines.append(f"| {key} | {dec['converted'][key]} | {dec['median_ms'][key]} | "
                     f"{dec.get('ratio_over_bf16', {}).get(key, 1.0)} | {dec.get('ratio_over_bf16_min', {}).get(key, 1.0)} | "
                     f"{dec.get('ratio_over_bf16_paired_median', {}).get(key, 1.0)} | "
                     f"{dec.get('psnr_vs_bf16_random_weights', {}).get(key, '-')} |")
    lines += ["", f"Fidelity on {fid['model']} ({fid['samples']} images, {fid['calib_samples']} calibration "
              f"generations): bf16 decoder vs fp32 {fid['psnr_bf16_vs_fp32_decoder']} dB PSNR.", "",
              "| int8 variant | convs converted | PSNR vs bf16 decoder (dB) | worst image (dB) | PSNR vs fp32 (dB) |",
              "|---|---|---|---|---|"]
    for name, v in fid["int8_vs_bf16"].items():
        lines.append(f"| {name} | {v['converted']} | {v['psnr'] if v['psnr'] is not None else '- (nothing converted)'} | "
                     f"{v['psnr_min_image'] if v['psnr_min_image'] is not None else '-'} | {v['psnr_vs_fp32']} |")
    for rel in load.glob("decoder/eval_*.json"):  # `litevar eval` of a decoder-int8 recipe on the shipped model
        e = load(rel)
        q, ref, fid = e["quality"], e["reference"]["quality"], e["fidelity"]
        lines += ["", f"`results/{rel}` ({e['recipe']['name']}, {machine_label(e['machine'])}, {e['images']} images, "
                  f"`litevar eval`): PSNR vs the dense fp32 decoder {fid['psnr_db']:.1f} dB (token agreement "
                  f"{fid['token_agreement']:.3f}); FD-EffLite0 {q['fd_effl0']:.1f} vs {ref['fd_effl0']:.1f}, "
                  f"class-consistency {100 * q['class_consistency']:.1f}% vs {100 * ref['class_consistency']:.1f}%."]
    return lines


def sampling_section(load: _Reader) -> list[str]:
    lines = ["## Sampling speed against upstream VAR on the d16 shape (`benchmarks/bench_sampling.py`, `make bench`)", ""]
    for rel in load.glob("sampling_*.json"):
        s = load(rel)
        lines += [f"`results/{rel}` ({s['time']}): {s['model_shape']}, random weights, cfg {s['cfg']}, top-k {s['top_k']}, "
                  f"top-p {s['top_p']}, {s['cpu']['threads']} threads, {machine_label(s['cpu'])}; best of "
                  f"{s['results'][0]['litevar']['repeats']} timed runs. Peak memory in these files is not usable "
                  "(see the log, 2026-11-22).", "",
                  "| dtype | batch | litevar s/batch | images/s | transformer / sampling / decoder s | KV cache MiB | "
                  "upstream s/batch | speed-up |", "|---|---|---|---|---|---|---|---|"]
        for r in s["results"]:
            lv, up = r["litevar"], r.get("upstream")
            lines.append(f"| {lv['dtype']} | {lv['batch']} | {lv['seconds_per_batch']:.3g} | {lv['images_per_s']:.3f} | "
                         f"{lv['transformer_s']:.3g} / {lv['sampling_s']:.2g} / {lv['decoder_s']:.3g} | "
                         f"{lv['kv_cache_bytes'] / MIB:.0f} | {up['seconds_per_batch']:.3g} | "
                         f"{r['speedup_vs_upstream']:.2f}x |" if up else
                         f"| {lv['dtype']} | {lv['batch']} | {lv['seconds_per_batch']:.3g} | {lv['images_per_s']:.3f} | "
                         f"{lv['transformer_s']:.3g} / {lv['sampling_s']:.2g} / {lv['decoder_s']:.3g} | "
                         f"{lv['kv_cache_bytes'] / MIB:.0f} | - | - |")
        lines.append("")
    return lines[:-1]


def mvar_section(load: _Reader) -> list[str]:
    lines = ["## M-VAR: Mamba-2 per scale, stateful vs upstream's re-scan (`benchmarks/bench_mvar.py`)", ""]
    for rel in load.glob("mvar/mamba_scales_*.json"):
        s = load(rel)
        steps = s["token_steps"]
        lines += [f"`results/{rel}`: one Mamba-2 layer of the {s['shape']} shape (width {s['width']}, "
                  f"{s['mamba_heads']} heads, d_state {s['d_state']}), random weights, {s['rows']} rows (batch "
                  f"{s['batch']} with CFG), {s['dtype']}, {s['threads']} threads, {machine_label(s['machine'])}; medians "
                  f"of {s['repeats']} alternating runs. Token steps {steps['stateful']} (stateful) vs "
                  f"{steps['rescan']} (re-scan); per layer {s['total_ms_per_layer']['stateful']:.1f} vs "
                  f"{s['total_ms_per_layer']['rescan']:.1f} ms ({s['speedup_total']:.2f}x); outputs differ by at most "
                  f"{s['max_abs_diff_outputs']:.1e}.", "",
                  "| scale | tokens | prefix | stateful ms | re-scan ms | stateful carries (KiB) | re-scan carries (KiB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["scales"]:
            lines.append(f"| {r['scale']} | {r['tokens']} | {r['prefix_tokens']} | {r['stateful_ms']:.2f} | "
                         f"{r['rescan_ms']:.2f} | {r['stateful_carried_bytes'] / 1024:.0f} | "
                         f"{r['rescan_carried_bytes'] / 1024:.0f} |")
        lines.append("")
    return lines[:-1]


def mvar_pairs_section(load: _Reader) -> list[str]:
    lines = ["## M-VAR vs VAR, whole generations (`benchmarks/bench_mvar_vs_var.py`)", ""]
    for rel in load.glob("mvar/pairs_*.json"):
        b = load(rel)
        st = b["settings"]
        lines += [f"`results/{rel}` ({b['time']}): {st['dtype']}, {st['threads']} threads, {st['rounds']} alternating "
                  f"rounds (each model a fresh process per round), {machine_label(b['machine'])}; medians. Ratios are "
                  "VAR / M-VAR (> 1: M-VAR faster or smaller).", "",
                  f"| model | params (M) | batch 1 s | batch {st['batch']} img/s | peak RSS MiB | carried between scales "
                  f"(MiB, batch {st['batch']}) |", "|---|---|---|---|---|---|"]
        for pair in b["pairs"]:
            for name in (pair["var"], pair["mvar"]):
                m = pair["models"][name]
                lines.append(f"| {name} ({m['arch']}) | {m['params'] / 1e6:.1f} | {m['latency_s']:.3g} | "
                             f"{m['images_per_s']:.3g} | {m['peak_rss_mb']:.0f} | {m['carried_bytes'] / MIB:.2f} |")
            r = pair["ratios_var_over_mvar"]
            lo, hi = min(r["latency_per_round"]), max(r["latency_per_round"])
            lines.append(f"| ratio | - | {r['latency']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['throughput']:.2f}x | "
                         f"{r['peak_rss']:.2f}x | {r['carried_bytes']:.1f}x |")
        lines.append("")
    return lines[:-1]


def mvar_quality_section(load: _Reader) -> list[str]:
    lines = ["## M-VAR vs VAR: quality of the shipped models (`litevar quality generated`)", "",
             "| file | model | dtype | images | cfg / top-k / top-p | FD-EffLite0 | precision | recall | "
             "class-consistency % | s | machine |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rel in load.glob("mvar/quality_*.json"):
        q = load(rel)
        sp = q["sampling"]
        lines.append(f"| {rel} | {q['model']} | {q['dtype']} | {q['generated_images']} | {sp['cfg']:g} / {sp['top_k']} "
                     f"/ {sp['top_p']:g} | {q['fd']:.1f} | {q['precision']:.3f} | {q['recall']:.4f} | "
                     f"{100 * q['class_consistency']:.1f} | {q['seconds']:.0f} | {machine_label(q['machine'])}, "
                     f"{q['machine']['threads']} thread(s) |")
    evals = load.glob("mvar/eval_*.json")
    if evals:
        from litevar.eval.tables import SUMMARY_HEADER, summary_cells

        lines += ["", "Compressed M-VAR against the dense M-VAR (`litevar eval`; on an M-VAR the quantization targets "
                  "include Mamba-2's in_proj/out_proj):", "",
                  "| file | model | recipe | images | " + " | ".join(SUMMARY_HEADER) + " | machine |",
                  "|" + "---|" * (5 + len(SUMMARY_HEADER))]
        for rel in evals:
            ev = load(rel)
            lines.append(f"| {Path(rel).stem} | {ev['model']['var_ckpt']} | {ev['recipe']['name']} | {ev['images']} | "
                         + " | ".join(summary_cells(ev)) + f" | {machine_label(ev['machine'])} |")
    return lines


def guidance_section(load: _Reader) -> list[str]:
    lines = ["## One scale's transformer time: guidance (unconditional rows dropped) and token pruning "
             "(`benchmarks/bench_less_work.py --mode scale`)", "",
             "| file | recipe | shape | batch | threads | machine | scale | dense s | candidate s | candidate/dense "
             "(median, range) | rounds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rel in load.glob("guidance/last_scale_*.json") + load.glob("prune/scale_*.json"):
        g = load(rel)
        dense, cand = g["seconds"]["dense"], g["seconds"]["candidate"]
        lo, hi = g["ratio_range"]
        lines.append(f"| {rel} | {g['recipe']['name']} | {g['shape']} | {g['batch']} | {g['threads']} | "
                     f"{machine_label(g['machine'])} | {g['scale']} | {statistics.median(dense):.3g} | "
                     f"{statistics.median(cand):.3g} | {g['ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) | {g['rounds']} |")
    return lines


def tune_section(load: _Reader) -> list[str]:
    lines = ["## `litevar tune` on the default model", ""]
    for rel in load.glob("tune/*/tune.json"):
        t = load(rel)
        st, chosen = t["settings"], t["chosen"]["name"]
        chosen_file = f"{Path(rel).parent}/chosen_recipe.json"
        if (RESULTS / chosen_file).exists() and load(chosen_file)["name"] != chosen:
            raise ValueError(f"{chosen_file} is not the recipe {rel} chose")
        lines += [f"`results/{rel}`: {len(t['candidates'])} candidates ({len(t['space']['slots'])} slots, "
                  f"{t['space']['dtype']}), speed proxy {st['speed']}"
                  f"{' on ' + st['shape'] if st['shape'] else ''}, proxies on {st['proxy_per_class']} image(s) per class, "
                  f"finalists on {st['per_class']} per class; budget {t['budget']}. Chosen: **{chosen}** (`{chosen_file}`); "
                  f"plot: `{Path(rel).parent}/pareto.png`.", "",
                  "| candidate | speed-up | proxy token agreement | proxy KL | finalist FD-EffLite0 +% | finalist CC drop | "
                  "Pareto |", "|---|---|---|---|---|---|---|"]
        for c in sorted(t["candidates"], key=lambda c: -c.get("speed", {}).get("speedup", 0)):
            if "refused" in c:
                conflict = c["refused"].splitlines()[0].split("': ", 1)[-1]  # the recipe layer's reason, not the name
                lines.append(f"| {c['name']} | refused: {conflict} | - | - | - | - | - |")
                continue
            fid = c["proxy"]["fidelity"]
            final = (f"{100 * c['fd_increase']:+.1f} | {c['cc_drop_points']:+.1f}" if "fd_increase" in c else "- | -")
            lines.append(f"| {c['name']} | {c['speed']['speedup']:.2f}x | {fid['token_agreement']:.3f} | "
                         f"{fid['kl_mean']:.4f} | {final} | {'yes' if c['name'] in t['pareto'] else ''} |")
        lines += ["", *_seed_noise(t)]
    return lines[:-1]


def _seed_noise(t: dict) -> list[str]:
    """tune's noise check: the dense reference on two disjoint seed sets, how much of a finalist's change is noise."""
    n = t.get("noise")
    if not n:
        return []
    lo, hi = n["seeds"]
    return [f"Seed-set noise (`--noise-check`, {n['images']} images each): dense on seeds {hi}-{hi + n['images'] - 1} "
            f"vs {lo}-{hi - 1}: FD-EffLite0 {n['second']['fd_effl0']:.1f} vs {n['first']['fd_effl0']:.1f} "
            f"({100 * n['fd_change']:+.1f}%), class-consistency {100 * n['second']['class_consistency']:.1f}% vs "
            f"{100 * n['first']['class_consistency']:.1f}% ({n['cc_change_points']:+.1f} points)"
            + ("; the budget is within this noise." if n["budget_within_noise"] else "."), ""]


def generation_section(load: _Reader) -> list[str]:
    lines = ["## Doing less work: whole generations, dense vs candidate interleaved (`benchmarks/bench_less_work.py "
             "--mode generate`)", "",
             "One process, both pipelines on the same random weights, labels and seeds, alternating after a warm-up "
             "round; medians over rounds, ratios dense / candidate (> 1: faster).", "",
             "| file | recipe | shape | batch | threads | machine | dense s | candidate s | speed-up (range) | "
             "transformer speed-up | last scale speed-up | decoder s, dense (share) / candidate | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rel in load.glob("guidance/generate_*.json") + load.glob("draft_refine/generate_*.json") + \
            load.glob("prune/generate_*.json"):
        g = load(rel)
        dense, cand = ([r["seconds"] for r in g["runs"][k]] for k in ("dense", "candidate"))
        ratios = [d / c for d, c in zip(dense, cand)]
        decoder, cand_decoder = (statistics.median(r["decoder"] for r in g["runs"][k]) for k in ("dense", "candidate"))
        lines.append(f"| {rel} | {g['recipe']['name']} | {g['shape']} | {g['batch']} | {g['threads']} | "
                     f"{machine_label(g['machine'])} | {statistics.median(dense):.3g} | {statistics.median(cand):.3g} | "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                     f"{1 / g['transformer_ratio_median']:.2f}x | {1 / g['per_scale_ratio_median'][-1]:.2f}x | "
                     f"{decoder:.3g} ({decoder / statistics.median(dense):.0%}) / {cand_decoder:.3g} | {g['rounds']} |")
    return lines


def kv_section(load: _Reader) -> list[str]:
    files = load.glob("kv/eval_*.json") + load.glob("kv/bench_*.json") + load.glob("kv/shapes/memory_*.json")
    figures = load.glob("kv/figures_*/kv_kept_keys.json")
    for rel in files + figures + load.glob("kv/heads_default.json"):
        load(rel)
    machines = sorted({machine_label(load(r)["machine"]) for r in files})
    with _at_root():
        table = _table_script("kv_table", ["--results", str(RESULTS / "kv")])
    evals = load.glob("kv/eval_*.json")
    first = load(evals[0]) if evals else None
    setting = (f"Evals: {first['images']} images ({first['per_class']} per class, seeds {first['seed']}+i), fp32, "
               "against the dense fp32 reference. " if first else "")
    return ["## KV-cache compression (`make kv-default`, `make kv-shapes`)", "",
            "`python benchmarks/kv_table.py` on `results/kv/`: the default model (ratio = share of the pyramid "
            "removed; HACK's heads from `results/kv/heads_default.json`), then the released shapes with random "
            f"weights (`results/kv/shapes/`). {setting}Machines: {', '.join(machines) or '-'}. Which keys a policy "
            "keeps, per head and scale (`litevar analyze-attention --kv-recipe`): "
            + (", ".join(f"`results/{Path(r).parent.as_posix()}/kv_kept_keys.png`" for r in figures) or "-") + ".",
            "", table]


SECTIONS = [machines_section, default_model_section, eval_section, bench_section, attention_section,
            calibration_section, kernel_section, quant_section, full_recipe_section, sensitivity_section,
            weight_memory_section, decoder_section, sampling_section, mvar_section, mvar_pairs_section,
            mvar_quality_section, guidance_section, generation_section, kv_section,
            tune_section]


def _log() -> str:
    """The hand-written part of the current RESULTS.md (from the marker on)."""
    text = OUT.read_text() if OUT.exists() else ""
    if LOG_MARKER not in text:
        raise SystemExit(f"{OUT} has no log marker line; add it above the hand-written log:\n{LOG_MARKER}")
    return LOG_MARKER + text.split(LOG_MARKER, 1)[1]


def render() -> str:
    """The whole of RESULTS.md as it should be now."""
    load = _Reader()
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/make_results.py` from the JSON under `benchmarks/results/` (paths below are "
             "relative to it): edit or add result files and rerun it, do not edit the tables by hand. The README's "
             "summary and docs/ quote these tables. The log of past sessions, hand-written, follows the tables.", "",
             "Contents: " + ", ".join(["machines", "default model", "precision", "bench runs", "LiteVAR attention",
                                        "kernels", "quantization", "full recipe", "sensitivity", "weight memory",
                                        "int8 decoder", "sampling vs upstream", "M-VAR", "guidance", "KV-cache compression",
                                        "log"]) + ".", ""]
    for section in SECTIONS:
        parts += section(load) + [""]
    unread = [r for r in load.glob("**/*.json") if r not in load.read]
    if unread:
        parts += ["## Other result files", "", "No table above reads these yet:", ""]
        parts += [f"- `{r}`" for r in unread] + [""]
    return "\n".join(parts) + "\n" + _log()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when RESULTS.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python benchmarks/make_results.py", file=sys.stderr)
            raise SystemExit(1)
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
