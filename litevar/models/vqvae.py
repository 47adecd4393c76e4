"""The multi-scale VQ-VAE: LDM-style convolutional encoder/decoder around a residual quantizer.

Images are in [-1, 1] at this level (upstream convention); the pipeline maps them to [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import VQVAEConfig
from .quantizer import MultiScaleQuantizer


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # in-place SiLU on the fresh GroupNorm output saves an allocation (not under autograd)
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x_BChw), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; one 1x1 conv makes q|k|v."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        qkv_B3LC = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, H * W).transpose(2, 3)
        q, k, v = qkv_B3LC.unsqueeze(2).unbind(1)
        h_B1LC = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        h_BChw = h_B1LC.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        if x_BChw.is_contiguous(memory_format=torch.channels_last):
            h_BChw = h_BChw.contiguous(memory_format=torch.channels_last)
        return x_BChw + self.proj_out(h_BChw)


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, using_mid_sa: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        in_mult = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i in range(levels):
            block_in = cfg.ch * in_mult[i]
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            attns = [AttnBlock(block_in) for _ in range(cfg.num_res_blocks)] if (i == levels - 1 and cfg.using_sa) else []
            level = _level(blocks, attns)
            if i != levels - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _mid(block_in, cfg.using_mid_sa)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, cfg.using_mid_sa)
        up = []
        for i in reversed(range(levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            n_attn = cfg.num_res_blocks + 1 if (i == levels - 1 and cfg.using_sa) else 0
            level = _level(blocks, [AttnBlock(block_in) for _ in range(n_attn)])
            if i != 0:
                level.upsample = Upsample2x(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BChw)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Encoder/decoder plus the multi-scale residual quantizer, in the released key layout.

    The quantizer always runs in float32 (f_hat accumulates residuals over all scales); encoder and
    decoder run in the dtype given to :meth:`cast_`, channels-last below float32 (oneDNN's fast layout;
    float32 keeps the default layout, which reproduces the reference to 1e-5).

    Example:
        >>> vae = VQVAE(VQVAEConfig(ch=32, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4, 6)))
        >>> idx = vae.img_to_idx(torch.zeros(1, 3, 96, 96))
        >>> vae.idx_to_img(idx).shape
        torch.Size([1, 3, 96, 96])
    """

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        pad = cfg.quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, 1, pad)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks, 1, pad)
        self.memory_format = torch.contiguous_format

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype  # cast with the decoder, never quantized

    def cast_(self, dtype: torch.dtype, channels_last: bool | None = None) -> "VQVAE":
        """Cast encoder/decoder weights once to ``dtype``; the quantizer stays float32.

        ``channels_last`` defaults to True below float32."""
        if channels_last is None:
            channels_last = dtype != torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for part in (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv):
            part.to(dtype=dtype, memory_format=self.memory_format)
        return self

    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``quant_conv(encoder(img))`` (float32), image in [-1, 1]."""
        x = img_B3HW.to(self.compute_dtype).contiguous(memory_format=self.memory_format)
        return self.quant_conv(self.encoder(x)).float().contiguous()

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale token indices (list of LongTensor [B, pn*pn]) of images in [-1, 1]."""
        size = self.cfg.image_size
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != self.cfg.in_channels or img_B3HW.shape[2:] != (size, size):
            raise ValueError(f"expected images of shape [B, {self.cfg.in_channels}, {size}, {size}] in [-1, 1], "
                             f"got {list(img_B3HW.shape)}")
        return self.quantize.f_to_idx(self.img_to_f(img_B3HW))

    @torch.no_grad()
    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode the accumulated latent to an image in [-1, 1]."""
        z = f_hat_BChw.to(self.compute_dtype).contiguous(memory_format=self.memory_format)
        return self.decoder(self.post_quant_conv(z)).float().clamp_(-1, 1).contiguous()

    @torch.no_grad()
    def idx_to_img(self, idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Decode per-scale token indices to images in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_Bl))
