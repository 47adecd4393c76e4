"""LiteVAR's mixed-precision PTQ: RTN everywhere except the sensitive layers, kept in 16 bit (``ffn.fc2``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..transform import QuantConfig, register_method
from .rtn import quantize_plain


@dataclass
class LiteVARConfig(QuantConfig):
    """LiteVAR mixed precision: asymmetric per-channel weights, dynamic per-token asymmetric activations, and
    ``keep`` (default ``fc2``, whose post-GELU input has a long one-sided tail) left in 16 bit.

    Example:
        >>> LiteVARConfig(w_bits=4, a_bits=8).targets()
        ('mat_qkv', 'proj', 'fc1', 'ada_lin', 'head')
    """

    keep: tuple = ("fc2",)


register_method(LiteVARConfig, quantize_plain, "litevar-mp")
