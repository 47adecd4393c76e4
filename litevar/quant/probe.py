"""Which VQ-VAE decoder convolutions run faster on int8 on *this* CPU: measured, not predicted.

The static rule (``min_reduction`` in :mod:`litevar.quant.decoder`) was measured on a CPU with AMX; elsewhere the
ratios differ (without VNNI oneDNN has no exact int8 kernel at all). :func:`probe_decoder` records the calls the
decoder really makes (input shape, memory format, upsampling) on one decode of a random latent, then times each
distinct one at the batch asked for: the float module in the decoder's dtype against :class:`Int8Conv2d` as it
runs (rounding of its input included; an upsampling convolution rounds before the 2x upsampling, as
:class:`Int8Upsample2x` does). The two alternate within every repetition and the medians are compared: int8 is
chosen only where it is faster by ``margin``.

Timings are cached as JSON in :func:`~litevar.files.user_cache_dir` ``/decoder_probe``, keyed by what they depend
on: CPU model and its int8-relevant flags, threads, torch version, dtype, batch and the distinct calls. A hit
skips the measurement; the decisions are taken again from the cached timings with the margin asked for.

Before timing anything the gate (:func:`int8_gate`) asks whether the integer kernel is exact here on the input
grid (8-bit, or 7-bit on AVX2-only CPUs, whose ``vpmaddubsw`` saturates 8-bit pair sums at int16); where it is
not, :class:`Int8Conv2d` runs as a float emulation, so every convolution stays float and the result says why.
"""
from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import user_cache_dir, write_atomic
from .conv import Int8Conv2d, Int8Upsample2x, int8_conv_kernel_exact

PROBE_VERSION = 2  # 2: 7-bit input grids on AVX2-only CPUs
REPEATS = 5
MARGIN = 0.05
CACHE_SUBDIR = "decoder_probe"
# flags that change which int8 / bf16 kernels oneDNN dispatches to
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16")

# one timed run of ``fn`` in seconds: ``timer(variant, call, fn)`` with variant "float" or "int8"
Timer = Callable[[str, "ConvCall", Callable[[], Any]], float]


def wall_clock(variant: str, call: "ConvCall", fn: Callable[[], Any]) -> float:
    """The default :data:`Timer`: wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return model or platform.processor() or platform.machine(), flags


def cpu_identity() -> dict[str, Any]:
    """The CPU as far as int8 convolution speed depends on it: model name, architecture, int8-relevant flags."""
    model, flags = _cpuinfo()
    return {"model": model, "machine": platform.machine(), "flags": [f for f in INT8_FLAGS if f in flags]}


def int8_gate(device: torch.device | str = "cpu") -> str | None:
    """Why int8 decoder convolutions cannot pay on ``device`` (None: they may; measure them).

    Example:
        >>> int8_gate("cuda")
        'no int8 convolution kernel on cuda: Int8Conv2d runs as a float emulation there'
    """
    device = torch.device(device)
    if device.type != "cpu":
        return f"no int8 convolution kernel on {device.type}: Int8Conv2d runs as a float emulation there"
    ops = torch.ops.onednn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "qconv2d_pointwise")
            and hasattr(ops, "qconv_prepack")):
        return "this PyTorch build has no oneDNN int8 convolution (onednn::qconv2d_pointwise)"
    if not int8_conv_kernel_exact():
        return "oneDNN's int8 convolution gave inexact integer results on this CPU (checked on a small convolution)"
    return None


@dataclass(frozen=True)
class ConvCall:
    """A decoder convolution as the decoder runs it, per image (the batch is the probe's).

    Args:
        in_channels, height, width: the input the int8 path takes (an upsampling convolution: before the 2x
            nearest upsampling, which :class:`Int8Upsample2x` applies to the rounded uint8 input).
        weight: the weight's shape ``(out, in / groups, kh, kw)``.
        stride, padding, dilation, groups, bias: the convolution's geometry.
        upsample: the convolution of an ``Upsample2x``.
        channels_last: the decoder's activations are channels-last (bf16 / fp16 decoders).

    Example:
        >>> ConvCall(128, 16, 16, (128, 128, 3, 3)).label()
        'conv 128x16x16 w128x128x3x3 s1 p1 d1 g1 nchw'
    """

    in_channels: int
    height: int
    width: int
    weight: tuple[int, ...]
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (1, 1)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    bias: bool = True
    upsample: bool = False
    channels_last: bool = False

    def label(self) -> str:
        """A readable key, unique per call: the cache's and the report's."""
        dims = "x".join(map(str, self.weight))
        return (f"{'upsample2x+conv' if self.upsample else 'conv'} {self.in_channels}x{self.height}x{self.width} "
                f"w{dims} s{self.stride[0]} p{self.padding[0]} d{self.dilation[0]} g{self.groups}"
                f"{'' if self.bias else ' nobias'} {'nhwc' if self.channels_last else 'nchw'}")

    def reduction(self) -> int:
        return self.weight[1] * self.weight[2] * self.weight[3]


def decoder_calls(vae) -> dict[str, ConvCall]:
    """``{decoder convolution name: its call}`` for every float Conv2d of ``vae.decoder`` the decoder runs, in model
    order, recorded with forward hooks on one decode of a random batch-1 latent of the model's size (``z_channels``
    x last patch side)."""
    from ..models.vqvae import Upsample2x

    decoder = vae.decoder
    upsample_convs = {f"{n}.conv" for n, m in decoder.named_modules() if isinstance(m, Upsample2x)}
    calls, handles = {}, []

    def hook(name: str, conv: nn.Conv2d):
        def record(module, args) -> None:
            x = args[0]
            height, width = x.shape[-2:]
            if name in upsample_convs:
                height, width = height // 2, width // 2
            calls[name] = ConvCall(x.shape[1], height, width, tuple(conv.weight.shape), tuple(conv.stride),
                                   tuple(conv.padding), tuple(conv.dilation), conv.groups, conv.bias is not None,
                                   name in upsample_convs, x.is_contiguous(memory_format=torch.channels_last)
                                   and not x.is_contiguous())
        return record

    try:
        for name, module in decoder.named_modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_pre_hook(hook(name, module)))
        side = vae.cfg.patch_nums[-1]
        f_hat = torch.randn(1, vae.cfg.z_channels, side, side, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            vae.fhat_to_img(f_hat.to(vae.post_quant_conv.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return {n: calls[n] for n, _ in decoder.named_modules() if n in calls}  # model order, not run order


@dataclass
class ProbeResult:
    """What :func:`probe_decoder` chose and why.

    Args:
        chosen: decoder convolution names chosen for int8, in model order.
        convs: ``{name: {"int8": bool, "why": str, "call": label, "float_ms", "int8_ms", "ratio"}}`` (the timings
            absent where nothing was measured).
        gate: why int8 was refused everywhere without measuring (None: measured).
        key: what the timings depend on (the cache key). cache: "hit", "miss", "off" (``use_cache`` False) or
            "unused" (the gate refused). cache_file: its path.
    """

    chosen: list[str]
    convs: dict[str, dict[str, Any]]
    gate: str | None
    key: dict[str, Any]
    cache: str = "off"
    cache_file: str | None = None
    margin: float = MARGIN
    timings: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"select": "probe", "batch": self.key["batch"], "dtype": self.key["dtype"], "margin": self.margin,
                "gate": self.gate, "cache": self.cache, "cache_file": self.cache_file, "cpu": self.key["cpu"],
                "threads": self.key["threads"], "chosen": list(self.chosen), "convs": self.convs}


def probe_key(calls: dict[str, ConvCall], batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """Everything the timings depend on; its hash names the cache file."""
    return {"version": PROBE_VERSION, "cpu": cpu_identity(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "calls": sorted({c.label() for c in calls.values()})}


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir / f"{digest}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, dict[str, list[float]]] | None:
    """The cached timings for ``key``, or None (absent, unreadable, or written for another key)."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"decoder probe cache {path} is unreadable ({type(err).__name__}); measuring again",
                      stacklevel=3)
        return None
    if not isinstance(raw, dict) or raw.get("key") != key:
        return None
    timings = raw.get("timings")
    if not isinstance(timings, dict) or set(timings) != set(key["calls"]) \
            or not all(_timing_lists(v) for v in timings.values()):
        return None
    return timings


def _timing_lists(entry: Any) -> bool:
    """``{"float_ms": [...], "int8_ms": [...]}``, each a non-empty list of numbers."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), list) and entry[k] and all(isinstance(t, (int, float)) for t in entry[k])
        for k in ("float_ms", "int8_ms"))


def _write_cache(path: Path, key: dict[str, Any], timings: dict, decisions: dict, margin: float) -> bool:
    body = {"key": key, "margin": margin, "timings": timings, "int8": decisions}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(body, indent=1)))
    except OSError as err:
        warnings.warn(f"decoder probe: could not write its cache {path} ({err.strerror or err}); the choice stands, "
                      "but the next run measures again (set LITEVAR_CACHE to a writable folder)", stacklevel=3)
        return False
    return True


def _variants(conv: nn.Conv2d, call: ConvCall, batch: int, gen: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The float module and its int8 replacement on one random input of ``call``'s shape at ``batch``."""
    dtype, device = conv.weight.dtype, conv.weight.device
    fmt = torch.channels_last if call.channels_last else torch.contiguous_format
    x = torch.randn(batch, call.in_channels, call.height, call.width, generator=gen)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    int8 = Int8Conv2d.from_conv(conv, float(x.min()), float(x.max()))
    if call.upsample:
        up = Int8Upsample2x(int8)
        return {"float": lambda: conv(F.interpolate(x, scale_factor=2, mode="nearest")), "int8": lambda: up(x)}
    return {"float": lambda: conv(x), "int8": lambda: int8(x)}


def _measure(decoder: nn.Module, calls: dict[str, ConvCall], batch: int, repeats: int,
             timer: Timer) -> dict[str, dict[str, list[float]]]:
    """Milliseconds of every repetition of each distinct call, float and int8 alternating (and which one goes
    first alternating too), after one untimed warm-up of each (it also packs the int8 weight)."""
    first = {}
    for name, call in calls.items():
        first.setdefault(call.label(), (name, call))
    gen = torch.Generator().manual_seed(0)
    timings = {}
    with torch.inference_mode():
        for label, (name, call) in first.items():
            fns = _variants(decoder.get_submodule(name), call, batch, gen)
            for variant, fn in fns.items():
                timer(variant, call, fn)
            times: dict[str, list[float]] = {variant: [] for variant in fns}
            for rep in range(repeats):
                order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
                for variant in order:
                    times[variant].append(round(1e3 * timer(variant, call, fns[variant]), 4))
            timings[label] = {f"{variant}_ms": v for variant, v in times.items()}
    return timings


def decide(calls: dict[str, ConvCall], timings: dict[str, dict[str, list[float]]],
           margin: float) -> dict[str, dict[str, Any]]:
    """Per convolution: int8 where its median time is at most ``(1 - margin)`` of the float one's."""
    out = {}
    for name, call in calls.items():
        times = timings[call.label()]
        float_ms, int8_ms = statistics.median(times["float_ms"]), statistics.median(times["int8_ms"])
        ratio = int8_ms / float_ms if float_ms > 0 else float("inf")
        faster = ratio <= 1 - margin
        why = (f"int8 {ratio:.2f}x of float ({'<=' if faster else '>'} {1 - margin:.2f}: "
               f"{'faster by the margin' if faster else 'not faster by the margin'})")
        out[name] = {"int8": faster, "why": why, "call": call.label(), "float_ms": round(float_ms, 4),
                     "int8_ms": round(int8_ms, 4), "ratio": round(ratio, 4)}
    return out


def probe_decoder(vae, batch: int = 1, margin: float = MARGIN, repeats: int = REPEATS,
                  names: list[str] | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
                  timer: Timer | None = None) -> ProbeResult:
    """Time each decoder convolution in float and int8 on this machine and choose int8 where it is faster.

    Args:
        vae: the VQ-VAE, its decoder still float (in the pipeline's dtype and device).
        batch: images per decode to measure for (decoder speed ratios change with the batch).
        margin: int8 is chosen where its median is at most ``1 - margin`` of float's (0.05: 5% faster).
        repeats: timed repetitions of each variant (after one warm-up), alternating.
        names: the candidate convolutions (default: every float Conv2d of the decoder); the others are not timed.
        cache_dir: where timings are cached (default: ``user_cache_dir() / "decoder_probe"``).
        use_cache: read and write the cache.
        timer: how one run is timed (default :func:`wall_clock`); tests inject a fake one.

    Example:
        >>> probe_decoder(pipe.vae, batch=8).chosen  # doctest: +SKIP
        ['mid.block_1.conv1', 'mid.block_1.conv2', ...]
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}")
    calls = decoder_calls(vae)
    if names is not None:  # a name the decoder never runs has no call to time: not chosen
        calls = {n: c for n, c in calls.items() if n in set(names)}
    key = probe_key(calls, batch, vae.compute_dtype)
    gate = int8_gate(vae.post_quant_conv.weight.device)
    if gate is not None:
        convs = {n: {"int8": False, "why": f"gate: {gate}", "call": c.label()} for n, c in calls.items()}
        return ProbeResult([], convs, gate, key, cache="unused", margin=margin)
    path = _cache_path(Path(cache_dir) if cache_dir is not None else user_cache_dir() / CACHE_SUBDIR, key)
    timings = _read_cache(path, key) if use_cache else None
    cache = "hit" if timings is not None else "miss" if use_cache else "off"
    if timings is None:
        timings = _measure(vae.decoder, calls, batch, repeats, timer or wall_clock)
    convs = decide(calls, timings, margin)
    if cache == "miss":
        decisions = {label: next(v["int8"] for v in convs.values() if v["call"] == label) for label in timings}
        _write_cache(path, key, timings, decisions, margin)
    chosen = [n for n in calls if convs[n]["int8"]]
    return ProbeResult(chosen, convs, None, key, cache, str(path) if use_cache else None, margin, timings)


def describe(report: dict[str, Any]) -> str:
    """A few lines saying which decoder convolutions a ``decoder-int8`` step converted and why."""
    convs = report.get("convs", {})
    head = f"decoder-int8 ({report.get('select')}): {len(report.get('chosen', []))}/{len(convs)} convolutions on int8"
    if report.get("select") == "probe":
        head += f" (batch {report['batch']}, {report['dtype']}, cache {report['cache']})"
        if report.get("gate"):
            head += f"; float everywhere: {report['gate']}"
    lines = [head]
    lines += [f"  {'int8 ' if v['int8'] else 'float'} {name}: {v['why']}" for name, v in convs.items()]
    return "\n".join(lines)


__all__ = ["ConvCall", "ProbeResult", "cpu_identity", "decide", "decoder_calls", "describe", "int8_gate",
           "int8_conv_kernel_exact", "probe_decoder", "wall_clock"]
