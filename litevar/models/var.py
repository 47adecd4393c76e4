"""The VAR transformer: embeddings, AdaLN blocks and the AdaLN head. Forward computation only.

Sampling (the scale loop, CFG, top-k/top-p) lives in :mod:`litevar.pipeline`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.context import AttnContext
from .attention import SelfAttention
from .configs import MVARConfig, VARConfig


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class ModulatedNorm(nn.Module):
    """``LN(x) * (unit + scale) + shift`` without affine weights; ``unit`` is 1 until a transform folds an input
    scale into it (then it is a per-channel buffer that this module saves and restores)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.eps = eps
        self.register_buffer("unit", None)

    def scale_unit(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.add(1 if self.unit is None else self.unit)

    def forward(self, x_BLC: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_BLC, (self.width,), eps=self.eps).mul(self.scale_unit(scale)).add_(shift)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "unit")
        if saved is not None and self.unit is None:  # a folded model's state: the buffer comes back with it
            self.unit = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class AdaLNBlock(nn.Module):
    """``x += g1 * attn(LN(x)(1+s1)+b1); x += g2 * ffn(LN(x)(1+s2)+b2)``, modulation from the class."""

    def __init__(self, block_idx: int, cfg: VARConfig) -> None:
        super().__init__()
        self.width = cfg.width
        self.shared_aln = cfg.shared_aln
        self.attn = SelfAttention(block_idx, cfg.width, cfg.heads, cfg.attn_l2_norm)
        self.ffn = FFN(cfg.width, cfg.hidden)
        self.norm1 = ModulatedNorm(cfg.width, cfg.norm_eps)
        self.norm2 = ModulatedNorm(cfg.width, cfg.norm_eps)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, cfg.width) / cfg.width ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """[B, 1, 6, C] (gamma1, gamma2, scale1, scale2, shift1, shift2) from the class embedding [B, C]
        or, with a shared AdaLN, from the shared projection [B, 1, 6, C]."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.width)

    def forward(self, x_BLC: torch.Tensor, mod_B16C: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
        x_BLC = x_BLC + self.attn(self.norm1(x_BLC, scale1, shift1), ctx).mul_(gamma1)
        return x_BLC + self.ffn(self.norm2(x_BLC, scale2, shift2)).mul(gamma2)


class AdaLNHead(nn.Module):
    """``LN(x)(1+scale)+shift`` with (scale, shift) from the class embedding; keys ``head_nm.ada_lin.1``."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.width = cfg.width
        self.norm = ModulatedNorm(cfg.width, cfg.norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.width)

    def forward(self, x_BLC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = mod_B12C.unbind(2)
        return self.norm(x_BLC, scale, shift)


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer in the released key layout.

    ``forward(labels, x_BLCv)`` is the teacher-forced pass (all scales at once, block-causal mask).
    KV-cached sampling calls :meth:`conditioning`, :meth:`first_tokens`, :meth:`next_tokens` and
    :meth:`forward_scale`.

    Example:
        >>> var = VAR(VARConfig(depth=2, width=128, heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=64,
        ...                     z_channels=8))
        >>> var(torch.tensor([3]), torch.zeros(1, 4, 8)).shape
        torch.Size([1, 5, 64])
    """

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        if isinstance(cfg, MVARConfig) and type(self).make_block is VAR.make_block:
            raise TypeError("an MVARConfig describes an M-VAR: build it with litevar.models.mvar.MVAR "
                            "(or build_transformer)")
        self.cfg = cfg
        C, L = cfg.width, cfg.seq_len
        first_l = cfg.patch_nums[0] ** 2
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(self.make_block(i, cfg) for i in range(cfg.depth))
        self.head_nm = AdaLNHead(cfg)
        self.head = nn.Linear(C, cfg.vocab_size)
        level_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(cfg.patch_nums)])
        self.register_buffer("lvl_1L", level_L.view(1, L))
        self.register_buffer("attn_bias_for_masking", self.teacher_forcing_mask(level_L).view(1, 1, L, L))
        self.begin_ends = []
        cur = 0
        for pn in cfg.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

    @staticmethod
    def make_block(block_idx: int, cfg: VARConfig) -> nn.Module:
        return AdaLNBlock(block_idx, cfg)

    @staticmethod
    def teacher_forcing_mask(level_L: torch.Tensor) -> torch.Tensor:
        """The additive attention mask [L, L] of the teacher-forced pass: block-causal over scales."""
        return torch.where(level_L.view(-1, 1) >= level_L.view(1, -1), 0.0, -torch.inf)

    @property
    def dtype(self) -> torch.dtype:
        return self.class_emb.weight.dtype  # the embedding is never quantized

    def set_attn_processor(self, processor) -> None:
        """Set one processor for every block, or ``{block_idx: processor}`` for some."""
        chosen = processor if isinstance(processor, dict) else dict.fromkeys(range(len(self.blocks)), processor)
        for idx, proc in chosen.items():
            self.blocks[idx].attn.set_processor(proc)

    def conditioning(self, labels_B: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Class embeddings [B, C], every block's AdaLN modulation and the head's (computed once)."""
        cond_BD = self.class_emb(labels_B)
        shared = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.cfg.width) if self.cfg.shared_aln else cond_BD
        block_mods = [block.modulation(shared) for block in self.blocks]
        return cond_BD, block_mods, self.head_nm.modulation(cond_BD)

    def level_pos(self) -> torch.Tensor:
        """Level plus position embedding of every token [1, L, C]."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_tokens(self, cond_BD: torch.Tensor, level_pos_1LC: torch.Tensor) -> torch.Tensor:
        first_l = self.pos_start.shape[1]
        B = cond_BD.shape[0]
        return cond_BD.unsqueeze(1).expand(B, first_l, -1) + self.pos_start.expand(B, first_l, -1) + level_pos_1LC[:, :first_l]

    def next_tokens(self, si: int, feats_BlCv: torch.Tensor, level_pos_1LC: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale ``si`` from the VQ-VAE features [B, pn^2, Cvae]."""
        begin, end = self.begin_ends[si]
        return self.word_embed(feats_BlCv.to(self.dtype)) + level_pos_1LC[:, begin:end]

    def forward_scale(self, x_BLC: torch.Tensor, block_mods: list[torch.Tensor], head_mod: torch.Tensor,
                      ctx: AttnContext) -> torch.Tensor:
        """Run tokens through every block and the head; float32 logits [B, L, V]."""
        for block, mod in zip(self.blocks, block_mods):
            x_BLC = block(x_BLC, mod, ctx)
        return self.head(self.head_nm(x_BLC, head_mod)).float()

    def forward(self, labels_B: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] for labels [B] and inputs [B, L - first_l, Cvae] (no label dropout)."""
        B = labels_B.shape[0]
        expected = (B, self.cfg.seq_len - self.pos_start.shape[1], self.cfg.z_channels)
        if tuple(x_BLCv.shape) != expected:
            raise ValueError(f"teacher-forcing input must be {list(expected)}, got {list(x_BLCv.shape)}")
        cond_BD, block_mods, head_mod = self.conditioning(labels_B)
        sos = cond_BD.unsqueeze(1).expand(B, self.pos_start.shape[1], -1) + self.pos_start
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv.to(self.dtype))), dim=1) + self.level_pos()
        return self.forward_scale(x_BLC, block_mods, head_mod, AttnContext(attn_bias=self.attn_bias_for_masking))
