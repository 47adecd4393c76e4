"""M-VAR (arXiv 2411.10433): VAR's embeddings, AdaLN conditioning and head around blocks of intra-scale attention,
an inter-scale Mamba-2 and the FFN. Forward computation only; the sampler is :mod:`litevar.pipeline`'s.

Attention sees only the tokens of the current scale (block-diagonal mask under teacher forcing, no KV cache when
sampling). Mamba-2 is one causal scan over the whole flattened sequence ``[first | scale 2 | ... | last scale]``,
so it is the only path between scales. Sampling carries each block's Mamba state (conv rows and SSM state) from
one scale to the next, so a scale costs work in proportion to its own tokens; ``rescan=True`` recomputes Mamba over
the whole prefix at every scale instead, as upstream's sampler does (same outputs, for parity checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..attention.context import AttnContext
from .attention import SelfAttention
from .configs import MVARConfig, VARConfig
from .mamba2 import Mamba2, MambaState
from .var import FFN, VAR, ModulatedNorm

ADALN_CHUNKS = 9  # gamma1, gamma2, gamma3, scale1, scale2, scale3, shift1, shift2, shift3 (upstream's order)
MAX_CHUNK = 64


@dataclass
class MVARContext(AttnContext):
    """:class:`AttnContext` plus each block's Mamba carry for sampling one scale after another.

    Args:
        mamba_states: one :class:`MambaState` (or :class:`Int8MambaState`) per block (stateful sampling), or None.
        histories: with ``rescan``, each block's post-attention residual stream of every scale so far.
        rescan: recompute Mamba over the whole prefix at every scale (upstream's sampler).
    """

    mamba_states: list[MambaState] | None = None
    histories: list[torch.Tensor | None] = field(default_factory=list)
    rescan: bool = False

    def state_bytes(self) -> int:
        """Bytes of what is carried between scales: the Mamba states, or the re-scanned histories."""
        if self.rescan:
            return sum(h.numel() * h.element_size() for h in self.histories if h is not None)
        return sum(state.nbytes() for state in self.mamba_states or [])


class MVARBlock(nn.Module):
    """``x += g1 attn(LN(x)(1+s1)+b1); x += g2 mamba(LN(x)(1+s2)+b2); x += g3 ffn(LN(x)(1+s3)+b3)``."""

    def __init__(self, block_idx: int, cfg: MVARConfig) -> None:
        super().__init__()
        self.block_idx = block_idx
        self.width = cfg.width
        self.shared_aln = False
        self.lengths = [pn * pn for pn in cfg.patch_nums]
        self.attn = SelfAttention(block_idx, cfg.width, cfg.heads, cfg.attn_l2_norm)
        self.attn.register_buffer("patch_nums", torch.tensor(self.lengths, dtype=torch.int32))
        self.mamba = Mamba2(cfg.width, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim)
        self.ffn = FFN(cfg.width, cfg.hidden)
        self.norm1 = ModulatedNorm(cfg.width, cfg.norm_eps)
        self.norm2 = ModulatedNorm(cfg.width, cfg.norm_eps)
        self.norm3 = ModulatedNorm(cfg.width, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, ADALN_CHUNKS * cfg.width))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """[B, 1, 9, C] (gamma1..3, scale1..3, shift1..3) from the class embedding [B, C]."""
        return self.ada_lin(cond_BD).view(-1, 1, ADALN_CHUNKS, self.width)

    def _mamba(self, x_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        states = getattr(ctx, "mamba_states", None)
        if getattr(ctx, "rescan", False):
            previous = ctx.histories[self.block_idx]
            prefix_BLC = x_BLC if previous is None else torch.cat((previous, x_BLC), 1)
            ctx.histories[self.block_idx] = prefix_BLC
            out_BLC = self.mamba(self.norm2(prefix_BLC, scale, shift), self._chunks(prefix_BLC.shape[1]))
            return out_BLC[:, prefix_BLC.shape[1] - x_BLC.shape[1]:]
        if states is not None:
            return self.mamba(self.norm2(x_BLC, scale, shift), [x_BLC.shape[1]], states[self.block_idx])
        return self.mamba(self.norm2(x_BLC, scale, shift), self._chunks(x_BLC.shape[1]))

    def _chunks(self, length: int) -> list[int]:
        """Scale-aligned chunks for a sequence that starts at the first scale, each at most ``MAX_CHUNK`` long
        (the in-chunk form costs chunk² per chunk: 64-token pieces train ~10% faster than whole scales)."""
        sizes, total = [], 0
        for size in self.lengths:
            if total + size > length:
                break
            sizes.append(size)
            total += size
        sizes += [length - total] if length > total else []
        return [min(MAX_CHUNK, size - start) for size in sizes for start in range(0, size, MAX_CHUNK)]

    def forward(self, x_BLC: torch.Tensor, mod_B19C: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        gamma1, gamma2, gamma3, scale1, scale2, scale3, shift1, shift2, shift3 = mod_B19C.unbind(2)
        x_BLC = x_BLC + self.attn(self.norm1(x_BLC, scale1, shift1), ctx).mul_(gamma1)
        x_BLC = x_BLC + self._mamba(x_BLC, scale2, shift2, ctx).mul_(gamma2)
        return x_BLC + self.ffn(self.norm3(x_BLC, scale3, shift3)).mul(gamma3)


class MVAR(VAR):
    """M-VAR in upstream's key layout (VAR's keys, a [9C, C] ``ada_lin``, ``attn.patch_nums`` and ``mamba.*``).

    ``forward(labels, x_BLCv)`` is the teacher-forced pass (attention within each scale, one Mamba scan over all
    tokens). Sampling runs :meth:`forward_scale` scale by scale with the context from :meth:`sampling_context`.
    Set ``rescan = True`` to sample with upstream's full-prefix Mamba recomputation.

    Example:
        >>> m = MVAR(MVARConfig(depth=2, width=128, heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=64,
        ...                     z_channels=8))
        >>> m(torch.tensor([3]), torch.zeros(1, 4, 8)).shape
        torch.Size([1, 5, 64])
    """

    def __init__(self, cfg: MVARConfig) -> None:
        if not isinstance(cfg, MVARConfig):
            raise TypeError(f"MVAR needs an MVARConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        self.rescan = False

    @staticmethod
    def make_block(block_idx: int, cfg: VARConfig) -> nn.Module:
        return MVARBlock(block_idx, cfg)

    @staticmethod
    def teacher_forcing_mask(level_L: torch.Tensor) -> torch.Tensor:
        """Block-diagonal: each token attends to the tokens of its own scale only."""
        return torch.where(level_L.view(-1, 1) == level_L.view(1, -1), 0.0, -torch.inf)

    def sampling_context(self, rows: int, cfg_batch: int | None = None, state_storage: str = "model") -> MVARContext:
        """A fresh context for sampling ``rows`` rows scale by scale (zero Mamba states stored as ``state_storage``,
        or empty histories)."""
        if self.rescan:
            if state_storage != "model":
                raise ValueError(f"the rescan sampler carries no Mamba state to store as {state_storage}; "
                                 "sample with rescan = False")
            return MVARContext(cfg_batch=cfg_batch, histories=[None] * len(self.blocks), rescan=True)
        dtype, device = self.dtype, self.class_emb.weight.device
        states = [block.mamba.empty_state(rows, dtype, device, state_storage) for block in self.blocks]
        return MVARContext(cfg_batch=cfg_batch, mamba_states=states)


def build_transformer(cfg: VARConfig) -> VAR:
    """The transformer a configuration describes: :class:`MVAR` for an :class:`MVARConfig`, else :class:`VAR`."""
    return MVAR(cfg) if isinstance(cfg, MVARConfig) else VAR(cfg)
