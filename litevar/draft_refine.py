"""Draft-refine (CoDe, training-free; the ``draft-refine`` recipe step): the recipe's model drafts the early scales,
a smaller refiner that shares its VQ-VAE generates the rest.

The early scales hold few tokens, so the large model's work there is cheap and decides the image's layout; the
last scales hold most tokens and mostly add detail, which a small model can do for a fraction of the work. At the
switch the refiner reads the drafted scales once (one block-causal pass through its blocks that fills its own KV
cache: the teacher-forced attention, so a refiner that is the drafter continues with the same tokens up to
rounding), then samples the remaining scales with the same random stream. Its VQ-VAE must be the drafter's (same configuration and weights): both
models speak the same tokens and the drafter's decoder makes the image.

The recipe's other steps transform the drafter (its attention, weights, KV cache) and the shared decoder; the
refiner runs as loaded, in the recipe's dtype. Steps that act only on scales the refiner generates are refused
(``token-prune`` there), as are M-VARs (the refiner continues from a KV cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention.components import AttentionComponents
from .attention.context import AttnContext
from .models.mvar import MVAR
from .pipeline import Pipeline, load_pipeline, random_pipeline
from .registry import register_step


@dataclass
class DraftRefineConfig:
    """The ``draft-refine`` step.

    Args:
        refiner: the refiner transformer: a shipped name, a released name (``var-d16``) or a checkpoint file.
        from_scale: the first scale the refiner generates (negative counts from the end; the number of scales:
            the drafter generates every scale and the refiner is never run).
        refiner_vae: its VQ-VAE checkpoint, where ``refiner`` is a file (it must equal the drafter's).
        refiner_config: its config JSON, where it cannot be inferred from the files.
        random_weights: the refiner is a released shape (``refiner``, e.g. ``var-d16``) with seeded random weights
            (benchmarks: timing does not depend on the weights); its VQ-VAE configuration must match.

    Example:
        >>> DraftRefineConfig(refiner="var-d16", from_scale=-2).from_scale
        -2
    """

    refiner: str = ""
    from_scale: int = -2
    refiner_vae: str | None = None
    refiner_config: str | None = None
    random_weights: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.refiner, str) or not self.refiner:
            raise ValueError(f"refiner must name a model (a shipped or released name, or a checkpoint file), "
                             f"got {self.refiner!r}")
        if isinstance(self.from_scale, bool) or not isinstance(self.from_scale, int):
            raise ValueError(f"from_scale must be a scale index (an integer), got {self.from_scale!r}")
        for key in ("refiner_vae", "refiner_config"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a file path, got {getattr(self, key)!r}")
        if not isinstance(self.random_weights, bool):
            raise ValueError(f"random_weights must be true or false, got {self.random_weights!r}")


class Refiner:
    """The refiner of a pipeline and the scale it takes over at (read by the sampler).

    Args:
        var: the refiner transformer (same VQ-VAE, classes and pyramid as the drafter).
        config: its :class:`~litevar.models.configs.VARConfig`.
        from_scale: the first scale it generates, 0..number of scales.
        name: what it was loaded from (for reports).
    """

    def __init__(self, var, config, from_scale: int, name: str) -> None:
        self.var, self.config, self.from_scale, self.name = var, config, from_scale, name

    def take_over(self, labels_B: torch.Tensor, feats: list, uncond_until: int) -> tuple:
        """Read the drafted scales ``0 .. from_scale - 1`` into a fresh KV cache and give the sampler what it needs
        to continue at ``from_scale``: ``(caches, ctx, block_mods, head_mod, level_pos, x_BLC)``.

        Args:
            labels_B: the batch's labels [B].
            feats: per scale ``1 .. from_scale``, its VQ-VAE input features [B, pn^2, Cvae] (index 0 unused).
            uncond_until: the unconditional rows are computed at scales below this one only.
        """
        var, B, si = self.var, labels_B.shape[0], self.from_scale
        cond_BD, block_mods, head_mod = var.conditioning(
            torch.cat((labels_B, torch.full_like(labels_B, self.config.num_classes))))
        level_pos = var.level_pos()
        dtype, device = next(var.parameters()).dtype, labels_B.device
        caches = AttentionComponents().make_caches(2 * B, self.config, dtype, device)
        if si > 0:
            self._prefill(cond_BD, block_mods, feats, level_pos, caches, 2 * B if uncond_until > si else B)
        ctx = AttnContext(kv_caches=caches, cfg_batch=B, scale_index=si)
        if si == 0:
            x_BLC = var.first_tokens(cond_BD, level_pos)
        else:
            x_BLC = var.next_tokens(si, feats[si], level_pos)
            x_BLC = x_BLC.repeat(2, 1, 1) if si < uncond_until else x_BLC
        if si >= uncond_until:
            x_BLC, block_mods, head_mod = x_BLC[:B], [m[:B] for m in block_mods], head_mod[:B]
            ctx.cfg_batch = None
        return caches, ctx, block_mods, head_mod, level_pos, x_BLC

    def _prefill(self, cond_BD, block_mods, feats, level_pos, caches, rows: int) -> None:
        """Every drafted scale through the blocks in one block-causal pass (the weights are read once, not once per
        scale: at batch 1 the small scales are bound by that read), writing the KV cache; no head, no logits.
        ``rows``: both CFG halves, or only the conditional one where the refiner never computes the other."""
        var, B = self.var, cond_BD.shape[0] // 2
        parts = [var.first_tokens(cond_BD[:rows], level_pos)]
        parts += [var.next_tokens(s, feats[s], level_pos).repeat(rows // B, 1, 1) for s in range(1, self.from_scale)]
        x_BLC = torch.cat(parts, 1)
        n = x_BLC.shape[1]
        ctx = AttnContext(kv_caches=caches, attn_bias=var.attn_bias_for_masking[..., :n, :n].to(x_BLC.dtype))
        for block, mod in zip(var.blocks, block_mods):
            x_BLC = block(x_BLC, mod[:rows], ctx)

    def describe(self) -> dict:
        return {"refiner": self.name, "from_scale": self.from_scale, "depth": self.config.depth}


def _load_refiner(pipe: Pipeline, config: DraftRefineConfig) -> Pipeline:
    if config.random_weights:
        if config.refiner_vae is not None or config.refiner_config is not None:
            raise ValueError("random_weights takes a released shape as refiner, without refiner_vae or refiner_config")
        return random_pipeline(config.refiner, device=pipe.device, dtype=pipe.dtype)
    return load_pipeline(config.refiner, config.refiner_vae, config.refiner_config, device=pipe.device, dtype=pipe.dtype)


def _check_shared_vae(pipe: Pipeline, refiner: Pipeline, config: DraftRefineConfig) -> None:
    mine, theirs = pipe.config, refiner.config
    if theirs.vae != mine.vae or theirs.var.patch_nums != mine.var.patch_nums:
        raise ValueError(f"refiner {config.refiner!r} has another VQ-VAE or pyramid than this model (its "
                         f"{theirs.vae}, patch_nums {theirs.var.patch_nums}); draft-refine needs one shared VQ-VAE")
    if theirs.var.num_classes != mine.var.num_classes:
        raise ValueError(f"refiner {config.refiner!r} has {theirs.var.num_classes} classes, this model "
                         f"{mine.var.num_classes}")
    if config.random_weights:
        return
    own = pipe.vae.state_dict()
    for key, value in refiner.vae.state_dict().items():
        if key not in own or own[key].shape != value.shape or not torch.equal(own[key], value):
            raise ValueError(f"refiner {config.refiner!r} comes with other VQ-VAE weights than this model ({key} "
                             "differs); draft-refine needs the drafter's VQ-VAE")


def _apply(pipe: Pipeline, config: DraftRefineConfig) -> None:
    scales = len(pipe.config.var.patch_nums)
    if not -scales <= config.from_scale <= scales:
        raise ValueError(f"from_scale {config.from_scale} is outside 0..{scales} (or -{scales}..-1)")
    refiner = _load_refiner(pipe, config)
    if isinstance(refiner.var, MVAR):
        raise ValueError(f"refiner {config.refiner!r} is an M-VAR; draft-refine needs a VAR refiner (it continues "
                         "from a KV cache)")
    _check_shared_vae(pipe, refiner, config)
    from_scale = config.from_scale % scales if config.from_scale < 0 else config.from_scale
    pipe.set_attention("refiner", Refiner(refiner.var, refiner.config.var, from_scale, config.refiner),
                       by="draft-refine")


register_step("draft-refine", DraftRefineConfig, _apply, phase="sampling")
