"""PTQ4ARVG's Static Token-Wise Quantization alone: static activation ranges per token group, no transform."""
from __future__ import annotations

from dataclasses import dataclass

from ..transform import QuantConfig, register_method
from .rtn import quantize_plain


@dataclass
class STWQConfig(QuantConfig):
    """Static per-token-group activations: one range per scale for qkv/fc1, token 0 vs the rest for proj/fc2,
    one per tensor elsewhere (``litevar.quant.transform.STWQ_GROUPING``)."""

    activations: str = "stwq"


register_method(STWQConfig, quantize_plain, "stwq")
