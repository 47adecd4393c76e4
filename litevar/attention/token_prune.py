"""FastVAR-style cached token pruning at the late scales (the ``token-prune`` recipe step).

At a pruned scale, layers ``[from_layer, until_layer)`` run on the "pivotal" tokens only: a real, shorter batch
(gathered before ``from_layer``, scattered back after ``until_layer - 1``), so the other tokens compute no q/k/v,
attention, MLP or KV-cache entry there. Pivotal tokens are those whose hidden state at the entry of ``from_layer``
deviates most (squared L2) from the scale's mean (``deviation``, FastVAR's score) or from the previous scale's
hidden state at the same layer upsampled to this grid (``upsampled``).

A pruned token is restored from the previous scale (FastVAR's cached token restoration): what the pruned layers
added to the previous scale's hidden states (exit minus entry, ``[p, p]`` grid) is upsampled to this scale's grid
and added to the token's own entry state. Per layer this is FastVAR's restoration of each residual branch from the
cached branch outputs of the previous scale; with one selection for all pruned layers the branches of a pruned
token only reach the head, so their sum is restored once (interpolation is linear). The previous scale's states
are the restored ones when it was pruned too.

The KV cache stores what is computed: the pruned layers append only the kept tokens' keys/values, and later scales
attend to the keys that exist (KV-cached attention has no mask, so missing keys are simply absent). Steps that
index keys by position (``mdwa`` window plans, ``kv-compress`` budgets) are refused with it. With classifier-free
guidance the two rows of an image keep the same positions (scores summed over the pair), so CFG output or
probability sharing (``asc``) copies between matching tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..registry import register_step
from .token_subset import tokens_of_scale

CRITERIA = ("deviation", "upsampled")
UPSAMPLERS = ("area", "bilinear", "bicubic", "nearest")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_share(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


@dataclass
class TokenPruneConfig:
    """Cached token pruning at chosen scales (the ``token-prune`` recipe step).

    Args:
        scales: the pruned scales (negative counts from the end: -1 is the last); not scale 0, which has no
            previous scale to restore from. Empty: nothing is pruned.
        from_layer: the first pruned layer (0-based); the pivotal tokens are chosen at its entry.
        until_layer: the layer after the last pruned one (exclusive); None: every layer from ``from_layer`` on.
            Layers from here on run on every token again (FastVAR keeps its last layers dense).
        keep: the share of a scale's tokens that go through the pruned layers, in (0, 1] (rounded to the nearest
            token, at least one), one number for every listed scale or one per scale in ``scales``' order.
        criterion: "deviation" (largest distance from the scale's mean hidden state) or "upsampled" (largest
            distance from the previous scale's hidden state at the same layer, upsampled to this grid).
        upsample: how the previous scale's grid is brought to this one (``torch.nn.functional.interpolate`` mode):
            "area" (FastVAR's), "bilinear", "bicubic" or "nearest".

    Example:
        >>> TokenPruneConfig(scales=[-1], keep=0.5).criterion
        'deviation'
    """

    scales: list = field(default_factory=lambda: [-2, -1])
    from_layer: int = 2
    until_layer: int | None = None
    keep: float | list = 0.5
    criterion: str = "deviation"
    upsample: str = "area"

    def __post_init__(self) -> None:
        if not isinstance(self.scales, (list, tuple)) or not all(_is_int(s) for s in self.scales):
            raise ValueError(f"scales must be a list of scale indices (integers), got {self.scales!r}")
        self.scales = [int(s) for s in self.scales]
        if not _is_int(self.from_layer) or self.from_layer < 0:
            raise ValueError(f"from_layer must be a layer index >= 0, got {self.from_layer!r}")
        if self.until_layer is not None and (not _is_int(self.until_layer) or self.until_layer <= self.from_layer):
            raise ValueError(f"until_layer must be None or a layer index after from_layer {self.from_layer} "
                             f"(exclusive end), got {self.until_layer!r}")
        if isinstance(self.keep, (list, tuple)):
            if len(self.keep) != len(self.scales) or not all(_is_share(k) for k in self.keep):
                raise ValueError(f"keep must be a share in (0, 1], or one per scale of {self.scales}, "
                                 f"got {self.keep!r}")
            self.keep = [float(k) for k in self.keep]
        elif not _is_share(self.keep):
            raise ValueError(f"keep must be a share of the tokens in (0, 1] (1 keeps every token), got {self.keep!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.upsample not in UPSAMPLERS:
            raise ValueError(f"upsample must be one of {UPSAMPLERS}, got {self.upsample!r}")


@dataclass
class PruneState:
    """What one generation carries from a scale to the next pruned one: the previous scale's hidden states at the
    entry of the first pruned layer and at the exit of the last one, ``[rows, p * p, C]`` each (None: nothing).

    Example:
        >>> PruneState().entry is None
        True
    """

    entry: torch.Tensor | None = None
    exit: torch.Tensor | None = None

    def previous(self, rows: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous scale's (entry, exit) for ``rows`` rows (its first rows once the unconditional ones are
        dropped)."""
        if self.entry is None or self.exit is None:
            raise RuntimeError(f"token pruning at scale {scale} needs the previous scale's hidden states: run the "
                               "scales in order (Pipeline.generate does)")
        return self.entry[:rows], self.exit[:rows]


@dataclass(frozen=True)
class TokenPrunePlan:
    """A :class:`TokenPruneConfig` resolved for one model: the attention component ``tokens``.

    Args:
        kept: ``{scale index: tokens kept}`` for every scale that prunes (scales keeping all tokens are left out).
        first, end: the pruned layers ``[first, end)``.
        criterion, upsample: see :class:`TokenPruneConfig`.
        patch_nums: the model's pyramid.

    Example:
        >>> plan = TokenPrunePlan.from_config(TokenPruneConfig(scales=[-1], from_layer=1), (1, 2, 4), depth=2)
        >>> plan.kept, plan.cached_tokens(1, 2), plan.reserved_len(0)
        ({2: 8}, 8, 21)
    """

    kept: dict
    first: int
    end: int
    criterion: str
    upsample: str
    patch_nums: tuple

    @classmethod
    def from_config(cls, config: TokenPruneConfig, patch_nums, depth: int) -> "TokenPrunePlan":
        K = len(patch_nums)
        if config.from_layer >= depth:
            raise ValueError(f"from_layer {config.from_layer} is outside the model's layers 0..{depth - 1}")
        end = depth if config.until_layer is None else config.until_layer
        if end > depth:
            raise ValueError(f"until_layer {end} is past the model's last layer (at most {depth}, or None)")
        shares = config.keep if isinstance(config.keep, list) else [config.keep] * len(config.scales)
        kept: dict[int, int] = {}
        for index, share in zip(config.scales, shares):
            if not -K <= index < K:
                raise ValueError(f"scale {index} is outside the model's scales 0..{K - 1} (or -{K}..-1)")
            scale = index % K
            if scale == 0:
                raise ValueError("scale 0 cannot be pruned: it has no previous scale to restore the pruned tokens from")
            if scale in kept:
                raise ValueError(f"scales {config.scales} name scale {scale} twice")
            tokens = patch_nums[scale] ** 2
            kept[scale] = max(1, min(tokens, int(share * tokens + 0.5)))
        kept = {s: n for s, n in sorted(kept.items()) if n < patch_nums[s] ** 2}
        return cls(kept, config.from_layer, end, config.criterion, config.upsample, tuple(patch_nums))

    def prunes(self, layer: int) -> bool:
        return self.first <= layer < self.end

    def cached_tokens(self, layer: int, scale: int) -> int:
        """Tokens layer ``layer`` computes (and caches) at scale ``scale``."""
        if scale in self.kept and self.prunes(layer):
            return self.kept[scale]
        return self.patch_nums[scale] ** 2

    def reserved_len(self, layer: int) -> int:
        """KV-cache tokens layer ``layer`` needs for a whole generation."""
        return sum(self.cached_tokens(layer, s) for s in range(len(self.patch_nums)))

    def describe(self) -> dict:
        return {"kept": {str(s): n for s, n in self.kept.items()}, "layers": [self.first, self.end],
                "criterion": self.criterion, "upsample": self.upsample}

    def forward_scale(self, var, x_BLC: torch.Tensor, block_mods: list, head_mod: torch.Tensor, ctx,
                      state: PruneState) -> torch.Tensor:
        """``var.forward_scale`` with this scale's tokens pruned in the pruned layers (as dense where it keeps every
        token); float32 logits [rows, pn * pn, V]. Remembers in ``state`` what the next pruned scale restores from."""
        si = ctx.scale_index
        blocks = var.blocks
        for layer in range(self.first):
            x_BLC = blocks[layer](x_BLC, block_mods[layer], ctx)
        entry_BLC = x_BLC
        if si in self.kept:
            x_BLC = self._pruned(blocks, entry_BLC, block_mods, ctx, state)
        else:
            for layer in range(self.first, self.end):
                x_BLC = blocks[layer](x_BLC, block_mods[layer], ctx)
        if si + 1 in self.kept:
            state.entry, state.exit = entry_BLC, x_BLC
        else:
            state.entry = state.exit = None
        for layer in range(self.end, len(blocks)):
            x_BLC = blocks[layer](x_BLC, block_mods[layer], ctx)
        return var.head(var.head_nm(x_BLC, head_mod)).float()

    def _pruned(self, blocks, entry_BLC: torch.Tensor, block_mods: list, ctx, state: PruneState) -> torch.Tensor:
        si = ctx.scale_index
        rows, tokens, C = entry_BLC.shape
        prev_entry, prev_exit = state.previous(rows, si)
        index_Bn = self._select(entry_BLC, prev_entry, si, ctx.cfg_batch)
        index_BnC = index_Bn.unsqueeze(-1).expand(-1, -1, C)
        x_BnC = entry_BLC.gather(1, index_BnC)
        with tokens_of_scale(si):  # static per-scale quantization groups: these calls are scale si's tokens
            for layer in range(self.first, self.end):
                x_BnC = blocks[layer](x_BnC, block_mods[layer], ctx)
        added_BLC = self._upsampled(prev_exit.float() - prev_entry.float(), si)
        restored_BLC = (entry_BLC.float() + added_BLC).to(entry_BLC.dtype)
        return restored_BLC.scatter_(1, index_BnC, x_BnC)

    def _upsampled(self, x_BpC: torch.Tensor, si: int) -> torch.Tensor:
        """float32 [rows, p * p, C] of the previous scale -> [rows, pn * pn, C] of scale ``si``."""
        rows, _, C = x_BpC.shape
        p, pn = self.patch_nums[si - 1], self.patch_nums[si]
        grid = x_BpC.float().transpose(1, 2).reshape(rows, C, p, p)
        corners = {"align_corners": False} if self.upsample in ("bilinear", "bicubic") else {}
        up = F.interpolate(grid, size=(pn, pn), mode=self.upsample, **corners)
        return up.reshape(rows, C, pn * pn).transpose(1, 2)

    def _select(self, entry_BLC: torch.Tensor, prev_entry: torch.Tensor | None, si: int,
                cfg_batch: int | None) -> torch.Tensor:
        """Positions [rows, kept] (ascending) of scale ``si``'s pivotal tokens; the two CFG rows of an image share
        them (their scores summed)."""
        x = entry_BLC.float()
        if self.criterion == "deviation":
            score_BL = (x - x.mean(dim=1, keepdim=True)).square().sum(-1)
        else:
            score_BL = (x - self._upsampled(prev_entry, si)).square().sum(-1)
        paired = cfg_batch is not None and score_BL.shape[0] == 2 * cfg_batch
        if paired:
            score_BL = score_BL[:cfg_batch] + score_BL[cfg_batch:]
        index = score_BL.topk(self.kept[si], dim=1).indices.sort(dim=1).values
        return torch.cat((index, index)) if paired else index


def _apply(pipe, config: TokenPruneConfig) -> None:
    cfg = pipe.config.var
    if pipe.config.arch == "mvar":
        raise ValueError("step 'token-prune' cannot run on an M-VAR (its Mamba scan runs over every token of a "
                         "scale, in order): remove the step")
    try:
        plan = TokenPrunePlan.from_config(config, cfg.patch_nums, cfg.depth)
    except ValueError as err:
        raise ValueError(f"step 'token-prune': {err}") from None
    pipe.set_attention("tokens", plan, by="token-prune")


register_step("token-prune", TokenPruneConfig, _apply, phase="sampling")
