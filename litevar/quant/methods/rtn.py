"""Round-to-nearest: min-max per-channel weights and (by default) dynamic per-token activations, no transform."""
from __future__ import annotations

from dataclasses import dataclass

from ..transform import QuantConfig, calibrate, register_method, replace_linears, targets


@dataclass
class RTNConfig(QuantConfig):
    """Plain round-to-nearest (LiteVAR's baseline scheme with the defaults). See :class:`QuantConfig`.

    Example:
        >>> RTNConfig(w_bits=6, a_bits=6).targets()
        ('mat_qkv', 'proj', 'fc1', 'fc2', 'ada_lin', 'head')
    """


def quantize_plain(pipe, config: QuantConfig, filter_fn=None, rotate: bool = False) -> None:
    """Quantize the target layers with no input transform other than an optional online rotation."""
    layers = targets(pipe, config, filter_fn)
    stats = calibrate(pipe, config, layers) if config.needs_calibration else None
    replace_linears(pipe, config, layers, stats, rotate=rotate)


register_method(RTNConfig, quantize_plain, "rtn")
