"""Dense vs candidate timed alternately in one process (the loops of bench_less_work.py).

Round 0 of every loop warms up and is not kept; then each round runs dense, then the candidate, so the shared
machine's load hits both alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from litevar import build_pipeline, load_recipe


def load_pair(recipe_path: str, shape: str, threads: int) -> tuple[object, dict]:
    """(recipe, {"dense": pipeline in the recipe's dtype, "candidate": the recipe's pipeline}) on random weights."""
    torch.set_num_threads(threads)
    recipe = load_recipe(recipe_path)
    return recipe, {"dense": build_pipeline(recipe.dtype, random_shape=shape),
                    "candidate": build_pipeline(recipe, random_shape=shape)}


def generation_rounds(pipes: dict, labels, seeds, rounds: int) -> dict[str, list[dict]]:
    """Per variant and kept round: whole-call seconds and the stage timings of one generation."""
    runs: dict[str, list] = {name: [] for name in pipes}
    for r in range(rounds + 1):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            out = pipe.generate(labels, seed=seeds, progress=False, timings=True)
            entry = {"seconds": time.perf_counter() - start, **{k: out.timings[k] for k in ("transformer", "sampling",
                                                                                          "decoder", "per_scale")}}
            if r:
                runs[name].append(entry)
            print(f"round {r} {name}: {entry['seconds']:.2f} s, last scale {entry['per_scale'][-1]:.3f} s", flush=True)
    return runs


def call_rounds(runners: dict[str, Callable[[], float]], rounds: int, what: str) -> dict[str, list[float]]:
    """Per variant, the seconds each kept round's call returned."""
    seconds: dict[str, list] = {name: [] for name in runners}
    for r in range(rounds + 1):
        for name, run in runners.items():
            spent = run()
            if r:
                seconds[name].append(spent)
            print(f"round {r} {name}: {what} {spent:.3f} s", flush=True)
    return seconds
