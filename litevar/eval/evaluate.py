"""``evaluate``: a candidate recipe against the dense float32 model on the same labels and seeds.

The reference images and tokens are cached (keyed by the weights, labels, seeds, sampling settings, batch size
and machine), so evaluating several recipes of one model generates the reference once.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import FileFormatError, json_safe, read_npz, reading, write_atomic
from ..images import to_uint8
from ..jobs import JobList
from ..recipe import Recipe, build_pipeline, load_recipe
from .bench import machine_info
from .fidelity import FidelityAccumulator, image_fidelity
from .metrics import frechet_distance
from .quality import FEATURE_SIZE, FeatureCache

EVAL_VERSION = 1


def weights_digest(*modules: torch.nn.Module) -> str:
    """sha256 over every tensor of the modules' state dicts (names, dtypes, shapes and bytes), 16 hex digits."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().cpu().contiguous().view(-1)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _rounding_setup() -> dict:
    """What changes float rounding, hence image bytes, besides the inputs: part of the reference cache key."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _reference_set(pipe, weights: str, labels: np.ndarray, seeds: np.ndarray, sampling: dict, batch_size: int,
                   cache_dir: Path | None, progress: bool) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Reference images (uint8 NHWC), tokens per scale and generation seconds, from the cache when present."""
    key = {"weights": weights, "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
           "seeds": hashlib.sha256(seeds.tobytes()).hexdigest(), "sampling": sampling, "batch_size": batch_size,
           "device": pipe.device.type, **_rounding_setup()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"reference_{name}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        n_scales = len(pipe.config.var.patch_nums)
        advice = "delete it to generate the reference images again"
        keys = ("arr_0", "seconds", *(f"tokens_{si}" for si in range(n_scales)))
        cached = read_npz(path, "reference cache", advice, keys)
        with reading(path, FileFormatError, "reference cache", advice):
            images, tokens = cached["arr_0"], [cached[f"tokens_{si}"] for si in range(n_scales)]
            if images.ndim != 4 or len(images) != len(labels) or any(len(t) != len(labels) for t in tokens):
                raise ValueError("its arrays do not hold one image and token map per label")
            return images, tokens, float(cached["seconds"])
    images, tokens = [], []
    start_time = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch_size), desc="reference", disable=not progress):
        out = pipe.generate(labels[start:start + batch_size].tolist(), seed=seeds[start:start + batch_size].tolist(),
                            progress=False, **sampling)
        images.append(to_uint8(out.images))
        tokens.append([t.cpu().numpy().astype(np.int32) for t in out.tokens])
    seconds = time.perf_counter() - start_time
    images_np = np.concatenate(images)
    tokens_np = [np.concatenate([batch[si] for batch in tokens]) for si in range(len(tokens[0]))]
    if path is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {f"tokens_{si}": t for si, t in enumerate(tokens_np)}
        write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), arr_0=images_np, seconds=seconds,
                                                key=json.dumps(key), **arrays))
    return images_np, tokens_np, seconds


def _candidate_pass(reference, candidate, labels, seeds, ref_tokens, sampling, batch_size, progress):
    """Candidate images, fidelity accumulator and the candidate's generation seconds."""
    acc = FidelityAccumulator([pn * pn for pn in reference.config.var.patch_nums])
    images, seconds = [], 0.0
    for start in tqdm(range(0, len(labels), batch_size), desc="candidate", disable=not progress):
        batch_labels = labels[start:start + batch_size].tolist()
        forced = [torch.from_numpy(t[start:start + batch_size]).long() for t in ref_tokens]
        ref_logp = {}
        reference.score_tokens(batch_labels, forced, lambda si, lg: ref_logp.__setitem__(si, lg.log_softmax(-1)),
                               cfg=sampling["cfg"])
        candidate.score_tokens(batch_labels, forced, lambda si, lg: acc.add_kl(si, ref_logp[si], lg),
                               cfg=sampling["cfg"])
        tick = time.perf_counter()
        out = candidate.generate(batch_labels, seed=seeds[start:start + batch_size].tolist(), progress=False, **sampling)
        seconds += time.perf_counter() - tick
        acc.add_tokens(forced, out.tokens)
        images.append(to_uint8(out.images))
    return np.concatenate(images), acc, seconds


def _quality(images: np.ndarray, labels: np.ndarray, test, features: FeatureCache, classifier) -> dict:
    from .quality import generation_report

    report = generation_report(images, labels, test, features, classifier)
    quality = {"fd_effl0": report["fd"], "precision": report["precision"], "recall": report["recall"]}
    if "class_consistency" in report:
        quality["class_consistency"] = report["class_consistency"]
    return quality


@dataclass(frozen=True)
class EvalSettings:
    """What :func:`evaluate` generates and measures.

    Args:
        per_class, classes, seed: the job list (:class:`~litevar.jobs.JobList`): ``per_class`` images of each of
            ``classes`` (default every class), image i with seed ``seed + i``, as ``litevar sample`` makes them.
        cfg, top_k, top_p: sampling (None: the model card's).
        data: "fashion-mnist", an image folder, or None (fidelity only).
        batch_size: images per batch (the same for reference and candidate, so batch composition matches).
        device: where both models run.
        cache_dir: where reference images and features are cached (None: no cache).
        feature_size: EfficientNet-Lite0 input side for FD-EffLite0.
        inception_weights: local torch-fidelity Inception weights for FID/IS (None: not computed, said so); needs
            ``data``.

    Example:
        >>> EvalSettings(per_class=10, data="fashion-mnist").batch_size
        50
    """

    per_class: int = 100
    classes: Sequence[int] | None = None
    seed: int = 0
    cfg: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    data: str | None = None
    batch_size: int = 50
    device: str = "cpu"
    cache_dir: str | Path | None = "runs/eval/cache"
    feature_size: int = FEATURE_SIZE
    inception_weights: str | Path | None = None

    def __post_init__(self) -> None:
        for name in ("per_class", "batch_size", "feature_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.inception_weights is not None and self.data is None:
            raise ValueError("Inception FID needs a dataset: give `data` together with `inception_weights`")

    def jobs(self, num_classes: int) -> JobList:
        """The job list on a model with ``num_classes`` classes."""
        return JobList(range(num_classes) if self.classes is None else self.classes, self.per_class, seed=self.seed)


def evaluate(recipe: Recipe | str | dict | None = None, settings: EvalSettings | None = None, *,
             var_ckpt: str | Path | None = None, vae_ckpt: str | Path | None = None, config: Any = None,
             progress: bool = True) -> dict:
    """Generate the same labels/seeds with the dense float32 model and with ``recipe``; report fidelity to the
    reference and, with ``settings.data``, quality of both against that dataset's test split.

    Args:
        recipe: the candidate (see :func:`litevar.recipe.load_recipe`); None = dense fp32 (identity check).
        settings: the job list, sampling, data and caches (see :class:`EvalSettings`; None: its defaults).
        var_ckpt, vae_ckpt, config: the model (all None: the shipped default model).
        progress: progress bars.

    Returns:
        The report dict (see README "Evaluation protocol"); ``write_report`` saves it as JSON and Markdown.

    Example:
        >>> report = evaluate("bf16", EvalSettings(per_class=10, data="fashion-mnist"))  # doctest: +SKIP
        >>> report["fidelity"]["token_agreement_per_scale"][:3]  # doctest: +SKIP
    """
    settings = settings or EvalSettings()
    batch_size, data, device = settings.batch_size, settings.data, settings.device
    recipe = load_recipe(recipe)
    cache = Path(settings.cache_dir) if settings.cache_dir is not None else None
    reference = build_pipeline(None, var_ckpt, vae_ckpt, config, device=device)
    candidate = build_pipeline(recipe, var_ckpt, vae_ckpt, config, device=device)
    jobs = settings.jobs(reference.num_classes)
    reference.check_labels(jobs.classes)
    sampling = reference.resolve_sampling(cfg=settings.cfg, top_k=settings.top_k, top_p=settings.top_p,
                                          more_smooth=False)
    labels, seeds = jobs.labels, jobs.seeds
    test = None
    if data is not None:
        from ..data import load_dataset
        test = load_dataset(data, "test", size=reference.config.vae.image_size)
    weights = weights_digest(reference.var, reference.vae)
    ref_images, ref_tokens, ref_seconds = _reference_set(reference, weights, labels, seeds, sampling, batch_size, cache,
                                                         progress)
    cand_images, acc, cand_seconds = _candidate_pass(reference, candidate, labels, seeds, ref_tokens, sampling,
                                                     batch_size, progress)
    features = FeatureCache(cache / "features" if cache else None, input_size=settings.feature_size,
                            progress=progress)
    fidelity = {**acc.result(), **image_fidelity(ref_images, cand_images),
                "fd_to_reference": frechet_distance(features(ref_images), features(cand_images))}
    report = {"litevar_eval": EVAL_VERSION,
              "metric": f"FD-EffLite0@{settings.feature_size}px (EfficientNet-Lite0 ImageNet features; "
                        "not Inception FID)",
              "model": {"var_ckpt": str(var_ckpt or "default"), "vae_ckpt": str(vae_ckpt or "default"),
                        "weights_sha256": weights},
              "recipe": recipe.to_dict(), "sampling": sampling, "images": len(labels), "per_class": jobs.per_class,
              "classes": sorted(set(labels.tolist())), "seed": jobs.seed, "batch_size": batch_size, "data": data,
              "fidelity": fidelity, "seconds": cand_seconds, "images_per_s": len(labels) / cand_seconds,
              "reference": {"recipe": Recipe().to_dict(), "seconds": ref_seconds,
                            "images_per_s": len(labels) / ref_seconds},
              "machine": {**machine_info(device), "threads": torch.get_num_threads()}}
    if test is not None:
        classifier = classifier_for(data, reference.num_classes)
        report["quality"] = _quality(cand_images, labels, test, features, classifier)
        report["reference"]["quality"] = _quality(ref_images, labels, test, features, classifier)
    report["inception"] = _inception(settings.inception_weights, test, ref_images, cand_images)
    return report


def classifier_for(data: str, num_classes: int):
    """The shipped Fashion-MNIST classifier for a 10-class model evaluated on Fashion-MNIST, else None."""
    from .classifier import NUM_CLASSES, load_classifier

    return load_classifier() if data == "fashion-mnist" and num_classes == NUM_CLASSES else None


def _inception(weights, test, ref_images: np.ndarray, cand_images: np.ndarray) -> dict:
    from .inception import INCEPTION_HELP, inception_scores

    if weights is None:
        return {"computed": False, "note": INCEPTION_HELP}
    if test is None:
        raise ValueError("Inception FID needs a dataset: give `data` together with `inception_weights`")
    return {"computed": True, "candidate": inception_scores(weights, cand_images, test.images),
            "reference": inception_scores(weights, ref_images, test.images)}


def write_report(report: dict, path: str | Path) -> tuple[Path, Path]:
    """Write ``report`` as JSON and its Markdown table next to it (same name, .md); returns both paths."""
    from .tables import eval_markdown

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False)))
    md = path.with_suffix(".md")
    write_atomic(md, lambda tmp: tmp.write_text(eval_markdown(report)))
    return path, md
