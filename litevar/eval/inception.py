"""Inception FID / IS through torch-fidelity, only from local weights (nothing is downloaded)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

WEIGHTS_HELP = ("torch-fidelity's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) and "
                "`pip install torch-fidelity`")
INCEPTION_HELP = (f"Inception FID/IS not computed: they need `inception_weights` (`litevar eval --inception-weights "
                  f"PATH`), {WEIGHTS_HELP}; the FD-EffLite0 numbers above are not comparable with published FID")


class _Images(torch.utils.data.Dataset):
    """uint8 NHWC images as the uint8 CHW tensors torch-fidelity reads."""

    def __init__(self, images_NHWC: np.ndarray) -> None:
        self.images = images_NHWC

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def inception_scores(weights: str | Path, generated_NHWC: np.ndarray, real_NHWC: np.ndarray) -> dict:
    """FID (generated vs real) and Inception Score of the generated set, with torch-fidelity and local weights.

    Args:
        weights: path of torch-fidelity's FID Inception-v3 weights.
        generated_NHWC, real_NHWC: uint8 image sets (resized to 299 px by torch-fidelity).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"Inception weights {weights} not found; `inception_weights` must be the path of "
                         f"{WEIGHTS_HELP}")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError("`inception_weights` needs torch-fidelity: pip install torch-fidelity")
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(generated_NHWC), input2=_Images(real_NHWC), fid=True, isc=True, verbose=False,
        cuda=torch.cuda.is_available(), feature_extractor_weights_path=str(weights))
    return {"fid": float(metrics["frechet_inception_distance"]),
            "inception_score": float(metrics["inception_score_mean"]),
            "inception_score_std": float(metrics["inception_score_std"])}
