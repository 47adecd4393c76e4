"""Per-scale classifier-free guidance schedules, and dropping the unconditional rows where no scale needs them.

The sampler runs rows [conditional B; unconditional B] and mixes the logits of scale k as
``(1 + t_k) * cond - t_k * uncond``. Upstream's schedule is the linear ramp ``t_k = cfg * k / (K - 1)``. A
:class:`GuidanceSchedule` sets ``t_k`` per scale (ramp, interval) and decides from which scale on the
unconditional rows are not computed at all (SkipVAR-style): from there the batch really halves (no q/k/v, MLP,
head or KV-cache writes for those rows) and the logits are the conditional ones.

Dropping is a suffix, never "skip then resume": an unconditional row at scale k attends to the unconditional
keys/values of every earlier scale, so once they are missing no later scale can compute that row. Scales after
the last one with guidance (the end of an interval) drop the rows automatically: their results were unused.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_step

RAMPS = ("linear", "constant")


@dataclass
class GuidanceConfig:
    """A per-scale CFG schedule (the ``guidance`` recipe step).

    Args:
        ramp: "linear" (upstream: ``cfg * k / (K - 1)`` at scale k) or "constant" (``cfg`` at every scale).
        interval: ``[first, last]`` scales (inclusive; negative counts from the end) where guidance applies;
            elsewhere the weight is 0. None: every scale.
        skip_uncond_from: the scale (negative counts from the end: -1 is the last) from which the unconditional
            rows are not computed and the logits are the conditional ones; None: computed wherever a later
            scale still guides.

    Example:
        >>> GuidanceConfig(skip_uncond_from=-1).skip_uncond_from
        -1
    """

    ramp: str = "linear"
    interval: list | None = None
    skip_uncond_from: int | None = None

    def __post_init__(self) -> None:
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {self.ramp!r}")
        if self.interval is not None:
            if (not isinstance(self.interval, (list, tuple)) or len(self.interval) != 2
                    or not all(_is_int(v) for v in self.interval)):
                raise ValueError(f"interval must be [first, last] scale indices, got {self.interval!r}")
            self.interval = [int(v) for v in self.interval]
        if self.skip_uncond_from is not None and not _is_int(self.skip_uncond_from):
            raise ValueError(f"skip_uncond_from must be a scale index (an integer), got {self.skip_uncond_from!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scale(index: int, scales: int, key: str) -> int:
    if not -scales <= index < scales:
        raise ValueError(f"{key} {index} is outside the model's scales 0..{scales - 1} (or -{scales}..-1)")
    return index % scales


@dataclass(frozen=True)
class GuidanceSchedule:
    """The resolved schedule for a model with ``scales`` scales.

    Args:
        ramp: see :class:`GuidanceConfig`.
        first, last: guided scales (inclusive).
        uncond_until: the unconditional rows are computed at scales ``< uncond_until`` only.
        scales: the model's number of scales.

    Example:
        >>> s = GuidanceSchedule.from_config(GuidanceConfig(skip_uncond_from=-1), scales=4)
        >>> s.uncond_until, s.weight(1.5, 3), s.weight(1.5, 2)
        (3, 0.0, 1.0)
    """

    ramp: str
    first: int
    last: int
    uncond_until: int
    scales: int

    @classmethod
    def from_config(cls, config: GuidanceConfig, scales: int) -> "GuidanceSchedule":
        first, last = (0, scales - 1) if config.interval is None else (
            _scale(config.interval[0], scales, "interval start"), _scale(config.interval[1], scales, "interval end"))
        if first > last:
            raise ValueError(f"interval [{first}, {last}] is empty: its start must not come after its end")
        until = last + 1
        if config.skip_uncond_from is not None:
            until = min(until, _scale(config.skip_uncond_from, scales, "skip_uncond_from"))
        return cls(config.ramp, first, last, until, scales)

    @property
    def drops_rows(self) -> bool:
        """Whether some scale runs without the unconditional rows."""
        return self.uncond_until < self.scales

    def weight(self, cfg: float, k: int) -> float:
        """Guidance weight ``t_k`` of scale ``k`` (logits ``(1 + t) * cond - t * uncond``)."""
        if k >= self.uncond_until or not self.first <= k <= self.last:
            return 0.0
        if self.ramp == "constant":
            return cfg
        return cfg * (k / max(self.scales - 1, 1))  # the same expression as upstream's ramp: bit-identical

    def describe(self) -> dict:
        return {"ramp": self.ramp, "interval": [self.first, self.last], "uncond_until": self.uncond_until}


def _apply(pipe, config: GuidanceConfig) -> None:
    scales = len(pipe.config.var.patch_nums)
    schedule = GuidanceSchedule.from_config(config, scales)
    if schedule.drops_rows and pipe.config.arch == "mvar":
        raise ValueError("step 'guidance' cannot drop the unconditional rows on an M-VAR (its Mamba state is "
                         "carried for both CFG halves): remove skip_uncond_from and end any interval at the last scale")
    pipe.set_attention("guidance", schedule, by="guidance")


register_step("guidance", GuidanceConfig, _apply, phase="sampling")
