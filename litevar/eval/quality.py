"""Quality of a model against data: Fréchet distance and precision/recall on EfficientNet-Lite0 features
(reported as FD-EffLite0; not Inception FID), class-consistency through the Fashion-MNIST classifier, and
VQ-VAE reconstruction PSNR and codebook usage.

Real-set features are cached on disk (keyed by extractor, input size and the exact pixels), so the floor,
reconstruction and generation reports share one extraction of the test split.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ImageSet, to_model_range
from ..files import FileFormatError, read_npy, write_atomic
from ..images import to_uint8
from .features import extract_features, get_extractor
from .metrics import codebook_usage, frechet_distance, precision_recall, psnr

FEATURE_SIZE = 128  # EffLite0 input side for 32x32 images: 128 keeps the features within this CPU's budget


class FeatureCache:
    """Features of image sets under ``folder``, recomputed only for pixels never seen before (``folder=None``:
    kept in memory for this object's life only)."""

    def __init__(self, folder: str | Path | None, extractor_name: str = "efflite0", input_size: int = FEATURE_SIZE,
                 batch_size: int = 100, progress: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, np.ndarray] = {}
        self.name = f"{extractor_name}@{input_size}"
        self.extractor = get_extractor(extractor_name, input_size=input_size)
        self.extractor.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.progress = progress

    def __call__(self, images_NHW3: np.ndarray) -> np.ndarray:
        digest = hashlib.sha256(images_NHW3.tobytes()).hexdigest()[:24]
        name = f"{self.name}_{len(images_NHW3)}_{digest}.npy"
        if name in self.memory:
            return self.memory[name]
        path = self.folder / name if self.folder is not None else None
        if path is not None and path.exists():
            feats = read_npy(path, "feature cache", "delete it to compute the features again")
            if feats.ndim != 2 or len(feats) != len(images_NHW3):
                raise FileFormatError(f"feature cache {path} holds {list(feats.shape)}, not one feature row per "
                                      f"image; delete it to compute the features again")
        else:
            feats = extract_features(self.extractor, images_NHW3, self.batch_size, progress=self.progress)
            if path is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp: np.save(open(tmp, "wb"), feats))
        self.memory[name] = feats
        return feats


def compare_to_data(feats_real: np.ndarray, feats_fake: np.ndarray, k: int = 3) -> dict:
    """FD, precision and recall of one feature set against the real one."""
    pr = precision_recall(feats_real, feats_fake, k=k)
    return {"fd": frechet_distance(feats_real, feats_fake), "precision": float(pr[0]), "recall": float(pr[1])}


@torch.no_grad()
def reconstruct(vae, data: ImageSet, batch_size: int = 250, progress: bool = True) -> tuple[np.ndarray, list]:
    """VQ-VAE reconstructions (uint8 NHWC, grey images stay RGB) and the token indices of every image."""
    images, tokens = [], []
    for start in tqdm(range(0, len(data), batch_size), disable=not progress, desc="reconstruct"):
        idx = vae.img_to_idx(to_model_range(data.images[start:start + batch_size]))
        images.append(to_uint8(vae.idx_to_img(idx).add(1).mul(0.5)))
        tokens.append(torch.cat(idx, dim=1))
    return np.concatenate(images), [torch.cat(tokens)]


def reconstruction_report(vae, test: ImageSet, features: FeatureCache, progress: bool = True) -> dict:
    """PSNR (dB, per image, averaged), codebook usage over all scales, FD/precision/recall vs the test set."""
    recon, tokens = reconstruct(vae, test, progress=progress)
    usage = codebook_usage(tokens, vae.cfg.vocab_size)
    report = {"psnr_db": psnr(recon, test.images, data_range=255.0),
              "codebook_usage": float(usage[0]), "codebook_perplexity": float(usage[1]),
              **compare_to_data(features(test.images), features(recon))}
    return report


@torch.no_grad()
def generate_set(pipe, labels: np.ndarray, seeds: np.ndarray, batch_size: int = 100, progress: bool = True,
                 **sampling) -> np.ndarray:
    """uint8 NHWC images for (label, seed) pairs (e.g. a :class:`~litevar.jobs.JobList`'s ``labels`` and
    ``seeds``), one generator per image (independent of batching)."""
    out = []
    for start in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="generate"):
        result = pipe.generate(labels[start:start + batch_size].tolist(), seed=seeds[start:start + batch_size].tolist(),
                               progress=False, **sampling)
        out.append(to_uint8(result.images))
    return np.concatenate(out)


def generation_report(images_NHW3: np.ndarray, labels: np.ndarray, test: ImageSet, features: FeatureCache,
                      classifier=None) -> dict:
    """FD/precision/recall vs the test set and, with a classifier, the share classified as their label."""
    from .classifier import class_consistency

    report = compare_to_data(features(test.images), features(images_NHW3))
    if classifier is not None:
        report["class_consistency"] = float(class_consistency(classifier, images_NHW3, labels))
    return report
