"""PTQ4ARVG's Gain-Projected Scaling: per input channel, the scale that minimises the second-order quantization
loss ``a s^2 + b / s^2`` of the activation-weight product, after an Outlier Suppression+ shift, folded into
the AdaLN (the "+1" of ``(1 + scale)`` becomes a per-channel constant)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import foldable, layer_type
from ..primitives import QuantSpec, fake_quant
from ..transform import QuantConfig, calibrate, fold_transforms, register_method, replace_linears, targets
from .smoothquant import channel_range, range_groups


@dataclass
class GPSConfig(QuantConfig):
    """Gain-Projected Scaling with static per-tensor activations (see :func:`gps_scale`)."""

    activations: str = "static"


def gps_scale(x: torch.Tensor, weight: torch.Tensor, w_spec: QuantSpec, a_bits: int) -> torch.Tensor:
    """Per-input-channel scales ``s`` (apply ``X / s``, ``W * s``) from input rows ``x`` [n, K] and ``weight`` [N, K].

    ``s_i = s_ref * (|X_i|^2 |dW_i|^2 / (|dX_i|^2 |Wq_i|^2))^(1/4)`` with ``s_ref`` the SmoothQuant (alpha 0.5)
    scale of the channel with the widest range, ``dX`` the rounding error of ``X`` on the grid whose step that
    channel sets, ``Wq``/``dW`` the quantized weight and its error; ``s_i = s_ref`` where a norm is 0.

    Example:
        >>> s = gps_scale(torch.randn(64, 8), torch.randn(4, 8), QuantSpec(8, False), 8)
        >>> s.shape
        torch.Size([8])
    """
    x = x.float()
    w = weight.detach().float().cpu()
    x_range = x.amax(0) - x.amin(0)
    w_range = (w.amax(0) - w.amin(0)).clamp_min(1e-8)
    idx = int(x_range.argmax())
    s_ref = (x_range[idx].clamp_min(1e-8) / w_range[idx]).sqrt()
    step = (x_range[idx] / s_ref) / (2 ** a_bits - 1)
    xs = x / s_ref
    dx = xs - torch.round(xs / step) * step
    ws = w * s_ref
    wq = fake_quant(ws, w_spec)
    dw = ws - wq
    num = xs.pow(2).sum(0) * dw.pow(2).sum(0)
    den = dx.pow(2).sum(0) * wq.pow(2).sum(0)
    ratio = torch.where((num > 0) & (den > 0), num / den.clamp_min(1e-30), torch.ones_like(num))
    return (s_ref * ratio.pow(0.25)).clamp(1e-5, 1e5)


def gps_transforms(pipe, config: QuantConfig, layers, stats, cond_share=None) -> dict:
    """``{name: (shift, scale)}``: OS+ midpoint shift, then GPS scales on the shifted rows (foldable layers)."""
    transforms = {}
    for name, linear in layers.items():
        if not foldable(name):
            continue
        w_bits, a_bits = config.bits(layer_type(name))
        lo, hi = channel_range(stats[name], name)
        shift = (lo + hi) / 2
        rows = stats[name].sample(range_groups(stats[name], name), cond_share) - shift  # same rows as the shift
        w_spec = QuantSpec(w_bits, config.w_symmetric, "group" if config.w_group_size else "channel", config.w_group_size)
        transforms[name] = (shift, gps_scale(rows, linear.weight, w_spec, a_bits or 8))
    return transforms


def quantize_gps(pipe, config: GPSConfig, filter_fn=None, cond_share=None) -> None:
    layers = targets(pipe, config, filter_fn)
    stats = calibrate(pipe, config, layers)
    fold_transforms(pipe, stats, gps_transforms(pipe, config, layers, stats, cond_share))
    replace_linears(pipe, config, layers, stats, cond_share=cond_share)


register_method(GPSConfig, quantize_gps, "gps")
