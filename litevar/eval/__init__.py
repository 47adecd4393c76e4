"""Measurement: fidelity to the dense model, quality against data, benchmarks and FLOP counts."""
from .evaluate import evaluate, write_report

__all__ = ["evaluate", "write_report"]
