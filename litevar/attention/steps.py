"""Recipe steps that configure attention: ``mdwa`` (key selection), ``asc`` (CFG sharing), ``kv-cache`` (storage),
and ``mamba-state`` (M-VAR's carried state, stored like a cache).

Each sets one component of ``pipe.attention`` (:mod:`litevar.attention.components`), whatever the other steps
did before or do after; the quantization steps set the attention precision (``attn_bits``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import register_step
from .cfg_shared import MODES, SharingSchedule, measure_cfg_similarity
from .components import KV_STORAGES, STATE_STORAGES, KVCacheSpec, WindowSelection
from .dispatch import KERNELS
from .windows import PlanError


@dataclass
class MDWAConfig:
    """Multi-diagonal windowed attention from a calibrated plan file.

    Args:
        plan: path of a plan written by ``litevar calibrate-attention`` (refused for another model).
        backend: the attention kernel: "auto" (chosen by capability and density), "interval" (compiled CPU
            kernel), "gathered" (PyTorch, computes only kept pairs), "flex" (FlexAttention), "masked" (dense
            kernel with the -inf mask: the plan's oracle) or "explicit".
    """

    plan: str
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in KERNELS:
            raise ValueError(f"backend must be one of {KERNELS}, got {self.backend!r}")


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


@dataclass
class KVCacheConfig:
    """How the KV cache stores keys and values during sampling.

    Args:
        storage: "int8" (symmetric int8 with one scale per (row, head, token): about half the bytes of bf16)
            or "model" (the model's dtype).
    """

    storage: str = "int8"

    def __post_init__(self) -> None:
        if self.storage not in KV_STORAGES:
            raise ValueError(f"storage must be one of {sorted(KV_STORAGES)}, got {self.storage!r}")


@dataclass
class MambaStateConfig:
    """How an M-VAR keeps each block's Mamba SSM state between scales.

    Args:
        storage: "int8" (symmetric int8, one scale per (row, head, headdim index): about a quarter of the float32
            bytes) or "model" (float32).
    """

    storage: str = "int8"

    def __post_init__(self) -> None:
        if self.storage not in STATE_STORAGES:
            raise ValueError(f"storage must be one of {STATE_STORAGES}, got {self.storage!r}")


def _apply_mdwa(pipe, config: MDWAConfig) -> None:
    from .calibrate import load_plan

    plan = load_plan(config.plan)
    plan.check_model(pipe.identity())
    cfg = pipe.var.cfg
    if tuple(plan.patch_nums) != tuple(cfg.patch_nums) or plan.depth != cfg.depth or plan.heads != cfg.heads:
        raise PlanError(f"window plan is for depth {plan.depth}, {plan.heads} heads, pyramid {plan.patch_nums}; "
                        f"the model has depth {cfg.depth}, {cfg.heads} heads, pyramid {tuple(cfg.patch_nums)}")
    if pipe.head_order is not None:  # the plan names the heads as loaded; the model's heads were reordered
        plan = plan.permute_heads(pipe.head_order)
    pipe.set_attention("selection", WindowSelection(plan), by="mdwa")
    if config.backend != "auto":
        pipe.set_attention("kernel", config.backend, by="mdwa")


def _apply_asc(pipe, config: ASCConfig) -> None:
    cfg = pipe.config.var
    if config.min_similarity is None:
        schedule = SharingSchedule.everywhere(config.mode, cfg.depth, len(cfg.patch_nums))
    else:
        similarity = measure_cfg_similarity(pipe, samples=config.calib_samples, seed=config.calib_seed, progress=False)
        schedule = SharingSchedule.from_similarity(config.mode, similarity, config.min_similarity)
    pipe.set_attention("sharing", schedule, by="asc")


def _apply_kv_cache(pipe, config: KVCacheConfig) -> None:
    pipe.set_attention("kv", KVCacheSpec(config.storage), by="kv-cache")


def _apply_mamba_state(pipe, config: MambaStateConfig) -> None:
    pipe.set_attention("state", config.storage, by="mamba-state")


register_step("mdwa", MDWAConfig, _apply_mdwa, phase="attention")
register_step("asc", ASCConfig, _apply_asc, phase="attention")
register_step("kv-cache", KVCacheConfig, _apply_kv_cache, phase="attention")
register_step("mamba-state", MambaStateConfig, _apply_mamba_state, phase="attention")
