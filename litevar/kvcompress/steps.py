"""The ``kv-compress`` recipe step: ``{"type": "kv-compress", "policy": "hack", "ratio": 0.7, ...}``."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_step
from .heads import classify, load_heads, load_selectivity
from .policies import CLASSES, POLICIES
from .reorder import reorder_heads_

CFG_MODES = ("per-row", "shared")
CALIBRATED = ("hack", "scalekv")  # policies that read a `litevar calibrate-kv` file


@dataclass
class KVCompressConfig:
    """Keep at most ``1 - ratio`` of the full pyramid's keys per (row, head) in every layer's KV cache.

    Args:
        policy: one of ``hack``, ``h2o``, ``snapkv``, ``streaming``, ``pyramidkv``, ``ams``, ``scalekv``
            (see :mod:`litevar.kvcompress.policies`).
        ratio: share of the full-length cache removed, in [0, 1) (0 keeps everything: exactly dense).
        heads: ``hack`` and ``scalekv`` only: a file from ``litevar calibrate-kv`` (refused for another model).
        alpha: ``hack`` only: share of contextual heads; None = the file's calibrated default.
        contextual_share: ``hack`` only: a contextual head's budget over a structural head's (B_C / B_S).
        observation: queries of the current scale whose attention scores the keys.
        sink_scales: first scales always kept (hack structural heads, streaming, ams).
        cfg: "per-row" (each CFG row selects its keys) or "shared" (the conditional rows' choice for both).
        merge: merge evicted keys' values into their most similar kept key (hack: contextual heads only).
        drafters: ``scalekv`` only: share of drafter layers (at least one).
        drafter_share: ``scalekv`` only: a drafter layer's budget over a refiner layer's.
        reorder: ``hack`` only: permute each layer's heads (weights and window plan, exactly) so structural heads
            come first and contextual heads after: each group is then a contiguous slice (views, not gathers).
    """

    policy: str
    ratio: float
    heads: str | None = None
    alpha: float | None = None
    contextual_share: float = 0.25
    observation: int = 32
    sink_scales: int = 2
    cfg: str = "per-row"
    merge: bool = False
    drafters: float = 0.1
    drafter_share: float = 4.0
    reorder: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"ratio (share of the cache removed) must be in [0, 1), got {self.ratio!r}")
        if (self.policy in CALIBRATED) != (self.heads is not None):
            raise ValueError("heads (a file from `litevar calibrate-kv`) is required by policies hack and scalekv "
                             "and only by them")
        for key in ("merge", "reorder"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.reorder and self.policy != "hack":
            raise ValueError("reorder (contiguous structural / contextual heads) is for policy hack only")
        if not 0 < self.drafters <= 1:
            raise ValueError(f"drafters (share of drafter layers) must be in (0, 1], got {self.drafters}")
        if not self.drafter_share >= 1:
            raise ValueError(f"drafter_share (a drafter's budget over a refiner's) must be >= 1, got "
                             f"{self.drafter_share}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.contextual_share <= 1:
            raise ValueError(f"contextual_share must be in (0, 1], got {self.contextual_share}")
        for key in ("observation", "sink_scales"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "observation" else 0):
                raise ValueError(f"{key} must be a {'positive' if key == 'observation' else 'non-negative'} integer, "
                                 f"got {value!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"cfg must be one of {CFG_MODES}, got {self.cfg!r}")


def build_policy(pipe, config: KVCompressConfig):
    """The policy object of ``config`` for ``pipe``'s model (budgets from the model's pyramid)."""
    cfg = pipe.config.var
    budget = max(1, round((1 - config.ratio) * cfg.seq_len))
    stored = cfg.seq_len - cfg.patch_nums[-1] ** 2  # the most a head can hold: the last scale is never stored
    common = dict(observation=config.observation, sink_scales=config.sink_scales, shared_rows=config.cfg == "shared",
                  merge=config.merge)
    if config.policy == "hack":
        variance, calibrated = load_heads(config.heads, pipe.identity())
        alpha = calibrated if config.alpha is None else config.alpha
        contextual = classify(variance, alpha)
        if config.reorder:
            contextual = reorder_heads_(pipe, contextual)
        return CLASSES["hack"](budget, cfg.heads, cfg.depth, contextual,
                               contextual_share=config.contextual_share, max_len=stored, **common)
    if config.policy == "scalekv":
        return CLASSES["scalekv"](budget, cfg.heads, cfg.depth, load_selectivity(config.heads, pipe.identity()),
                                  drafters=config.drafters, drafter_share=config.drafter_share, max_len=stored,
                                  **common)
    return CLASSES[config.policy](budget, cfg.heads, cfg.depth, **common)


def _apply(pipe, config: KVCompressConfig) -> None:
    pipe.set_attention("kv_policy", build_policy(pipe, config), by="kv-compress")


register_step("kv-compress", KVCompressConfig, _apply, phase="attention")
