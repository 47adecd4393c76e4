"""M-VAR's Mamba-2 per scale while sampling: the stateful sampler (each scale continues from the carried conv rows and
SSM state) against upstream's re-scan (Mamba over the whole prefix from a zero state at every scale).

    python benchmarks/bench_mvar.py --shape mvar-d16 --batch 1 --out benchmarks/results/mvar/mamba_scales_d16.json

One Mamba-2 layer of the shape (random weights, seeded; time does not depend on them) on random inputs with the CFG
rows (2 x batch). Per scale: the median milliseconds of each variant (they alternate within each repetition, so
drifting load hits both alike), the tokens each processes, and what each carries between scales (state bytes vs
the re-scanned history). The outputs of the two variants are compared on the way (max abs difference).
Multiply by the depth for a whole model's Mamba time.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from litevar.eval.bench import machine_info  # noqa: E402
from litevar.models.configs import MVARConfig, from_name  # noqa: E402
from litevar.models.mamba2 import Mamba2  # noqa: E402
from litevar.pipeline import parse_dtype  # noqa: E402


def build_layer(cfg: MVARConfig, dtype: torch.dtype, seed: int) -> Mamba2:
    torch.manual_seed(seed)
    layer = Mamba2(cfg.width, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim)
    with torch.no_grad():  # a plausible SSM: mamba_ssm's ranges for the step sizes and decay rates
        heads = layer.nheads
        dt = torch.exp(torch.rand(heads) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                       + torch.log(torch.tensor(1e-3)))
        layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        layer.A_log.copy_(torch.empty(heads).uniform_(1, 16).log())
    return layer.to(dtype).eval().requires_grad_(False)


def one_pass(layer: Mamba2, inputs: list[torch.Tensor], lengths: list[int], rescan: bool):
    """Mamba over every scale in turn; (seconds per scale, outputs per scale, carried bytes per scale)."""
    seconds, outs, carried = [], [], []
    state = layer.empty_state(inputs[0].shape[0], inputs[0].dtype, inputs[0].device)
    prefix = None
    for si, x in enumerate(inputs):
        start = time.perf_counter()
        if rescan:
            prefix = x if prefix is None else torch.cat((prefix, x), 1)
            y = layer(prefix, lengths[:si + 1])[:, prefix.shape[1] - x.shape[1]:]
            carried.append(prefix.numel() * prefix.element_size())
        else:
            y = layer(x, [x.shape[1]], state)
            carried.append(state.nbytes())
        seconds.append(time.perf_counter() - start)
        outs.append(y)
    return seconds, outs, carried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mvar-d16", help="an M-VAR shape (mvar-d16 ... mvar-d32)")
    parser.add_argument("--batch", type=int, default=1, help="images (the layer sees 2 x batch rows with CFG)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_name(args.shape).var
    if not isinstance(cfg, MVARConfig):
        parser.error(f"--shape must be an M-VAR shape (mvar-d16 ... mvar-d32), got {args.shape}")
    dtype = parse_dtype(args.dtype)
    layer = build_layer(cfg, dtype, args.seed)
    rows = 2 * args.batch
    lengths = [pn * pn for pn in cfg.patch_nums]
    gen = torch.Generator().manual_seed(args.seed + 1)
    inputs = [torch.randn(rows, n, cfg.width, generator=gen).to(dtype) for n in lengths]
    times = {"stateful": [], "rescan": []}
    with torch.inference_mode():
        one_pass(layer, inputs, lengths, False)  # warm-up
        one_pass(layer, inputs, lengths, True)
        for _ in range(args.repeats):
            for name in times:
                seconds, outs, carried = one_pass(layer, inputs, lengths, name == "rescan")
                times[name].append(seconds)
                if name == "stateful":
                    stateful_outs, stateful_bytes = outs, carried
                else:
                    rescan_outs, rescan_bytes = outs, carried
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(stateful_outs, rescan_outs))
    scales = []
    for si, n in enumerate(lengths):
        med = {name: statistics.median(run[si] for run in runs) * 1e3 for name, runs in times.items()}
        scales.append({"scale": si, "tokens": n, "prefix_tokens": sum(lengths[:si + 1]),
                       "stateful_ms": round(med["stateful"], 4), "rescan_ms": round(med["rescan"], 4),
                       "stateful_carried_bytes": stateful_bytes[si], "rescan_carried_bytes": rescan_bytes[si]})
    total = {name: sum(s[f"{name}_ms"] for s in scales) for name in times}
    report = {"benchmark": "mvar_mamba_per_scale", "shape": args.shape, "random_weights": True,
              "width": cfg.width, "mamba_heads": cfg.mamba_heads, "d_state": cfg.d_state, "rows": rows,
              "batch": args.batch, "dtype": args.dtype, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "token_steps": {"stateful": sum(lengths), "rescan": sum(s["prefix_tokens"] for s in scales)},
              "total_ms_per_layer": {k: round(v, 3) for k, v in total.items()},
              "speedup_total": round(total["rescan"] / total["stateful"], 3),
              "max_abs_diff_outputs": diff, "scales": scales,
              "machine": machine_info(), "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.shape} Mamba-2 layer, {rows} rows, {args.dtype}: stateful {total['stateful']:.1f} ms vs rescan "
          f"{total['rescan']:.1f} ms per layer per image set ({report['speedup_total']}x); max |diff| {diff:.2e}")
    for s in scales:
        print(f"  scale {s['scale']} ({s['tokens']:3d} tokens, prefix {s['prefix_tokens']:3d}): stateful "
              f"{s['stateful_ms']:8.2f} ms  rescan {s['rescan_ms']:8.2f} ms")


if __name__ == "__main__":
    main()
