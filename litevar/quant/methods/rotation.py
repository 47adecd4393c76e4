"""Hadamard rotation (QuaRot-style): ``x W^T = (x H)(W H)^T``; the rotated weight is quantized offline and the
input rotated online (VAR's per-class AdaLN modulation sits between the norm and the Linear, so the rotation
cannot be absorbed into the residual stream as in LLMs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..transform import QuantConfig, register_method
from .rtn import quantize_plain


@dataclass
class RotationConfig(QuantConfig):
    """Online Hadamard rotation of every quantized layer's input (power-of-two widths); static activations."""

    activations: str = "static"

    online_rotation: ClassVar[bool] = True


def quantize_rotation(pipe, config: RotationConfig, filter_fn=None) -> None:
    quantize_plain(pipe, config, filter_fn, rotate=True)


register_method(RotationConfig, quantize_rotation, "rotation")
