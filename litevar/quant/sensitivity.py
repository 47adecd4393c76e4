"""``litevar sensitivity``: LiteVAR's layer-type sensitivity study on any model, and the mixed-precision plan it
implies.

LiteVAR quantized VAR-d30 at W8A8 and then, one layer type at a time, dropped that type's activations to 4 bits;
only ``ffn.fc2`` hurt. Here the study runs on any model and any quantization method: a *base* run quantizes
every base layer at the base bits (W8A8 by default), and one run per studied type puts that type at the *low* bits
(W8A4 by default) with the rest as in the base run. Every run is compared with the dense fp32 model on the same
labels and per-image seeds: token agreement over all scales, PSNR and SSIM of the images, and class-consistency
where a classifier exists for the model's data.

Plan rule: the *drop* of a type is the base run's token agreement minus that type's. A type is sensitive when its
drop is positive and above the threshold: ``tolerance`` when given (an absolute drop in token agreement, e.g.
0.05), else twice the median drop over the studied types. The plan (a recipe) quantizes every base layer at the
base bits and keeps the sensitive types in 16 bit (``litevar-mp`` for RTN, else the study's method with ``keep``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cli_args import UsageError, add_model_args, add_sampling_args, check_run, check_writable, positive
from ..images import to_uint8
from ..jobs import JobList
from ..models.default import is_shipped
from ..files import FileFormatError, json_safe, read_npz, reading, write_atomic
from ..recipe import Recipe, apply_recipe, build_pipeline, load_recipe
from ..registry import STEPS
from .layers import LAYER_TYPES, VAR_LAYER_TYPES, linear_layers
from .sensitivity_report import bits_label, plot_sensitivity, sensitivity_markdown
from .transform import QuantConfig

SENSITIVITY_VERSION = 1
REFERENCE_FILE = "reference.npz"
RUNS_DIR = "runs"
BASE = "base"
DATA_CHOICES = ("auto", "fashion-mnist", "none")
PLAN_RULE = ("a layer type is sensitive when its drop in token agreement below the base run is positive and above "
             "the threshold (the tolerance, else twice the median drop over the studied types); the plan keeps the "
             "sensitive types in 16 bit and quantizes every other base layer at the base bits")


def quant_methods() -> list[str]:
    """Recipe step types that are quantization methods (``rtn``, ``litevar-mp``, ``smoothquant``, ...)."""
    importlib.import_module("litevar.quant.methods")  # registers them (it imports the recipe module)
    return [name for name, step in STEPS.items() if issubclass(step.config_cls, QuantConfig)]


def parse_bits(values: list[str], option: str) -> tuple[int, int | None]:
    """``["8", "4"]`` -> ``(8, 4)``; the activation bits may be ``none`` (weight-only). ``option`` is the flag."""
    if len(values) != 2:
        raise UsageError(f"{option} takes two values W A, e.g. {option} 8 4; got {values}")
    try:
        w_bits = int(values[0])
        a_bits = None if str(values[1]).lower() == "none" else int(values[1])
    except ValueError:
        raise UsageError(f"{option} takes integer bits W A (A may be none), got {' '.join(map(str, values))}") from None
    return check_bits((w_bits, a_bits), option.removeprefix("--").replace("-", "_"))


def check_bits(bits, name: str) -> tuple[int, int | None]:
    """Weight bits in 2..8 and activation bits in 2..8 or None, else a ValueError naming the argument ``name``."""
    if not isinstance(bits, (list, tuple)) or len(bits) != 2:
        raise ValueError(f"`{name}` must be (w_bits, a_bits), got {bits!r}")
    for value, what in zip(bits, ("weight", "activation")):
        if value is None and what == "activation":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            raise ValueError(f"`{name}`: {what} bits must be an integer from 2 to 8, got {value!r}")
    return int(bits[0]), None if bits[1] is None else int(bits[1])


def parse_types(text: str | None) -> tuple[str, ...]:
    """``"fc2,mat_qkv"`` -> the types in model order; None -> None (every layer type the model has)."""
    if text is None:
        return None
    types = [t.strip() for t in text.split(",") if t.strip()]
    return check_types(types)


def check_types(types) -> tuple[str, ...]:
    types = list(types)
    unknown = [t for t in types if t not in LAYER_TYPES]
    if unknown or not types:
        raise ValueError(f"`types`: unknown layer types {unknown or '(none given)'}; "
                         f"choose from {','.join(LAYER_TYPES)}")
    return tuple(t for t in LAYER_TYPES if t in types)


def run_recipe(method: str, base, layers, calib_samples: int, kind: str | None = None, low=None) -> Recipe:
    """The recipe of one run: ``layers`` at ``base`` bits, and ``kind`` at ``low`` bits when given (nothing kept)."""
    step = {"type": method, "w_bits": base[0], "a_bits": base[1], "layers": list(layers), "keep": [],
            "calib_samples": calib_samples}
    name = f"{method} {bits_label(base)}"
    if kind is not None:
        step["overrides"] = {kind: [low[0], low[1]]}
        name = f"{method} {kind} {bits_label(low)}, rest {bits_label(base)}"
    return load_recipe({"name": name, "dtype": "fp32", "steps": [step]})


def plan_recipe(method: str, base, layers, keep, calib_samples: int) -> dict:
    """The mixed-precision plan as a recipe dict: ``layers`` at ``base`` bits except ``keep``, left in 16 bit."""
    plan_method = "litevar-mp" if method in ("rtn", "litevar-mp") else method
    kept = f", {'+'.join(keep)} in 16 bit" if keep else ""
    step = {"type": plan_method, "w_bits": base[0], "a_bits": base[1], "layers": list(layers), "keep": list(keep),
            "calib_samples": calib_samples}
    recipe = load_recipe({"name": f"{plan_method} {bits_label(base)}{kept}", "dtype": "fp32", "steps": [step]})
    return _as_json(recipe.to_dict())


def sensitive_types(drops: dict[str, float], tolerance: float | None) -> tuple[list[str], float]:
    """The types whose drop is positive and above the threshold (``tolerance``, else twice the median drop)."""
    threshold = tolerance if tolerance is not None else 2 * statistics.median(drops.values())
    return [t for t, drop in drops.items() if drop > max(threshold, 0.0)], threshold


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _generate(pipe, labels: np.ndarray, seeds: np.ndarray, sampling: dict, batch_size: int):
    """uint8 NHWC images, int32 tokens per scale and the seconds it took."""
    images, tokens = [], []
    start_time = time.perf_counter()
    for start in range(0, len(labels), batch_size):
        out = pipe.generate(labels[start:start + batch_size].tolist(), seed=seeds[start:start + batch_size].tolist(),
                            progress=False, **sampling)
        images.append(to_uint8(out.images))
        tokens.append([t.cpu().numpy().astype(np.int32) for t in out.tokens])
    seconds = time.perf_counter() - start_time
    return np.concatenate(images), [np.concatenate(scale) for scale in zip(*tokens)], seconds


def _tokens_sha(tokens: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for scale in tokens:
        digest.update(np.ascontiguousarray(scale).tobytes())
    return digest.hexdigest()[:16]


def _measure(reference: dict, images: np.ndarray, tokens: list[np.ndarray], labels: np.ndarray, classifier) -> dict:
    from ..eval.classifier import class_consistency
    from ..eval.fidelity import FidelityAccumulator, image_fidelity

    acc = FidelityAccumulator([t.shape[1] for t in reference["tokens"]])
    acc.add_tokens([torch.from_numpy(t) for t in reference["tokens"]], [torch.from_numpy(t) for t in tokens])
    agreement = acc.result()
    row = {"token_agreement": agreement["token_agreement"],
           "token_agreement_per_scale": agreement["token_agreement_per_scale"],
           **image_fidelity(reference["images"], images), "tokens_sha256": _tokens_sha(tokens)}
    row["class_consistency"] = None if classifier is None else class_consistency(classifier, images, labels)
    return row


def _classifier(data: str, default_model: bool, num_classes: int):
    """(classifier or None, the resolved data name or None, why there is no classifier or None)."""
    from ..eval.evaluate import classifier_for

    name = ("fashion-mnist" if default_model else None) if data == "auto" else None if data == "none" else data
    if name is None:
        why = "data is none" if data == "none" else "no classifier for this model's data (auto: only the shipped model)"
        return None, None, f"class-consistency not measured: {why}; use data fashion-mnist for a Fashion-MNIST model"
    classifier = classifier_for(name, num_classes)
    if classifier is None:
        return None, name, f"class-consistency not measured: the {name} classifier has 10 classes, the model {num_classes}"
    return classifier, name, None


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def _as_json(payload: dict) -> dict:
    """The payload as JSON reads it back (lists for tuples), PSNR kept a float: fresh and resumed rows compare equal."""
    plain = json.loads(json.dumps(json_safe(payload), allow_nan=False))
    if "psnr_db" in plain:
        plain["psnr_db"] = _number(plain["psnr_db"])
    return plain


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False)))


def _read_row(path: Path, digest: str) -> dict | None:
    """A finished run of these settings, or None (absent, unreadable or from other settings)."""
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if row.get("settings_sha256") != digest:
        return None
    return _as_json(row)


def _reference(dense, labels, seeds, sampling, batch_size, out: Path | None, digest: str, overwrite: bool) -> dict:
    """The dense fp32 model's images and tokens, from OUT/reference.npz when these settings made it."""
    path = out / REFERENCE_FILE if out is not None else None
    if path is not None and path.exists() and not overwrite:
        advice = "delete it (or pass `overwrite`) to generate the reference again"
        cached = read_npz(path, "reference cache", advice, ("settings_sha256",))
        with reading(path, FileFormatError, "reference cache", advice):
            if str(cached["settings_sha256"]) == digest:
                n_scales = len(dense.config.var.patch_nums)
                images, tokens = cached["images"], [cached[f"tokens_{si}"] for si in range(n_scales)]
                if images.ndim != 4 or len(images) != len(labels) or any(len(t) != len(labels) for t in tokens):
                    raise ValueError("its arrays do not hold one image and token map per job")
                return {"images": images, "tokens": tokens, "seconds": float(cached["seconds"])}
    images, tokens, seconds = _generate(dense, labels, seeds, sampling, batch_size)
    if path is not None:
        arrays = {f"tokens_{si}": t for si, t in enumerate(tokens)}
        write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), images=images, seconds=seconds, labels=labels,
                                                seeds=seeds, settings_sha256=digest, **arrays))
    return {"images": images, "tokens": tokens, "seconds": seconds}


def _run(dense, recipe: Recipe, reference: dict, labels, seeds, sampling, batch_size, classifier) -> dict:
    pipe = copy.deepcopy(dense)
    start = time.perf_counter()
    apply_recipe(pipe, recipe)
    quantize_seconds = time.perf_counter() - start
    images, tokens, seconds = _generate(pipe, labels, seeds, sampling, batch_size)
    del pipe
    return {"recipe": recipe.to_dict(), **_measure(reference, images, tokens, labels, classifier),
            "quantize_seconds": quantize_seconds, "generate_seconds": seconds}


def _drop(base: float, value: float) -> float:
    if base == value:
        return 0.0
    return base - value


@dataclass(frozen=True)
class SensitivitySettings:
    """What the sensitivity study runs (see the module docstring for the plan rule).

    Args:
        method: a quantization recipe step type (``rtn``, ``smoothquant``, ``stwq``, ...); its ``keep`` is emptied
            so every type can be studied.
        base, low: (w_bits, a_bits): every base layer at ``base``; the studied type at ``low`` (a_bits None:
            weight-only). The base layers are the method's default ``layers`` plus the studied types.
        types: layer types to study, each its own run (None: every type the model has, M-VAR's in_proj, out_proj too).
        per_class, samples: images per class (class-major), or (``samples``, which wins) that many images with the
            classes in turn: the job list of :class:`~litevar.jobs.JobList`.
        seed: image i uses seed ``seed + i`` (calibration keeps the method's own seeds).
        calib_samples: calibration generations for calibrated methods.
        cfg, top_k, top_p: sampling (None: the model card's).
        data: "auto" (Fashion-MNIST for the shipped model), "fashion-mnist" or "none": class-consistency.
        batch_size: images per batch (the same in every run).
        device: where every run happens.
        tolerance: the drop in token agreement above which a type is sensitive (None: twice the median drop).

    Example:
        >>> SensitivitySettings(types=("fc1", "fc2"), per_class=2).low
        (8, 4)
    """

    method: str = "rtn"
    base: Sequence[int | None] = (8, 8)
    low: Sequence[int | None] = (8, 4)
    types: Sequence[str] | None = None
    per_class: int | None = 5
    samples: int | None = None
    seed: int = 0
    calib_samples: int = 16
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    data: str = "auto"
    batch_size: int = 50
    device: str = "cpu"
    tolerance: float | None = None

    def __post_init__(self) -> None:
        known = quant_methods()
        if self.method not in known:
            raise ValueError(f"`method`: {self.method!r} is not a quantization recipe step; choose from "
                             f"{', '.join(known)}")
        object.__setattr__(self, "base", check_bits(self.base, "base"))
        object.__setattr__(self, "low", check_bits(self.low, "low"))
        if self.types is not None:
            object.__setattr__(self, "types", check_types(self.types))
        if self.samples is not None:
            object.__setattr__(self, "per_class", None)
        JobList([0], self.per_class, self.samples, self.seed)  # the job list's own checks
        for name in ("calib_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.data not in DATA_CHOICES:
            raise ValueError(f"`data` must be one of {', '.join(DATA_CHOICES)}, got {self.data!r}")
        tolerance = self.tolerance
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                      or not math.isfinite(tolerance) or tolerance < 0):
            raise ValueError(f"`tolerance` must be a drop in token agreement >= 0 (e.g. 0.05), got {tolerance!r}")

    def jobs(self, num_classes: int) -> JobList:
        """The study's job list on a model with ``num_classes`` classes."""
        return JobList(range(num_classes), self.per_class, self.samples, self.seed)


def layer_sensitivity(settings: SensitivitySettings | None = None, var_ckpt: str | Path | None = None,
                      vae_ckpt: str | Path | None = None, config: Any = None, shape: str | None = None, *,
                      out: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """LiteVAR's layer-type sensitivity study: a base run, then one run per layer type at the low bits (see the
    module docstring for the plan rule). With ``out``, each run is saved as it finishes (OUT/runs/<name>.json) and
    a rerun with the same settings skips it; different settings in the same folder are refused.

    Args:
        settings: method, bits, types, job list, sampling, data and tolerance (see :class:`SensitivitySettings`;
            None: its defaults).
        var_ckpt, vae_ckpt, config: the model (all None: the shipped default model); or ``shape`` for seeded
            random weights of a released shape.
        out: folder for the run files, sensitivity.json/.md/.png and plan.json (None: nothing written).
        overwrite: redo every run even when the folder holds finished ones (and accept other settings).
        progress: a progress bar over the runs.

    Returns:
        The report dict: settings, the dense reference, one row per run, the plan (threshold, sensitive types and
        the recipe dict). Bad arguments raise ValueError naming the argument.

    Example:
        >>> report = layer_sensitivity(SensitivitySettings(types=("fc1", "fc2"), per_class=2),
        ...                            out="runs/sensitivity")  # doctest: +SKIP
        >>> report["plan"]["sensitive"]  # doctest: +SKIP
        ['fc2']
    """
    settings = settings or SensitivitySettings()
    if shape is not None and (var_ckpt is not None or vae_ckpt is not None):
        raise ValueError("give either `shape` (random weights of a released shape) or `var_ckpt`/`vae_ckpt`, not both")
    out = Path(out) if out is not None else None
    if out is not None:
        check_writable(out)
    dense = build_pipeline(None, var_ckpt, vae_ckpt, config, shape, settings.device)
    if settings.types is None:
        settings = replace(settings, types=tuple(t for t in LAYER_TYPES if linear_layers(dense.var, (t,))))
    missing = [t for t in settings.types if not linear_layers(dense.var, (t,))]
    if missing:
        raise ValueError(f"`types`: this model has no {', '.join(missing)} layers")
    record = _record(settings, var_ckpt, vae_ckpt, config, shape)
    method, types, base, low = settings.method, settings.types, settings.base, settings.low
    calib_samples, batch_size = settings.calib_samples, settings.batch_size
    sampling = dense.resolve_sampling(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p, more_smooth=False)
    jobs = settings.jobs(dense.num_classes)
    labels, seeds = jobs.labels, jobs.seeds
    default_model = is_shipped(var_ckpt) and vae_ckpt is None and shape is None
    classifier, record["data"], cc_note = _classifier(settings.data, default_model, dense.num_classes)
    record.update(sampling=sampling, images=len(labels))
    run_settings = {k: v for k, v in record.items() if k != "tolerance"}
    digest = _digest(run_settings)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        check_run(out, run_settings, overwrite, pattern=f"{RUNS_DIR}/*.json")
        (out / RUNS_DIR).mkdir(exist_ok=True)
    reference = _reference(dense, labels, seeds, sampling, batch_size, out, digest, overwrite)
    layers = record["base_layers"]
    runs = [(BASE, run_recipe(method, base, layers, calib_samples))]
    runs += [(t, run_recipe(method, base, layers, calib_samples, t, low)) for t in types]
    rows = []
    for name, recipe in tqdm(runs, desc="sensitivity runs", unit="run", disable=not progress):
        path = out / RUNS_DIR / f"{name}.json" if out is not None else None
        row = None if path is None or overwrite else _read_row(path, digest)
        if row is None:
            row = _as_json({"name": name, "type": None if name == BASE else name,
                            "bits": bits_label(base if name == BASE else low),
                            **_run(dense, recipe, reference, labels, seeds, sampling, batch_size, classifier),
                            "settings_sha256": digest})
            if path is not None:
                _write_json(path, row)
        rows.append(row)
    report = _report(record, reference, rows, classifier, labels, cc_note)
    if out is not None:
        write_outputs(report, out)
    return report


def _record(settings: SensitivitySettings, var_ckpt, vae_ckpt, config, shape) -> dict:
    """The study's settings as JSON-ready values (what run.json and the report hold)."""
    default_layers = STEPS[settings.method].config_cls().layers
    base_layers = [t for t in LAYER_TYPES if t in default_layers or t in settings.types]
    return {"var_ckpt": str(var_ckpt) if var_ckpt is not None else None,
            "vae_ckpt": str(vae_ckpt) if vae_ckpt is not None else None,
            "config": config if config is None or isinstance(config, dict) else str(config), "shape": shape,
            "method": settings.method, "base": list(settings.base), "low": list(settings.low),
            "types": list(settings.types), "base_layers": base_layers, "per_class": settings.per_class,
            "samples": settings.samples, "seed": settings.seed, "calib_samples": settings.calib_samples,
            "data": settings.data, "batch_size": settings.batch_size, "device": str(settings.device),
            "tolerance": settings.tolerance}


def _report(settings: dict, reference: dict, rows: list[dict], classifier, labels, cc_note) -> dict:
    from ..eval.classifier import class_consistency

    base_row = rows[0]
    for row in rows:
        row["token_agreement_drop"] = _drop(base_row["token_agreement"], row["token_agreement"])
        row["psnr_drop_db"] = _drop(base_row["psnr_db"], row["psnr_db"])
    drops = {row["name"]: row["token_agreement_drop"] for row in rows[1:]}
    sensitive, threshold = sensitive_types(drops, settings["tolerance"])
    for row in rows[1:]:
        row["sensitive"] = row["name"] in sensitive
    plan = plan_recipe(settings["method"], settings["base"], settings["base_layers"], sensitive,
                       settings["calib_samples"])
    dense_cc = None if classifier is None else class_consistency(classifier, reference["images"], labels)
    return {"litevar_sensitivity": SENSITIVITY_VERSION, "settings": settings,
            "reference": {"name": "dense fp32", "token_agreement": 1.0, "psnr_db": float("inf"),
                          "class_consistency": dense_cc, "generate_seconds": reference["seconds"]},
            "rows": rows, "class_consistency_note": cc_note,
            "plan": {"rule": PLAN_RULE, "tolerance": settings["tolerance"], "threshold": threshold,
                     "sensitive": sensitive, "recipe": plan},
            "threads": torch.get_num_threads()}


def write_outputs(report: dict, out: Path) -> dict[str, Path]:
    """OUT/sensitivity.json, sensitivity.md, sensitivity.png and plan.json (a recipe); returns the paths."""
    paths = {"json": out / "sensitivity.json", "md": out / "sensitivity.md", "png": out / "sensitivity.png",
             "plan": out / "plan.json"}
    _write_json(paths["json"], report)
    write_atomic(paths["md"], lambda tmp: tmp.write_text(sensitivity_markdown(report)))
    plot_sensitivity(report, paths["png"])
    _write_json(paths["plan"], report["plan"]["recipe"])
    return paths


def cmd_sensitivity(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(positive("--threads", args.threads))
    settings = SensitivitySettings(method=args.method, base=parse_bits(args.base, "--base"),
                                   low=parse_bits(args.low, "--low"), types=parse_types(args.types),
                                   per_class=5 if args.per_class is None else args.per_class, samples=args.samples,
                                   seed=args.seed, calib_samples=args.calib_samples, cfg=args.cfg, top_k=args.top_k,
                                   top_p=args.top_p, data=args.data, batch_size=args.batch_size, device=args.device,
                                   tolerance=args.tolerance)
    report = layer_sensitivity(settings, args.var_ckpt, args.vae_ckpt, args.config, args.shape, out=args.out,
                               overwrite=args.overwrite, progress=not args.no_progress)
    out = Path(args.out)
    print((out / "sensitivity.md").read_text())
    print(f"wrote {out / 'sensitivity.json'}, sensitivity.md, sensitivity.png and plan.json "
          f"(keeps {report['plan']['sensitive'] or 'no type'} in 16 bit); runs in {out / RUNS_DIR}")


def add_sensitivity_command(sub) -> None:
    s = sub.add_parser("sensitivity", help="LiteVAR's layer-type sensitivity study: one type at low bits, the rest at "
                       "base bits; writes a table, a bar chart and a mixed-precision plan (recipe)")
    add_model_args(s, random_shapes=True)
    s.add_argument("--method", default="rtn", help="quantization recipe step type (default rtn; e.g. smoothquant, stwq)")
    s.add_argument("--base", nargs=2, default=["8", "8"], metavar=("W", "A"),
                   help="bits of every quantized layer (default 8 8; A may be none: weight-only)")
    s.add_argument("--low", nargs=2, default=["8", "4"], metavar=("W", "A"),
                   help="bits of the studied type (default 8 4: 4-bit activations, as in LiteVAR)")
    s.add_argument("--types", help=f"comma-separated layer types to study (default: every type the model has: "
                                   f"{','.join(VAR_LAYER_TYPES)}, and on an M-VAR in_proj,out_proj)")
    count = s.add_mutually_exclusive_group()
    count.add_argument("--per-class", type=int, help="images per class (default 5)")
    count.add_argument("--samples", type=int, help="images in all, the classes in turn (for models with many classes)")
    s.add_argument("--seed", type=int, default=0, help="image i of the job list (class-major, or the classes in turn "
                   "with --samples) uses seed + i, as in generate, sample and eval")
    add_sampling_args(s, more_smooth=False)
    s.add_argument("--calib-samples", type=int, default=16, help="calibration generations of calibrated methods")
    s.add_argument("--data", default="auto", choices=DATA_CHOICES,
                   help="class-consistency classifier (default auto: fashion-mnist for the shipped model, else none)")
    s.add_argument("--tolerance", type=float, help="drop in token agreement below the base run above which a type is "
                   "kept in 16 bit (default: twice the median drop over the studied types)")
    s.add_argument("--batch-size", type=int, default=50)
    s.add_argument("--threads", type=int)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", required=True, help="output folder (resumable: finished runs are kept)")
    s.add_argument("--overwrite", action="store_true", help="redo every run, also with other settings")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_sensitivity)
