"""Quantization: primitives, fake-quant and runtime modules, calibration."""
