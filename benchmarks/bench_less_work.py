"""Dense vs a candidate recipe that does less work, timed interleaved A B A B in one process.

Any recipe: guidance schedules (unconditional rows dropped), token pruning, draft-refine, their compositions.
Both pipelines (same random weights of a released shape, same labels and per-image seeds) are loaded once and
run alternately, so the shared machine's load hits both alike. ``--mode generate``: whole generations, per round
and per scale the transformer seconds (``Pipeline.generate(timings=True)``). ``--mode scale`` (quicker on slow
CPUs): only the transformer forward of one scale (``--scale``, default the last) over a KV cache filled to that
scale's prefix (for a pruning candidate, per layer the keys its pruning stores), random inputs and, where the
scale is pruned, random previous-scale states to restore from; the rows the recipe's guidance schedule computes
there (the conditional half once the unconditional rows are dropped). Per scale: the median and range of the
candidate/dense ratio over rounds. Writes JSON.

    python benchmarks/bench_less_work.py --recipe benchmarks/recipes/prune/late2_keep0.5_fp32.json \
        --shape var-d16 --mode scale --batch 2 --threads 2 --rounds 3 \
        --out benchmarks/results/prune/scale_var-d16.json
    python benchmarks/bench_less_work.py --recipe benchmarks/recipes/guidance/skip_uncond_last_bf16.json \
        --shape var-d16 --mode scale --batch 2 --out benchmarks/results/guidance/last_scale_var-d16.json
    python benchmarks/bench_less_work.py --recipe benchmarks/recipes/draft_refine/d16_refiner_n8_skip_uncond_last2_fp32.json \
        --shape var-d24 --batch 1 --out benchmarks/results/draft_refine/generate_var-d24.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from litevar.attention.context import AttnContext
from litevar.attention.token_prune import PruneState
from litevar.eval.bench import machine_info
from litevar.jobs import JobList

from interleaved import call_rounds, generation_rounds, load_pair


def _rows(pipe, B: int, scale: int) -> tuple[int, int | None]:
    """Rows the sampler computes at ``scale`` and the CFG half size (None once the unconditional rows drop)."""
    guidance = pipe.attention.guidance
    return (2 * B, B) if guidance is None or scale < guidance.uncond_until else (B, None)


def _scale_forward(pipe, labels: list[int], scale: int):
    """A callable running ``pipe``'s transformer on scale ``scale`` alone, returning its seconds."""
    var, cfg = pipe.var, pipe.config.var
    B = len(labels)
    labels_B = torch.tensor(labels)
    cond_BD, mods, head_mod = var.conditioning(torch.cat((labels_B, torch.full_like(labels_B, cfg.num_classes))))
    rows, cfg_batch = _rows(pipe, B, scale)
    mods, head_mod = [m[:rows] for m in mods], head_mod[:rows]
    caches = pipe.attention.make_caches(2 * B, cfg, pipe.dtype, pipe.device)
    plan = pipe.attention.tokens
    prefixes = [sum(pn * pn if plan is None else plan.cached_tokens(layer, s)
                    for s, pn in enumerate(cfg.patch_nums[:scale])) for layer in range(cfg.depth)]
    gen = torch.Generator().manual_seed(0)
    for cache in caches:
        cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
        cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    x_BLC = torch.randn(rows, cfg.patch_nums[scale] ** 2, cfg.width, generator=gen).to(pipe.dtype)
    previous = None
    if plan is not None and scale in plan.kept:
        shape = (rows, cfg.patch_nums[scale - 1] ** 2, cfg.width)
        previous = (torch.randn(shape, generator=gen).to(pipe.dtype), torch.randn(shape, generator=gen).to(pipe.dtype))

    def run() -> float:
        for cache, prefix in zip(caches, prefixes):
            cache.length = prefix
        ctx = AttnContext(kv_caches=caches, cfg_batch=cfg_batch, scale_index=scale)
        state = PruneState() if previous is None else PruneState(*previous)
        start = time.perf_counter()
        with torch.inference_mode():
            if plan is None:
                var.forward_scale(x_BLC, mods, head_mod, ctx)
            else:
                plan.forward_scale(var, x_BLC, mods, head_mod, ctx, state)
        return time.perf_counter() - start

    return run


def _header(args, recipe, pipes) -> dict:
    tokens = pipes["candidate"].attention.tokens
    return {"recipe": recipe.to_dict(), "token_prune": None if tokens is None else tokens.describe(),
            "shape": args.shape, "batch": args.batch, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "machine": machine_info("cpu")}


def _write(report: dict, out: str) -> None:
    report["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))


def main_generate(args) -> None:
    recipe, pipes = load_pair(args.recipe, args.shape, args.threads)
    jobs = JobList(range(pipes["dense"].num_classes), samples=args.batch, seed=args.seed)
    labels, seeds = jobs.batch(range(args.batch))
    runs = generation_rounds(pipes, labels, seeds, args.rounds)
    scales = len(runs["dense"][0]["per_scale"])
    ratios = [[c["per_scale"][k] / d["per_scale"][k] for d, c in zip(runs["dense"], runs["candidate"])]
              for k in range(scales)]
    transformer = [c["transformer"] / d["transformer"] for d, c in zip(runs["dense"], runs["candidate"])]
    report = {"what": "transformer seconds per scale, dense vs candidate, interleaved rounds in one process after "
                      "one warm-up round", **_header(args, recipe, pipes), "labels": labels, "seeds": seeds,
              "runs": runs, "per_scale_ratio_median": [statistics.median(r) for r in ratios],
              "per_scale_ratio_range": [[min(r), max(r)] for r in ratios],
              "transformer_ratio_median": statistics.median(transformer),
              "transformer_ratio_range": [min(transformer), max(transformer)]}
    _write(report, args.out)
    print(f"transformer candidate/dense: median {report['transformer_ratio_median']:.3f}, last scale "
          f"{report['per_scale_ratio_median'][-1]:.3f}; wrote {args.out}")


def main_scale(args) -> None:
    recipe, pipes = load_pair(args.recipe, args.shape, args.threads)
    scale = args.scale % len(pipes["dense"].config.var.patch_nums)
    refiner = pipes["candidate"].attention.refiner
    if refiner is not None and scale >= refiner.from_scale:
        raise SystemExit(f"--mode scale times the drafter's transformer, but the refiner generates scale {scale}: "
                         "use --mode generate for draft-refine")
    labels, _ = JobList(range(pipes["dense"].num_classes), samples=args.batch, seed=args.seed).batch(range(args.batch))
    runners = {name: _scale_forward(pipe, labels, scale) for name, pipe in pipes.items()}
    seconds = call_rounds(runners, args.rounds, f"scale {scale} transformer")
    ratios = [c / d for d, c in zip(seconds["dense"], seconds["candidate"])]
    report = {"what": f"transformer seconds of scale {scale} alone (KV cache filled to its prefix), dense vs "
                      "candidate, interleaved rounds in one process after one warm-up round",
              **_header(args, recipe, pipes), "scale": scale, "labels": labels, "seconds": seconds,
              "median_seconds": {name: statistics.median(s) for name, s in seconds.items()},
              "ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
    _write(report, args.out)
    print(f"scale {scale} candidate/dense: median {report['ratio_median']:.3f}, range {report['ratio_range']}; "
          f"wrote {args.out}")


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
    (main_scale if args.mode == "scale" else main_generate)(args)


if __name__ == "__main__":
    main()
