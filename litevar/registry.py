"""The recipe step registry: each step type's config dataclass, handler and phase.

It sits below everything that registers steps (attention techniques, quantization methods, the int8 decoder)
and below :mod:`litevar.recipe`, which reads it, so a technique registers its step without importing the
pipeline or the recipe machinery. The steps litevar ships register when the ``litevar`` package is imported.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Steps run phase by phase, whatever their order in the recipe (in recipe order within a phase): the sampler's
# CFG schedule and token pruning first (they decide which rows and tokens exist, so every calibration below sees
# the sampler as guided and pruned), then attention configuration (it sets components, touches no weights), then
# weight transforms (calibrated on the model the attention steps configured), then the VQ-VAE decoder.
PHASES = ("sampling", "attention", "weights", "decoder")

Handler = Callable[[Any, Any], None]


@dataclass(frozen=True)
class _Step:
    config_cls: type
    handler: Handler
    phase: str


STEPS: dict[str, _Step] = {}


def register_step(type_name: str, config_cls: type, handler: Handler, phase: str = "weights") -> None:
    """Make ``{"type": type_name, **fields}`` usable in recipes: ``handler(pipe, config_cls(**fields))``, run in
    ``phase`` (one of :data:`PHASES`).

    Args:
        type_name: the step's ``"type"`` in recipe JSON.
        config_cls: the step's config dataclass.
        handler: ``handler(pipe, config)`` applies the step to a :class:`litevar.Pipeline` in place.
        phase: when the step runs (see :data:`PHASES`).

    Example:
        >>> @dataclasses.dataclass
        ... class NoOp:
        ...     pass
        >>> register_step("no-op", NoOp, lambda pipe, cfg: None)
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"recipe step {type_name!r}: the config must be a dataclass, got {config_cls!r}")
    if phase not in PHASES:
        raise ValueError(f"recipe step {type_name!r}: phase must be one of {PHASES}, got {phase!r}")
    STEPS[type_name] = _Step(config_cls, handler, phase)

