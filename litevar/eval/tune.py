"""``litevar tune``: the fastest composition of recipe steps within a quality budget.

1. **Candidates**: every combination of the search space's slots (one alternative per slot, ``null`` = off),
   steps in slot order. A combination the recipe layer refuses stays in the report with its error.
2. **Proxies**, on every candidate: token agreement and KL against the dense model on a few images
   (``proxy_per_class``), and speed against dense: FLOPs per image (``speed="flops"``, deterministic) or measured
   throughput (``speed="time"``: ``litevar bench``, each variant in its own process) on the speed model.
3. **Finalists**: the candidates whose proxy agreement is at least ``min_agreement`` get the full evaluation
   (``per_class`` images; with ``data``: FD-EffLite0 and class-consistency against the dense model's own, on the
   same labels and seeds), fastest first, until one is within the budget or ``finalists`` have been evaluated.
4. **Chosen**: that first candidate within the budget (``max_fd_increase`` relative, ``max_cc_drop`` points;
   without data the agreement bound alone), else dense.
5. **Noise** (``noise_check``, with data): dense on a second, disjoint seed set of the same size, against dense on
   the first: how far FD-EffLite0 and class-consistency move with the seeds alone, so a budget below that is
   flagged (``noise.budget_within_noise``) rather than trusted.

Each candidate's measurements are written to ``out/candidates/<fingerprint>.json`` as each stage finishes, so a
rerun with the same settings resumes (the noise check in ``out/noise.json``). ``out/tune.json`` holds everything
with the Pareto front (speed-up vs proxy agreement), ``out/pareto.png`` plots it, ``out/chosen_recipe.json`` is
the chosen recipe.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..recipe import Recipe, RecipeError, build_pipeline

SPACE_VERSION = 1
SPEEDS = ("flops", "time")


@dataclass(frozen=True)
class TuneSettings:
    """What ``tune`` measures and the budget (see the module docstring).

    Args:
        var_ckpt, vae_ckpt, config: the quality model (None: the shipped default model).
        shape: a released shape (random weights) to measure speed on; None: the quality model.
        speed: "flops" or "time". batch, repeats: for ``speed="time"``.
        proxy_per_class, per_class, classes, data: images of the proxy and final evaluations, and the dataset.
        finalists, min_agreement, max_fd_increase, max_cc_drop: the selection and the budget.
        noise_check: also measure dense on a second seed set (needs ``data``).
    """

    var_ckpt: str | None = None
    vae_ckpt: str | None = None
    config: str | None = None
    shape: str | None = None
    speed: str = "flops"
    batch: int = 8
    repeats: int = 3
    proxy_per_class: int = 2
    per_class: int = 50
    classes: tuple | None = None
    data: str | None = None
    finalists: int = 3
    min_agreement: float = 0.0
    max_fd_increase: float = 0.02
    max_cc_drop: float = 1.0
    noise_check: bool = False

    def __post_init__(self) -> None:
        if self.speed not in SPEEDS:
            raise ValueError(f"speed must be one of {SPEEDS}, got {self.speed!r}")
        for name in ("batch", "repeats", "proxy_per_class", "per_class", "finalists"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.max_fd_increase < 0 or self.max_cc_drop < 0:
            raise ValueError("max_fd_increase and max_cc_drop must be >= 0")
        if self.classes is not None and min(self.proxy_per_class, self.per_class) * len(self.classes) < 2:
            raise ValueError("the proxy and final evaluations need at least 2 images each (their Frechet distance)")
        if self.noise_check and self.data is None:
            raise ValueError("noise_check compares quality against data: it needs data")


class Refused(Exception):
    """The recipe layer refused a candidate (the message names the conflict)."""


def _built(recipe: Recipe, **where):
    try:
        return build_pipeline(recipe, **where)
    except (RecipeError, ValueError) as err:  # step handlers refuse bad compositions with ValueError
        raise Refused(str(err)) from None


def load_space(source: str | Path | dict) -> tuple[str, list[list]]:
    """(dtype, slots) of a search space: ``{"litevar_tune_space": 1, "dtype": "fp32", "slots": [[null, step, ...],
    ...]}``, each step a recipe step object."""
    raw = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if not isinstance(raw, dict) or raw.get("litevar_tune_space") != SPACE_VERSION:
        raise ValueError(f"a search space is a JSON object with \"litevar_tune_space\": {SPACE_VERSION}")
    unknown = sorted(set(raw) - {"litevar_tune_space", "dtype", "slots"})
    if unknown:
        raise ValueError(f"unknown search-space keys {unknown}; allowed: dtype, slots")
    slots = raw.get("slots")
    if not isinstance(slots, list) or not slots or not all(isinstance(s, list) and s for s in slots):
        raise ValueError("slots must be a non-empty list of non-empty lists of alternatives (null = off)")
    for i, slot in enumerate(slots):
        for alt in slot:
            if alt is not None and not (isinstance(alt, dict) and "type" in alt):
                raise ValueError(f"slot {i}: an alternative is null or a recipe step object, got {alt!r}")
    return raw.get("dtype", "fp32"), slots


def candidates(dtype: str, slots: list[list]) -> list[dict]:
    """One entry per combination: ``{"name", "recipe"}``, or ``{"name", "refused"}`` where the recipe is refused."""
    out = []
    for combo in itertools.product(*slots):
        steps = [step for step in combo if step is not None]
        name = "+".join([dtype] + [step["type"] + _short_args(step) for step in steps])
        try:
            out.append({"name": name, "recipe": Recipe(dtype=dtype, steps=steps, name=name)})
        except RecipeError as err:
            out.append({"name": name, "refused": str(err)})
    return out


def _short_args(step: dict) -> str:
    args = ",".join(f"{k}={v}" for k, v in step.items() if k != "type")
    return f"({args})" if args else ""


def _model(settings: TuneSettings) -> dict:
    return {"var_ckpt": settings.var_ckpt, "vae_ckpt": settings.vae_ckpt, "config": settings.config}


def _evaluate(recipe: Recipe, settings: TuneSettings, per_class: int, data: str | None, cache: Path,
              seed: int = 0) -> dict:
    from .evaluate import EvalSettings, evaluate

    _built(recipe, **_model(settings))  # refused compositions stop here, before any measurement
    report = evaluate(recipe, EvalSettings(per_class=per_class, classes=settings.classes, seed=seed, data=data,
                                           cache_dir=cache), progress=False, **_model(settings))
    return {"fidelity": {k: report["fidelity"][k] for k in ("token_agreement", "kl_mean", "psnr_db")},
            "quality": report.get("quality"), "reference_quality": report["reference"].get("quality"),
            "images": report["images"]}


def _speed(recipe: Recipe, settings: TuneSettings) -> dict:
    """Dense over candidate (> 1: the candidate does less work / is faster)."""
    if settings.speed == "flops":
        from .generation_flops import count_generation_flops

        def total(r):
            where = {"random_shape": settings.shape} if settings.shape else _model(settings)
            pipe = _built(r, **where)
            return count_generation_flops(pipe, [0], [0])["total"]
        dense, cand = total(Recipe(dtype=recipe.dtype)), total(recipe)
        return {"speedup": dense / cand, "dense_flops": dense, "flops": cand}
    from .bench import run_bench

    where = {"shape": settings.shape} if settings.shape else _model(settings)
    _built(recipe, **({"random_shape": settings.shape} if settings.shape else _model(settings)))
    report = run_bench(recipe, baseline=recipe.dtype, batch=settings.batch, repeats=settings.repeats, **where)
    return {"speedup": report["ratios"]["throughput_time"], "latency_ratio": report["ratios"]["latency"],
            "images_per_s": report["candidate"]["images_per_s"], "dense_images_per_s": report["dense"]["images_per_s"]}


def _stage(entry: dict, key: str, path: Path, measure) -> None:
    """Run one stage of one candidate unless its saved result exists; a refusal is recorded, not raised."""
    if key in entry or "refused" in entry:
        return
    try:
        entry[key] = measure()
    except Refused as err:
        entry["refused"] = f"{key}: {err}"
    saved = {k: v for k, v in entry.items() if k != "recipe"}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(saved, indent=1)))


def _within_budget(entry: dict, settings: TuneSettings) -> bool:
    final = entry.get("final")
    if final is None or final["fidelity"]["token_agreement"] < settings.min_agreement:
        return False
    if final["quality"] is None:
        return True
    mine, dense = final["quality"], final["reference_quality"]
    fd_increase = (mine["fd_effl0"] - dense["fd_effl0"]) / dense["fd_effl0"]
    cc_drop = 100 * (dense.get("class_consistency", 0) - mine.get("class_consistency", 0))
    entry["fd_increase"], entry["cc_drop_points"] = fd_increase, cc_drop
    return fd_increase <= settings.max_fd_increase and cc_drop <= settings.max_cc_drop


def _seed_noise(dtype: str, settings: TuneSettings, finals: list[dict], out: Path) -> dict:
    """The dense reference on seeds ``n .. 2n - 1`` against itself on ``0 .. n - 1`` (n images per evaluation, as
    the finalists had), saved for resume."""
    path = out / "noise.json"
    if path.exists():
        noise = json.loads(path.read_text())
    else:
        dense, cache = Recipe(dtype=dtype), out / "eval_cache"
        first = finals[0]["final"] if finals else _evaluate(dense, settings, settings.per_class, settings.data, cache)
        second = _evaluate(dense, settings, settings.per_class, settings.data, cache, seed=first["images"])
        q1, q2 = first["reference_quality"], second["reference_quality"]
        noise = {"seeds": [0, first["images"]], "images": first["images"], "first": q1, "second": q2,
                 "fd_change": (q2["fd_effl0"] - q1["fd_effl0"]) / q1["fd_effl0"],
                 "cc_change_points": 100 * (q2.get("class_consistency", 0) - q1.get("class_consistency", 0))}
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(noise, indent=1)))
    # the budget may differ on a rerun: judged against the saved measurement each time
    return {**noise, "budget_within_noise": settings.max_fd_increase <= abs(noise["fd_change"])
            or settings.max_cc_drop <= abs(noise["cc_change_points"])}


def pareto_front(entries: list[dict]) -> list[str]:
    """Names of the measured candidates no other beats on both speed-up and proxy agreement."""
    points = [(e["name"], e["speed"]["speedup"], e["proxy"]["fidelity"]["token_agreement"]) for e in entries
              if "speed" in e and "proxy" in e and "refused" not in e]
    return [n for n, s, a in points
            if not any((s2 >= s and a2 >= a) and (s2 > s or a2 > a) for _, s2, a2 in points)]


def tune(space: str | Path | dict, settings: TuneSettings, out: str | Path) -> dict:
    """Search the space (see the module docstring); writes ``out/tune.json``, ``pareto.png``, ``chosen_recipe.json``
    and returns the report."""
    out = Path(out)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    dtype, slots = load_space(space)
    entries = candidates(dtype, slots)
    cache = out / "eval_cache"
    for entry in entries:
        path = out / "candidates" / f"{_entry_id(entry)}.json"
        if path.exists():
            entry.update({k: v for k, v in json.loads(path.read_text()).items() if k != "name"})
        recipe = entry.get("recipe")
        _stage(entry, "proxy", path, lambda: _evaluate(recipe, settings, settings.proxy_per_class, None, cache))
        _stage(entry, "speed", path, lambda: _speed(recipe, settings))
    ranked = sorted((e for e in entries if "refused" not in e
                     and e["proxy"]["fidelity"]["token_agreement"] >= settings.min_agreement),
                    key=lambda e: -e["speed"]["speedup"])
    finalists, chosen = [], Recipe(dtype=dtype)
    for entry in ranked:  # fastest first: the first within the budget is the answer
        if len(finalists) == settings.finalists:
            break
        path = out / "candidates" / f"{_entry_id(entry)}.json"
        _stage(entry, "final", path, lambda e=entry: _evaluate(e["recipe"], settings, settings.per_class,
                                                              settings.data, cache))
        if "refused" in entry:
            continue
        finalists.append(entry["name"])
        if _within_budget(entry, settings):
            chosen = entry["recipe"]
            break
    noise = (_seed_noise(dtype, settings, [e for e in entries if e["name"] in finalists], out)
             if settings.noise_check else None)
    report = {"litevar_tune": 1, "settings": asdict(settings), "space": {"dtype": dtype, "slots": slots},
              "candidates": [{**{k: v for k, v in e.items() if k != "recipe"},
                              **({"recipe": e["recipe"].to_dict()} if "recipe" in e else {})} for e in entries],
              "finalists": finalists,
              "pareto": pareto_front(entries), "chosen": chosen.to_dict(), "noise": noise,
              "budget": "token agreement only (no data)" if settings.data is None else
                        f"FD-EffLite0 +{100 * settings.max_fd_increase:g}%, class-consistency -{settings.max_cc_drop:g}"}
    chosen.save(out / "chosen_recipe.json")
    write_atomic(out / "tune.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    plot_front(report, out / "pareto.png")
    return report


def _entry_id(entry: dict) -> str:
    if "recipe" in entry:
        return entry["recipe"].fingerprint()
    return "refused-" + hashlib.sha256(entry["name"].encode()).hexdigest()[:12]


def plot_front(report: dict, path: Path) -> None:
    """Speed-up vs proxy token agreement of every measured candidate, the Pareto front joined, the choice marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measured = [c for c in report["candidates"] if "speed" in c and "proxy" in c and "refused" not in c]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter([c["speed"]["speedup"] for c in measured], [c["proxy"]["fidelity"]["token_agreement"] for c in measured],
               color="tab:gray", label="candidates")
    front = sorted((c for c in measured if c["name"] in report["pareto"]), key=lambda c: c["speed"]["speedup"])
    ax.plot([c["speed"]["speedup"] for c in front], [c["proxy"]["fidelity"]["token_agreement"] for c in front],
            "o-", color="tab:blue", label="Pareto front")
    for c in measured:
        if c["name"] == report["chosen"]["name"]:
            ax.scatter([c["speed"]["speedup"]], [c["proxy"]["fidelity"]["token_agreement"]], s=160, marker="*",
                       color="tab:red", label="chosen", zorder=3)
    ax.set_xlabel(f"speed-up over dense ({report['settings']['speed']})")
    ax.set_ylabel("token agreement with dense (proxy)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
