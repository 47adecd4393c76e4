"""The VQ-VAE decoder on int8 convolutions (oneDNN, AMX-INT8) vs bf16: per-layer and whole-decoder time, and
fidelity on the shipped default model.

    python benchmarks/bench_decoder.py --threads 1 --batch 8 --out benchmarks/results/quant/decoder_int8.json [--quick]

- ``layers``: every distinct convolution shape of the decoder of ``--shape`` (random weights) at ``--batch``:
  the bf16 module vs :class:`~litevar.quant.conv.Int8Conv2d` (input rounding included; also with ATen's quantize
  in one call instead of cache-sized chunks); which layers the default rule (``min_reduction``) converts.
- ``decoder``: the whole decoder on one batch of random-token latents: bf16 (all float), int8 by the default rule,
  int8 where this CPU's probe (``select: "probe"``, :mod:`litevar.quant.probe`, at ``--batch``) chose it, int8
  everywhere. Ranges come from decoding other random tokens (with random weights they set no speed). ``probe``
  holds the probe's choice and per-layer timings (cached per CPU: ``--probe-fresh`` measures again).
- ``fidelity``: the shipped default model, ``--samples`` generated token maps (evaluation seeds 0..), decoded by
  the bf16 decoder and by int8 decoders calibrated on the step's own generations (seeds 100000..); PSNR of the
  images in [0, 1], with the fp32-vs-bf16 PSNR as the floor bf16 itself sets.
Variants alternate within every repetition so that drifting load hits them alike; medians are reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_sampling import cpu_flags  # noqa: E402
from litevar.quant.conv import ACT_SPEC, Int8Conv2d, Int8Upsample2x, onednn_int8_conv_available  # noqa: E402
from litevar.quant.decoder import (DecoderInt8Config, calibrate_decoder, quantize_decoder_,  # noqa: E402
                                   reduction, replace_decoder_convs, select_convs, selection)
from litevar.quant.probe import describe  # noqa: E402
from litevar.quant.kernels import quantize_static  # noqa: E402
from litevar.recipe import build_pipeline  # noqa: E402


def interleaved(fns: dict, repeats: int, raw: dict | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median and min milliseconds of each callable, the callables alternating within every repetition
    (every time, in milliseconds, appended to ``raw[name]`` when given)."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    if raw is not None:
        for name, v in times.items():
            raw[name] = [round(1e3 * t, 1) for t in v]
    return ({name: 1e3 * statistics.median(v) for name, v in times.items()},
            {name: 1e3 * min(v) for name, v in times.items()})


def random_tokens(pipe, batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(pipe.vae.cfg.vocab_size, (batch, pn * pn), generator=gen) for pn in pipe.config.var.patch_nums]


def conv_inputs(vae, f_hat: torch.Tensor) -> dict[str, tuple]:
    """Input shape of every decoder convolution in one decode."""
    shapes, handles = {}, []
    for name, module in vae.decoder.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
    vae.fhat_to_img(f_hat)
    for handle in handles:
        handle.remove()
    return shapes


def bench_layers(pipe, batch: int, repeats: int, default: DecoderInt8Config) -> list[dict]:
    vae = pipe.vae
    shapes = conv_inputs(vae, vae.quantize.idx_to_fhat(random_tokens(pipe, 1, 0)))
    chosen = set(select_convs(vae.decoder, default))
    groups: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        weight = vae.decoder.get_submodule(name).weight
        groups.setdefault((shape[1:], tuple(weight.shape), name.endswith("upsample.conv")), []).append(name)
    rows = []
    for (in_shape, w_shape, _), names in groups.items():
        conv = vae.decoder.get_submodule(names[0])
        torch.manual_seed(0)
        x = torch.randn(batch, *in_shape).to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
        int8 = Int8Conv2d.from_conv(conv, float(x.min()), float(x.max()))
        scale, zero = int8.input_qparams()
        variants = {"bf16": lambda: conv(x), "int8": lambda: int8(x),
                    "int8_unchunked_rounding": lambda: int8(quantize_static(x, scale, zero, ACT_SPEC))}
        if names[0].endswith("upsample.conv"):  # Int8Upsample2x rounds the quarter-size input, then upsamples
            small = x[:, :, ::2, ::2].contiguous(memory_format=torch.channels_last)
            up = Int8Upsample2x(int8)
            variants["int8"] = lambda: up(small)
            variants["bf16"] = lambda: conv(F.interpolate(small, scale_factor=2, mode="nearest"))
            variants.pop("int8_unchunked_rounding")
        ms, fastest = interleaved(variants, repeats)
        gflop = 2 * batch * in_shape[1] * in_shape[2] * w_shape[0] * reduction(conv) / 1e9
        rows.append({"layers": names, "input": [batch, *in_shape], "weight": list(w_shape), "reduction": reduction(conv),
                     "gflop": round(gflop, 2), "median_ms": {k: round(v, 3) for k, v in ms.items()},
                     "min_ms": {k: round(v, 3) for k, v in fastest.items()},
                     "ratio_int8_over_bf16": round(ms["int8"] / ms["bf16"], 3),
                     "ratio_int8_over_bf16_min": round(fastest["int8"] / fastest["bf16"], 3),
                     "converted_by_default": names[0] in chosen})
        if "int8_unchunked_rounding" in ms:
            rows[-1]["ratio_int8_unchunked_rounding_over_bf16"] = round(ms["int8_unchunked_rounding"] / ms["bf16"], 3)
        print(f"{names[0]:28s} x{len(names):<2d} {str(rows[-1]['input']):22s} bf16 {ms['bf16']:8.2f} ms  int8 "
              f"{ms['int8']:8.2f} ms  ratio {rows[-1]['ratio_int8_over_bf16']:.2f} (min {rows[-1]['ratio_int8_over_bf16_min']:.2f}, "
              f"unchunked rounding {rows[-1].get('ratio_int8_unchunked_rounding_over_bf16', float('nan')):.2f})  "
              f"{'int8' if rows[-1]['converted_by_default'] else 'float'}", flush=True)
    return rows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR of images in [0, 1], None when they are identical (JSON has no infinity)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return None if mse == 0 else round(10 * torch.log10(torch.tensor(1 / mse)).item(), 2)


def int8_vae(vae, config: DecoderInt8Config, calib: list, names: list[str] | None = None):
    """A copy of ``vae`` with the convolutions ``config`` chooses (or ``names``) on int8, ranges from decoding
    ``calib``."""
    vae = copy.deepcopy(vae)
    names = select_convs(vae.decoder, config) if names is None else names
    replace_decoder_convs(vae.decoder, calibrate_decoder(vae, calib, names, config.act_range, config.percentile))
    return vae, names


def probe_choice(pipe, batch: int, fresh: bool) -> dict:
    """The probe's choice for this CPU at ``batch`` (``select: "probe"``), with its per-layer timings."""
    start = time.perf_counter()
    report = selection(pipe.vae, DecoderInt8Config(select="probe", probe_batch=batch), use_cache=not fresh)
    report["probe_seconds"] = round(time.perf_counter() - start, 1)
    print(describe(report), flush=True)
    return report


def bench_decoder(pipe, batch: int, repeats: int, default: DecoderInt8Config, probe: dict) -> dict:
    f_hat = pipe.vae.quantize.idx_to_fhat(random_tokens(pipe, batch, 1))
    calib = [random_tokens(pipe, 2, 2)]
    variants = {"bf16": (pipe.vae, [])}
    variants["int8_default_rule"] = int8_vae(pipe.vae, default, calib)
    variants["int8_probe"] = int8_vae(pipe.vae, default, calib, probe["chosen"])
    variants["int8_all_convs"] = int8_vae(pipe.vae, DecoderInt8Config(min_reduction=0), calib)
    raw: dict[str, list] = {}
    ms, fastest = interleaved({name: (lambda vae=vae: vae.fhat_to_img(f_hat)) for name, (vae, _) in variants.items()},
                              repeats, raw)
    with torch.inference_mode():
        images = {name: vae.fhat_to_img(f_hat).add_(1).mul_(0.5) for name, (vae, _) in variants.items()}
    out = {"batch": batch, "repeats": repeats, "median_ms": {k: round(v, 1) for k, v in ms.items()},
           "min_ms": {k: round(v, 1) for k, v in fastest.items()},
           "converted": {k: len(names) for k, (_, names) in variants.items()},
           "psnr_vs_bf16_random_weights": {k: psnr(images[k], images["bf16"]) for k in variants if k != "bf16"}}
    out["ratio_over_bf16"] = {k: round(v / ms["bf16"], 3) for k, v in ms.items() if k != "bf16"}
    out["ratio_over_bf16_min"] = {k: round(v / fastest["bf16"], 3) for k, v in fastest.items() if k != "bf16"}
    # per repetition (the variants ran back to back): robust to load that drifts over minutes
    out["ratio_over_bf16_paired_median"] = {
        k: round(statistics.median(a / b for a, b in zip(raw[k], raw["bf16"])), 3) for k in raw if k != "bf16"}
    out["times_ms"] = raw
    print(json.dumps(out), flush=True)
    return out


def fidelity(samples: int, calib_samples: int) -> dict:
    pipe = build_pipeline("bf16")
    labels = [i % pipe.num_classes for i in range(samples)]
    out = pipe.generate(labels, seed=list(range(samples)), progress=False)
    fp32 = build_pipeline("fp32")
    reference = fp32.vae.idx_to_img(out.tokens).add_(1).mul_(0.5)
    result = {"model": "shipped default (litevar-fashion-mnist-d4)", "samples": samples, "eval_seeds": [0, samples - 1],
              "calib_samples": calib_samples, "psnr_bf16_vs_fp32_decoder": psnr(out.images, reference),
              "int8_vs_bf16": {}}
    rules = {"default_rule": {}, "all_convs_mse": {"min_reduction": 0},
             "all_convs_minmax": {"min_reduction": 0, "act_range": "minmax"},
             "all_convs_percentile_0.9999": {"min_reduction": 0, "act_range": "percentile"}}
    for name, fields in rules.items():
        quantized = build_pipeline("bf16")
        names = quantize_decoder_(quantized, DecoderInt8Config(calib_samples=calib_samples, **fields))
        images = quantized.vae.idx_to_img(out.tokens).add_(1).mul_(0.5)
        per_image = [psnr(a, b) for a, b in zip(images, out.images)]
        result["int8_vs_bf16"][name] = {"converted": len(names), "psnr": psnr(images, out.images),
                                        "psnr_min_image": None if None in per_image else min(per_image),
                                        "psnr_vs_fp32": psnr(images, reference),
                                        "max_abs": round(float((images - out.images).abs().max()), 4)}
        print(name, json.dumps(result["int8_vs_bf16"][name]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="var-d16", help="random-weight model shape for the timings")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="per layer")
    parser.add_argument("--decoder-repeats", type=int, default=None, help="whole decoder (default: --repeats)")
    parser.add_argument("--samples", type=int, default=20, help="generated token maps for the fidelity part")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["layers", "decoder", "fidelity"])
    parser.add_argument("--probe-fresh", action="store_true", help="measure the probe again instead of reading "
                        "its per-CPU cache")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 repeats, 4 samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.repeats, args.decoder_repeats, args.samples = 1, 2, 2, 4
    default = DecoderInt8Config()
    result = {"machine": {**cpu_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "onednn_int8_conv": onednn_int8_conv_available(), "loadavg_start": os.getloadavg()},
              "dtype": "bf16", "shape": args.shape, "default_rule": {"min_reduction": default.min_reduction}}
    start = time.perf_counter()
    if "layers" not in args.skip or "decoder" not in args.skip:
        pipe = build_pipeline("bf16", random_shape=args.shape)
        if "layers" not in args.skip:
            result["layers"] = bench_layers(pipe, args.batch, args.repeats, default)
        if "decoder" not in args.skip:
            result["probe"] = probe_choice(pipe, args.batch, args.probe_fresh)
            result["decoder"] = bench_decoder(pipe, args.batch, args.decoder_repeats or args.repeats, default,
                                              result["probe"])
        del pipe
    if "fidelity" not in args.skip:
        result["fidelity"] = fidelity(args.samples, args.calib_samples)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
