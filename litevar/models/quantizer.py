"""Multi-scale residual vector quantizer with the partially shared Phi refiners."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import VQVAEConfig


class Phi(nn.Conv2d):
    """``Phi(h) = (1 - r) h + r conv3x3(h)``: refines an upsampled scale before it joins f_hat."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.ratio) + super().forward(h_BChw).mul_(self.ratio)


class PhiSet(nn.Module):
    """The Phi convs and which one each scale uses (nearest tick to ``k / (K - 1)``).

    Key layout follows the released files: ``qresi_ls.{i}`` (partially shared), ``qresi`` (shared),
    ``{i}`` (one per scale); with ``quant_resi == 0`` Phi is the identity and has no weights.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        n_scales = len(cfg.patch_nums)
        count = cfg.share_quant_resi or n_scales
        if abs(cfg.quant_resi) <= 1e-6:
            convs: list[nn.Module] = [nn.Identity()] * count
        else:
            convs = [Phi(cfg.z_channels, cfg.quant_resi) for _ in range(count)]
        if cfg.share_quant_resi == 1:
            self.qresi = convs[0]
        elif cfg.share_quant_resi == 0:
            for i, conv in enumerate(convs):
                self.add_module(str(i), conv)
        else:
            self.qresi_ls = nn.ModuleList(convs)
        self.convs = convs
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        ticks = np.linspace(margin, 1 - margin, count)
        ratios = [si / max(n_scales - 1, 1) for si in range(n_scales)]
        self.conv_of_scale = [int(np.argmin(np.abs(ticks - r))) for r in ratios]

    def forward(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.convs[self.conv_of_scale[si]](h_BChw)


class MultiScaleQuantizer(nn.Module):
    """Residual quantization of a latent over a pyramid of token maps (VAR's VQVAE quantizer).

    Scale k: area-downsample the residual to ``pn x pn``, take the nearest codebook entry (L2), upsample
    it bicubically to full size, refine with Phi, add to ``f_hat`` and subtract from the residual.
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.channels = cfg.z_channels
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.quant_resi = PhiSet(cfg)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    def upsample_refine(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """Scale si's token map [B, C, pn, pn] bicubically upsampled to the last scale's size, then Phi."""
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
        return self.quant_resi(si, h_BChw)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook vector for each row (squared L2, no normalisation)."""
        codebook = self.embedding.weight
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Quantize a latent into per-scale indices (list of LongTensor [B, pn*pn])."""
        B, C, H, W = f_BChw.shape
        if (H, W) != (self.patch_nums[-1],) * 2 or C != self.channels:
            raise ValueError(f"latent must be [B, {self.channels}, {self.patch_nums[-1]}, {self.patch_nums[-1]}], "
                             f"got {list(f_BChw.shape)}")
        f_rest = f_BChw.detach().float().clone()
        idx_list = []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx_N = self.nearest(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.upsample_refine(si, self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2).contiguous())
            f_rest.sub_(h_BChw)
            idx_list.append(idx_N.reshape(B, pn * pn))
        return idx_list

    def add_scale(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor | None:
        """Add scale ``si``'s token features ``h`` [B, C, pn, pn] to ``f_hat`` (in place).

        Returns the next scale's input features [B, pn_next^2, C] (area-downsampled f_hat), or None after
        the last scale.
        """
        f_hat_BChw.add_(self.upsample_refine(si, h_BChw))
        if si == len(self.patch_nums) - 1:
            return None
        pn_next = self.patch_nums[si + 1]
        B = f_hat_BChw.shape[0]
        return F.interpolate(f_hat_BChw, size=(pn_next, pn_next), mode="area").view(B, self.channels, -1).transpose(1, 2)

    def _check_idx(self, idx_Bl: list[torch.Tensor], scales: int) -> None:
        if len(idx_Bl) < scales:
            raise ValueError(f"expected token indices for {scales} scales, got {len(idx_Bl)}")
        for si in range(scales):
            pn = self.patch_nums[si]
            if idx_Bl[si].ndim != 2 or idx_Bl[si].shape[1] != pn * pn:
                raise ValueError(f"scale {si} indices must be [B, {pn * pn}], got {list(idx_Bl[si].shape)}")

    def _features(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        pn = self.patch_nums[si]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.channels, pn, pn)

    def idx_to_fhat(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Sum of all scales' refined token maps: the latent the decoder sees."""
        self._check_idx(idx_Bl, len(self.patch_nums))
        side = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(idx_Bl[0].shape[0], self.channels, side, side)
        for si in range(len(self.patch_nums)):
            self.add_scale(si, f_hat, self._features(si, idx_Bl[si]))
        return f_hat

    def idx_to_var_input(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input [B, L - first_l, C]: each scale's input is f_hat so far, area-downsampled."""
        self._check_idx(idx_Bl, len(self.patch_nums) - 1)
        side = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(idx_Bl[0].shape[0], self.channels, side, side)
        inputs = [self.add_scale(si, f_hat, self._features(si, idx_Bl[si])) for si in range(len(self.patch_nums) - 1)]
        return torch.cat(inputs, dim=1)
