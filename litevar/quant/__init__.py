"""Quantization: primitives, fake-quant and runtime modules, calibration."""
from .transform import QuantConfig, quantize_

__all__ = ["QuantConfig", "quantize_"]
