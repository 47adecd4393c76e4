"""Outlier Suppression+: a per-channel shift to the channel's range midpoint, then SmoothQuant-style scaling,
both folded into the AdaLN (the shift's effect on the output goes into the layer's bias)."""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import foldable
from ..transform import calibrate, fold_transforms, register_method, replace_linears, targets
from .smoothquant import SmoothQuantConfig, channel_range, smoothing_scale


@dataclass
class OSPlusConfig(SmoothQuantConfig):
    """Shift ``z = (max X + min X) / 2`` per channel, then scale with ``alpha`` on the shifted ranges."""


def shift_and_scale(stats, name, weight, alpha):
    lo, hi = channel_range(stats, name)
    shift = (lo + hi) / 2
    return shift, smoothing_scale((hi - lo) / 2, weight, alpha)


def quantize_osplus(pipe, config: OSPlusConfig, filter_fn=None) -> None:
    layers = targets(pipe, config, filter_fn)
    stats = calibrate(pipe, config, layers)
    transforms = {name: shift_and_scale(stats[name], name, linear.weight, config.alpha)
                  for name, linear in layers.items() if foldable(name)}
    fold_transforms(pipe, stats, transforms)
    replace_linears(pipe, config, layers, stats)


register_method(OSPlusConfig, quantize_osplus, "osplus")
