"""Transformer time per scale: dense vs a ``guidance`` recipe, interleaved A B A B in one process.

Both pipelines (same random weights of a released shape, same labels and per-image seeds) are loaded once and
run alternately, so the shared machine's load hits both alike. ``--mode generate``: whole generations, per round
and per scale the transformer seconds (``Pipeline.generate(timings=True)``). ``--mode scale`` (quicker on slow
CPUs): only the transformer forward of one scale (``--scale``, default the last) over a KV cache filled to that
scale's prefix, with [cond; uncond] rows for dense and the rows the candidate's schedule computes there (the
sampler's own rule: the conditional half once the unconditional rows are dropped). Per scale: the median and
spread of the candidate/dense ratio over rounds. Writes JSON.

    python benchmarks/bench_guidance.py --recipe benchmarks/recipes/guidance/skip_uncond_last_bf16.json \
        --shape var-d16 --batch 2 --threads 2 --rounds 3 --out benchmarks/results/guidance/interleaved_var-d16.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from litevar.eval.bench import machine_info
from litevar.jobs import JobList

from interleaved import call_rounds, generation_rounds, load_pair


def _scale_forward(pipe, labels: list[int], scale: int):
    """A callable running ``pipe``'s transformer on scale ``scale`` alone (the cache refilled to its prefix each
    time; random inputs, the class conditioning of ``labels``), returning its seconds."""
    from litevar.attention.context import AttnContext

    var, cfg = pipe.var, pipe.config.var
    B = len(labels)
    labels_B = torch.tensor(labels)
    cond_BD, mods, head_mod = var.conditioning(torch.cat((labels_B, torch.full_like(labels_B, cfg.num_classes))))
    guidance = pipe.attention.guidance
    rows, cfg_batch = (2 * B, B) if guidance is None or scale < guidance.uncond_until else (B, None)
    mods, head_mod = [m[:rows] for m in mods], head_mod[:rows]
    caches = pipe.attention.make_caches(2 * B, cfg, pipe.dtype, pipe.device)
    prefix = sum(pn * pn for pn in cfg.patch_nums[:scale])
    gen = torch.Generator().manual_seed(0)
    for cache in caches:
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    x_BLC = torch.randn(rows, cfg.patch_nums[scale] ** 2, cfg.width, generator=gen).to(pipe.dtype)

    def run() -> float:
        for cache in caches:
            cache.length = prefix
        ctx = AttnContext(kv_caches=caches, cfg_batch=cfg_batch, scale_index=scale)
        start = time.perf_counter()
        with torch.inference_mode():
            var.forward_scale(x_BLC, mods, head_mod, ctx)
        return time.perf_counter() - start

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True, help="the candidate recipe (its dtype is the dense baseline's too)")
    p.add_argument("--shape", default="var-d16", help="released shape with seeded random weights")
    p.add_argument("--batch", type=int, default=2, help="images per generation")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up round")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--mode", choices=("generate", "scale"), default="generate", help="what is timed (see above)")
    p.add_argument("--scale", type=int, default=-1, help="--mode scale: the scale timed (default -1: the last)")
    p.add_argument("--out", required=True, help="JSON path")
    args = p.parse_args()
    if args.mode == "scale":
        return _main_scale(args)
    recipe, pipes = load_pair(args.recipe, args.shape, args.threads)
    labels, seeds = JobList(range(pipes["dense"].num_classes), samples=args.batch, seed=args.seed).batch(range(args.batch))
    runs = generation_rounds(pipes, labels, seeds, args.rounds)
    scales = len(runs["dense"][0]["per_scale"])
    ratios = [[c["per_scale"][k] / d["per_scale"][k] for d, c in zip(runs["dense"], runs["candidate"])]
              for k in range(scales)]
    report = {"what": "transformer seconds per scale, dense vs candidate, interleaved rounds in one process",
              "recipe": recipe.to_dict(), "shape": args.shape, "batch": args.batch, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "labels": labels, "seeds": seeds, "machine": machine_info("cpu"), "runs": runs,
              "per_scale_ratio_median": [statistics.median(r) for r in ratios],
              "per_scale_ratio_range": [[min(r), max(r)] for r in ratios],
              "transformer_ratio_median": statistics.median(
                  c["transformer"] / d["transformer"] for d, c in zip(runs["dense"], runs["candidate"])),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"last scale candidate/dense: median {report['per_scale_ratio_median'][-1]:.3f}, "
          f"range {report['per_scale_ratio_range'][-1]}; wrote {args.out}")


def _main_scale(args) -> None:
    recipe, pipes = load_pair(args.recipe, args.shape, args.threads)
    scale = args.scale % len(pipes["dense"].config.var.patch_nums)
    labels, _ = JobList(range(pipes["dense"].num_classes), samples=args.batch, seed=args.seed).batch(range(args.batch))
    runners = {name: _scale_forward(pipe, labels, scale) for name, pipe in pipes.items()}
    seconds = call_rounds(runners, args.rounds, f"scale {scale} transformer")
    ratios = [c / d for d, c in zip(seconds["dense"], seconds["candidate"])]
    report = {"what": f"transformer seconds of scale {scale} alone (KV cache filled to its prefix), dense vs "
                      "candidate, interleaved rounds in one process after one warm-up round",
              "recipe": recipe.to_dict(), "shape": args.shape, "batch": args.batch, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "scale": scale, "labels": labels, "machine": machine_info("cpu"),
              "seconds": seconds, "ratios": ratios, "ratio_median": statistics.median(ratios),
              "ratio_range": [min(ratios), max(ratios)], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"scale {scale} candidate/dense: median {report['ratio_median']:.3f}, range {report['ratio_range']}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
