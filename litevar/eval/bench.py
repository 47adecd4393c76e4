"""``litevar bench``: speed, memory and FLOPs of a candidate recipe next to the dense model, in one run.

Each variant (the dense baseline, then the candidate) runs in its own spawned process, so one model's
memory never counts for the other and peak RSS is honest. Both use the same labels and per-image seeds.
Per variant: latency at batch 1 (median of the repeats), throughput at batch N, peak memory (CPU: peak RSS
of the process, VmHWM; GPU: ``torch.cuda.max_memory_allocated``), RSS before loading, transformer time per
scale and the transformer / sampling / decoder split (``Pipeline.generate(timings=True)``), FLOPs per image
by bucket (:mod:`litevar.flops`, one counted batch-1 generation apart from the timed ones), KV-cache
bytes at batch N and weight bytes. Writes JSON (``"litevar_bench": 1``) and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from ..cli_args import UsageError, check_writable, positive, safe_name
from ..files import write_atomic
from ..jobs import JobList
from ..recipe import Recipe, load_recipe

BENCH_VERSION = 1
STAGES = ("transformer", "sampling", "decoder")
FLOP_BUCKETS = ("attention", "linear", "decoder", "other", "total")
CPU_FLAG_PREFIXES = ("avx512", "amx")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model and its vector/matrix flags (avx2, avx512*, amx*), torch version, and the GPU name."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.processor(), platform.machine()):
                model = value.strip()
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = sorted(f for f in flags if f == "avx2" or f.startswith(CPU_FLAG_PREFIXES))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"cpu": model, "cpu_flags": wanted, "cpu_count": multiprocessing.cpu_count(), "torch": torch.__version__,
            "gpu": gpu, "platform": platform.platform()}


def _status_mb(key: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now (Linux), MiB."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> None:
    """Restart the kernel's per-process peak RSS (VmHWM) from the current RSS (Linux; elsewhere a no-op)."""
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss where /proc is missing), MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(pipe, labels: list[int], seeds: list[int], sampling: dict, repeats: int,
                device: torch.device) -> list[tuple[float, dict]]:
    runs = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = pipe.generate(labels, seed=seeds, progress=False, timings=True, **sampling)
        _sync(device)
        runs.append((time.perf_counter() - start, out.timings))
    return runs


def _summary(runs: list[tuple[float, dict]]) -> dict[str, Any]:
    """Medians over repeats: whole call, each stage, and transformer time of each scale (element-wise)."""
    per_scale = [statistics.median(values) for values in zip(*(t["per_scale"] for _, t in runs))]
    return {"seconds": statistics.median(s for s, _ in runs), "seconds_all": [s for s, _ in runs],
            "stages_s": {k: statistics.median(t[k] for _, t in runs) for k in STAGES}, "per_scale_s": per_scale,
            "kv_cache_bytes": runs[-1][1]["kv_cache_bytes"], "kv_reserved_bytes": runs[-1][1]["kv_reserved_bytes"]}


def _attention_layer_seconds(pipe, labels, seeds, sampling: dict, device: torch.device) -> float:
    """Wall time inside the attention layers (q/k/v projection, attention, output projection) of one generation,
    from forward hooks; the processor decides what runs there (MDWA, ASC, ...)."""
    state = {"total": 0.0, "start": 0.0}

    def before(module, args):
        _sync(device)
        state["start"] = time.perf_counter()

    def after(module, args, output):
        _sync(device)
        state["total"] += time.perf_counter() - state["start"]

    handles = [h for block in pipe.var.blocks for h in (block.attn.register_forward_pre_hook(before),
                                                         block.attn.register_forward_hook(after))]
    try:
        pipe.generate(labels, seed=seeds, progress=False, **sampling)
    finally:
        for handle in handles:
            handle.remove()
    return state["total"]


def _attention_report(pipe) -> dict[str, Any]:
    """Which kernel ran per (layer, scale) and how often CFG halves shared, in the generation just run."""
    processor = pipe.var.blocks[0].attn.processor
    if not hasattr(processor, "report"):  # the dense oracle processor: SDPA everywhere, nothing shared
        return {"components": pipe.attention.describe(), "kernels": "sdpa"}
    return processor.report()


def _int8_modules(pipe) -> dict[str, int]:
    """Integer-kernel modules by type (what runs on int8 units)."""
    counts: dict[str, int] = {}
    for module in (*pipe.var.modules(), *pipe.vae.modules()):
        name = type(module).__name__
        if name.startswith(("Int8", "WeightOnly")):
            counts[name] = counts.get(name, 0) + 1
    return counts


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one variant and measure it (runs inside the spawned worker; callable in-process for tests).

    Args:
        spec: ``recipe`` (a :class:`Recipe`), ``var_ckpt``, ``vae_ckpt``, ``config``, ``shape``, ``device``,
            ``threads``, ``batch``, ``repeats``, ``warmup``, ``seed`` (image i uses seed + i) and ``sampling``.
    """
    from ..recipe import build_pipeline
    from .generation_flops import count_generation_flops

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    rss_before = rss_mb()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    pipe = build_pipeline(spec["recipe"], spec["var_ckpt"], spec["vae_ckpt"], spec["config"],
                          random_shape=spec["shape"], device=device)
    load_s = time.perf_counter() - start
    sampling = pipe.resolve_sampling(**spec["sampling"])
    batch = spec["batch"]
    labels, seeds = JobList(range(pipe.num_classes), samples=batch, seed=spec["seed"]).batch(range(batch))
    flops = count_generation_flops(pipe, labels[:1], seeds[:1], **sampling)
    attention = _attention_report(pipe)
    for _ in range(spec["warmup"]):
        pipe.generate(labels[:1], seed=seeds[:1], progress=False, **sampling)
        pipe.generate(labels, seed=seeds, progress=False, **sampling)
    latency = _summary(_timed_runs(pipe, labels[:1], seeds[:1], sampling, spec["repeats"], device))
    throughput = _summary(_timed_runs(pipe, labels, seeds, sampling, spec["repeats"], device))
    attention_s = statistics.median(_attention_layer_seconds(pipe, labels, seeds, sampling, device)
                                    for _ in range(spec["repeats"]))
    peak_rss = peak_rss_mb()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss
    weights = {"var": _weight_bytes(pipe.var), "vae": _weight_bytes(pipe.vae)}
    return {
        "recipe": spec["recipe"].to_dict(), "dtype": str(pipe.dtype).removeprefix("torch."),
        "latency_s": latency["seconds"], "images_per_s": batch / throughput["seconds"],
        "peak_memory_mb": peak, "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "peak_rss_mb": peak_rss, "rss_before_load_mb": rss_before, "load_s": load_s,
        "per_scale_s": latency["per_scale_s"], "stages_s": latency["stages_s"],
        "latency": {"batch": 1, **latency},
        "throughput": {"batch": batch, **throughput},
        "kv_cache_bytes": throughput["kv_cache_bytes"], "kv_reserved_bytes": throughput["kv_reserved_bytes"],
        "attention_layer_s": attention_s, "attention": attention, "int8_modules": _int8_modules(pipe),
        "weight_bytes": {**weights, "total": sum(weights.values())},
        "flops": flops, "threads": torch.get_num_threads(), "labels": labels, "seeds": seeds, "sampling": sampling,
        "patch_nums": list(pipe.config.var.patch_nums), "device": str(device), "pid": os.getpid(),
    }


def run_isolated(role: str, spec: dict[str, Any], measure=measure_variant) -> dict[str, Any]:
    """``measure(spec)`` (a module-level function) in a fresh spawned process: its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, spec).result()
        except BrokenProcessPool:
            raise UsageError(f"the {role} benchmark process died (killed, probably out of memory); "
                             "try a smaller --batch") from None


def _ratio(dense: float | None, candidate: float | None) -> float | None:
    if dense is None or not candidate:
        return None
    return dense / candidate


def compute_ratios(dense: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Dense over candidate (> 1: the candidate is faster / smaller / does less work)."""
    return {
        "latency": _ratio(dense["latency_s"], candidate["latency_s"]),
        "throughput_time": _ratio(1 / dense["images_per_s"], 1 / candidate["images_per_s"]),
        "peak_memory": _ratio(dense["peak_memory_mb"], candidate["peak_memory_mb"]),
        "kv_cache_bytes": _ratio(dense["kv_cache_bytes"], candidate["kv_cache_bytes"]),
        "attention_layer_time": _ratio(dense["attention_layer_s"], candidate["attention_layer_s"]),
        "weight_bytes": _ratio(dense["weight_bytes"]["total"], candidate["weight_bytes"]["total"]),
        "stages": {k: _ratio(dense["stages_s"][k], candidate["stages_s"][k]) for k in STAGES},
        "flops": {k: _ratio(dense["flops"][k], candidate["flops"][k]) for k in FLOP_BUCKETS},
    }


def _model_name(var_ckpt, shape) -> str:
    if shape is not None:
        return str(shape)
    return "default" if var_ckpt is None else Path(str(var_ckpt)).stem


def default_out(recipe: Recipe, var_ckpt=None, shape=None) -> Path:
    return Path("benchmarks/results") / f"bench_{safe_name(_model_name(var_ckpt, shape))}_{safe_name(recipe.name)}.json"


def _check_device(device: str) -> str:
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but this PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}); use --device cpu or install a CUDA build")
    return device


def run_bench(recipe: str | Recipe = "bf16", baseline: str | Recipe = "fp32", var_ckpt=None, vae_ckpt=None, config=None,
              shape: str | None = None, batch: int = 8, repeats: int = 3, warmup: int = 1, threads: int | None = None,
              device: str = "cpu", seed: int = 0, sampling: dict | None = None, isolate: bool = True) -> dict[str, Any]:
    """Benchmark the dense model (at ``baseline`` precision) and a candidate recipe on the same labels and seeds.

    Args:
        recipe: the candidate (see :func:`litevar.recipe.load_recipe`).
        baseline: precision of the dense model, "fp32" / "bf16" / "fp16".
        var_ckpt, vae_ckpt, config: the model (all None: the shipped default model).
        shape: a released shape (e.g. "var-d16") with seeded random weights instead of checkpoints.
        batch: images per batch for throughput and KV-cache bytes.
        repeats: timed runs per batch size (medians are reported). warmup: untimed runs per batch size first.
        threads: torch threads in each worker (None: torch's default).
        device: "cpu" or "cuda".
        seed: image i uses seed + i.
        sampling: cfg / top_k / top_p / more_smooth (missing or None: the model's defaults).
        isolate: run each variant in its own spawned process (honest peak RSS); False runs in this process.

    Example:
        >>> report = run_bench("bf16", batch=8, repeats=3)  # doctest: +SKIP
        >>> report["ratios"]["throughput_time"]  # doctest: +SKIP
    """
    from ..models.configs import load_config

    candidate = load_recipe(recipe)
    dense = load_recipe(baseline)
    if not dense.is_dense:
        raise UsageError(f"--baseline must be a precision (fp32, bf16, fp16), not a recipe with steps ({dense.name})")
    positive("--batch", batch)
    positive("--repeats", repeats)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"--warmup must be an integer >= 0, got {warmup!r}")
    if threads is not None:
        positive("--threads", threads)
    if shape is not None:
        if var_ckpt is not None or vae_ckpt is not None:
            raise UsageError("give either --shape (random weights of a released shape) or --var-ckpt/--vae-ckpt, not both")
        load_config(shape)
    _check_device(device)
    base = {"var_ckpt": None if var_ckpt is None else str(var_ckpt), "vae_ckpt": None if vae_ckpt is None else str(vae_ckpt),
            "config": None if config is None else str(config), "shape": shape, "device": device, "threads": threads,
            "batch": batch, "repeats": repeats, "warmup": warmup, "seed": seed, "sampling": dict(sampling or {})}
    run = run_isolated if isolate else (lambda role, spec: measure_variant(spec))
    results = {"dense": run("dense", {**base, "recipe": dense}), "candidate": run("candidate", {**base, "recipe": candidate})}
    return {
        "litevar_bench": BENCH_VERSION,
        "model": _model_name(var_ckpt, shape), "random_weights": shape is not None,
        "var_ckpt": base["var_ckpt"], "vae_ckpt": base["vae_ckpt"], "config": base["config"],
        "baseline": dense.to_dict(), "candidate_recipe": candidate.to_dict(),
        "settings": {"batch": batch, "repeats": repeats, "warmup": warmup, "threads": results["dense"]["threads"],
                     "device": device, "seed": seed, "labels": results["dense"]["labels"],
                     "seeds": results["dense"]["seeds"], "sampling": results["dense"]["sampling"],
                     "isolated_processes": isolate},
        "machine": machine_info(device),
        **results,
        "ratios": compute_ratios(results["dense"], results["candidate"]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def format_table(report: dict[str, Any]) -> str:
    """A compact text table: dense, candidate and dense/candidate per metric."""
    d, c, r = report["dense"], report["candidate"], report["ratios"]
    s = report["settings"]
    rows = [
        ("latency, batch 1 (s/img)", d["latency_s"], c["latency_s"], r["latency"]),
        (f"throughput, batch {s['batch']} (img/s)", d["images_per_s"], c["images_per_s"], r["throughput_time"]),
        ("peak memory (MB)", d["peak_memory_mb"], c["peak_memory_mb"], r["peak_memory"]),
        ("RSS before load (MB)", d["rss_before_load_mb"], c["rss_before_load_mb"], None),
        (f"KV cache, batch {s['batch']} (MB)", d["kv_cache_bytes"] / 2**20, c["kv_cache_bytes"] / 2**20, r["kv_cache_bytes"]),
        ("weights (MB)", d["weight_bytes"]["total"] / 2**20, c["weight_bytes"]["total"] / 2**20, r["weight_bytes"]),
        (f"attention layers s, batch {s['batch']}", d["attention_layer_s"], c["attention_layer_s"],
         r["attention_layer_time"]),
    ]
    rows += [(f"{k} s, batch 1", d["stages_s"][k], c["stages_s"][k], r["stages"][k]) for k in STAGES]
    rows += [(f"GFLOP/img {k}", d["flops"][k] / 1e9, c["flops"][k] / 1e9, r["flops"][k]) for k in FLOP_BUCKETS]
    machine = report["machine"]
    where = machine["gpu"] or f"{machine['cpu']} [{' '.join(machine['cpu_flags'])}]"
    head = (f"litevar bench: {report['model']} model, candidate {report['candidate_recipe']['name']} vs dense "
            f"{report['baseline']['name']} | {s['device']}, {s['threads']} threads, {where}, torch {machine['torch']}")
    lines = [head, f"{'metric':34s} {'dense':>11s} {'candidate':>11s} {'dense/cand':>11s}"]
    lines += [f"{name:34s} {_fmt(dv):>11s} {_fmt(cv):>11s} {_fmt(rv):>11s}" for name, dv, cv, rv in rows]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Transformer time per scale (dense vs candidate, batch 1) and the stage breakdown, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d, c = report["dense"], report["candidate"]
    names = (f"dense {report['baseline']['name']}", f"candidate {report['candidate_recipe']['name']}")
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_scale, ax_stage = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    xs = range(len(d["per_scale_s"]))
    ax_scale.bar([x - 0.2 for x in xs], [v * 1e3 for v in d["per_scale_s"]], width=0.4, label=names[0])
    ax_scale.bar([x + 0.2 for x in xs], [v * 1e3 for v in c["per_scale_s"]], width=0.4, label=names[1])
    ax_scale.set_xticks(list(xs), [f"{pn}x{pn}" for pn in d["patch_nums"]])
    ax_scale.set_xlabel("scale")
    ax_scale.set_ylabel("transformer ms (batch 1)")
    ax_scale.set_title("time per scale")
    ax_scale.legend()
    batch = report["settings"]["batch"]
    bars = [("dense\nb1", d["stages_s"], 1), ("cand.\nb1", c["stages_s"], 1),
            (f"dense\nb{batch}/img", d["throughput"]["stages_s"], batch),
            (f"cand.\nb{batch}/img", c["throughput"]["stages_s"], batch)]
    bottom = [0.0] * len(bars)
    for stage in STAGES:
        heights = [stages[stage] / n for _, stages, n in bars]
        ax_stage.bar([label for label, _, _ in bars], heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_stage.set_ylabel("seconds per image")
    ax_stage.set_title("stages")
    ax_stage.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_report(report: dict[str, Any], out: Path) -> Path:
    """The JSON at ``out`` and the PNG next to it; returns the PNG path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    png = out.with_suffix(".png")
    plot_report(report, png)
    return png


def cmd_bench(args: argparse.Namespace) -> None:
    candidate = load_recipe(args.recipe)
    if args.shape is not None and (args.var_ckpt is not None or args.vae_ckpt is not None):
        raise UsageError("give either --shape (random weights of a released shape) or --var-ckpt/--vae-ckpt, not both")
    out = Path(args.out) if args.out else default_out(candidate, args.var_ckpt, args.shape)
    check_writable(out.parent)
    sampling = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p}
    report = run_bench(candidate, args.baseline, args.var_ckpt, args.vae_ckpt, args.config, args.shape, args.batch,
                       args.repeats, args.warmup, args.threads, args.device, args.seed, sampling)
    png = write_report(report, out)
    print(format_table(report))
    print(f"wrote {out} and {png}")


def add_bench_command(sub) -> None:
    """Register ``litevar bench`` on the CLI's subparsers."""
    from ..cli_args import add_model_args, add_recipe_arg, add_sampling_args

    b = sub.add_parser("bench", help="speed, memory and FLOPs of a recipe next to the dense model")
    add_model_args(b, random_shapes=True)
    add_recipe_arg(b, default="bf16")
    b.add_argument("--baseline", default="fp32", help="precision of the dense baseline: fp32, bf16 or fp16 (default fp32)")
    b.add_argument("--batch", type=int, default=8, help="batch for throughput and KV-cache bytes (default 8)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per batch size; medians reported (default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first (default 1)")
    b.add_argument("--threads", type=int, help="torch threads in each benchmark process (default: torch's)")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--seed", type=int, default=0, help="image i uses seed + i (same for both variants)")
    add_sampling_args(b, more_smooth=False)
    b.add_argument("--out", help="JSON path (a PNG is written next to it); default benchmarks/results/bench_<model>_<recipe>.json")
    b.set_defaults(func=cmd_bench)
