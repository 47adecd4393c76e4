"""Recipe steps for the attention techniques: ``{"type": "mdwa", ...}`` and ``{"type": "asc", ...}``."""
from __future__ import annotations

from dataclasses import dataclass

from ..recipe import register_step
from .cfg_shared import MODES, CFGSharedAttnProcessor, SharingSchedule, measure_cfg_similarity
from .windowed import BACKENDS, WindowedAttnProcessor, apply_window_plan


@dataclass
class MDWAConfig:
    """Multi-diagonal windowed attention from a calibrated plan file.

    Args:
        plan: path of a plan written by ``litevar calibrate-attention`` (refused for another model).
        backend: "gathered" (computes only kept pairs) or "masked" (dense kernel with the -inf mask).
    """

    plan: str
    backend: str = "gathered"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class ASCConfig:
    """Attention sharing across the CFG halves.

    Args:
        mode: "output" (uncond reuses the cond attention output, skipping its q/k/v, attention and projection)
            or "map" (uncond reuses the cond attention probabilities with its own values).
        min_similarity: None = share at every layer and scale; else share where the measured cond/uncond
            attention-output cosine similarity is at least this (measured on ``calib_samples`` generations).
        calib_samples: generations for that measurement (classes in turn).
        calib_seed: seed of the first of them (image i uses calib_seed + i; kept apart from evaluation seeds).
    """

    mode: str = "output"
    min_similarity: float | None = None
    calib_samples: int = 16
    calib_seed: int = 100000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.min_similarity is not None and not -1 <= self.min_similarity <= 1:
            raise ValueError(f"min_similarity must be in [-1, 1], got {self.min_similarity}")
        if self.calib_samples < 1:
            raise ValueError(f"calib_samples must be >= 1, got {self.calib_samples}")


def _apply_mdwa(pipe, config: MDWAConfig) -> None:
    from .calibrate import load_plan

    apply_window_plan(pipe.var, load_plan(config.plan, pipe.var), config.backend)


def _apply_asc(pipe, config: ASCConfig) -> None:
    cfg = pipe.config.var
    current = pipe.var.blocks[0].attn.processor
    core = current if isinstance(current, WindowedAttnProcessor) else None
    if config.min_similarity is None:
        schedule = SharingSchedule.everywhere(config.mode, cfg.depth, len(cfg.patch_nums))
    else:
        similarity = measure_cfg_similarity(pipe, samples=config.calib_samples, seed=config.calib_seed, progress=False)
        schedule = SharingSchedule.from_similarity(config.mode, similarity, config.min_similarity)
    pipe.var.set_attn_processor(CFGSharedAttnProcessor(schedule, core))


register_step("mdwa", MDWAConfig, _apply_mdwa)
register_step("asc", ASCConfig, _apply_asc)
