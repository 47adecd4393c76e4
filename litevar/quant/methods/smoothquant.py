"""SmoothQuant: per-channel scales ``s = max|X|^a / max|W|^(1-a)`` migrate activation outliers into the weights;
``X/s`` is folded into the AdaLN before ``mat_qkv``, ``fc1`` and ``head``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import foldable, layer_type
from ..transform import QuantConfig, calibrate, fold_transforms, register_method, replace_linears, targets

_EXCLUDE_FIRST = ("mat_qkv", "fc1")  # token 0 (the class token) is an outlier that should not set the scales


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant with migration strength ``alpha``; static per-tensor activations by default.

    Example:
        >>> SmoothQuantConfig(alpha=0.5).activations
        'static'
    """

    activations: str = "static"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def range_groups(stats, name: str) -> range | None:
    """The token groups the input transforms are fitted on: all, but token 0 excluded for qkv/fc1."""
    return range(1, stats.lo.shape[1]) if layer_type(name) in _EXCLUDE_FIRST and stats.lo.shape[1] > 1 else None


def channel_range(stats, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel input (min, max) over the calibration data of :func:`range_groups`."""
    return stats.channel_range(range_groups(stats, name))


def smoothing_scale(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    w_absmax = weight.detach().float().abs().amax(0).cpu()
    return (x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-5, 1e5)


def quantize_smoothquant(pipe, config: SmoothQuantConfig, filter_fn=None) -> None:
    layers = targets(pipe, config, filter_fn)
    stats = calibrate(pipe, config, layers)
    transforms = {}
    for name, linear in layers.items():
        if foldable(name):
            lo, hi = channel_range(stats[name], name)
            transforms[name] = (None, smoothing_scale(torch.maximum(-lo, hi), linear.weight, config.alpha))
    fold_transforms(pipe, stats, transforms)
    replace_linears(pipe, config, layers, stats)


register_method(SmoothQuantConfig, quantize_smoothquant, "smoothquant")
