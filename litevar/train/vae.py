"""Multi-scale residual VQ-VAE training (the tokenizer VAR needs; upstream never released this code).

Loss = L1 + MSE reconstruction + the VQ losses averaged over scales (codebook term pulls f_hat to the
encoder output, commitment term ``beta`` pulls the encoder to f_hat); straight-through gradients to the
encoder. Codes that fall out of use are restarted on encoder outputs of the current batch, so most of
the codebook stays in use.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import ImageSet, random_flip, to_model_range
from ..models.configs import VQVAEConfig
from ..models.quantizer import MultiScaleQuantizer
from ..models.vqvae import VQVAE
from .export import read_model, save_model
from .loop import TrainConfig, Trainer

VAE_WEIGHTS = "vae.safetensors"


def quantize_with_losses(quantizer: MultiScaleQuantizer, f_BChw: torch.Tensor, beta: float
                         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Training-time residual quantization.

    Returns the straight-through f_hat (gradient flows to ``f``), the VQ loss, per-scale indices [B, pn^2]
    and per-scale residual vectors [B * pn^2, C] (candidates for restarting dead codes).
    """
    B, C, H, W = f_BChw.shape
    f_target = f_BChw.detach()
    f_rest = f_target.clone()
    f_hat = torch.zeros_like(f_target)
    vq_loss = f_BChw.new_zeros(())
    indices, residuals = [], []
    last = len(quantizer.patch_nums) - 1
    for si, pn in enumerate(quantizer.patch_nums):
        z_BChw = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
        z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
        idx_N = quantizer.nearest(z_NC)
        h_BChw = quantizer.upsample_refine(si, quantizer.embedding(idx_N).view(B, pn, pn, C).permute(0, 3, 1, 2))
        f_hat = f_hat + h_BChw
        f_rest = f_rest - h_BChw.detach()
        vq_loss = vq_loss + F.mse_loss(f_hat, f_target) + beta * F.mse_loss(f_hat.detach(), f_BChw)
        indices.append(idx_N.view(B, pn * pn))
        residuals.append(z_NC)
    straight_through = f_BChw + (f_hat - f_BChw).detach() + (f_hat - f_hat.detach())
    return straight_through, vq_loss / len(quantizer.patch_nums), indices, residuals


@torch.no_grad()
def track_and_restart_codes(quantizer: MultiScaleQuantizer, indices: list[torch.Tensor],
                            residuals: list[torch.Tensor], generator: torch.Generator, restart: bool,
                            decay: float = 0.99) -> int:
    """Update the per-scale hit EMA (``ema_vocab_hit_SV``, upstream's buffer); when ``restart``, move codes
    hit less than once per step on average to random residual vectors of this batch. Returns how many moved."""
    V = quantizer.embedding.num_embeddings
    hits_SV = torch.stack([torch.bincount(idx.flatten(), minlength=V).float() for idx in indices])
    quantizer.ema_vocab_hit_SV.mul_(decay).add_(hits_SV, alpha=1 - decay)
    if not restart:
        return 0
    dead = (quantizer.ema_vocab_hit_SV.sum(0) < 1.0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    pool = torch.cat(residuals).float()
    pick = torch.randint(len(pool), (len(dead),), generator=generator)
    quantizer.embedding.weight[dead] = pool[pick]
    quantizer.ema_vocab_hit_SV[:, dead] = hits_SV.sum(1, keepdim=True).div(V)  # a fair share: not dead next time
    return len(dead)


def train_vae(data: ImageSet, cfg: VQVAEConfig, train: TrainConfig, out_dir: str | Path, beta: float = 0.25,
              restart_every: int = 50, flip: bool = True, progress: bool = True) -> dict:
    """Train a multi-scale VQ-VAE on ``data`` (uint8 images of ``cfg.image_size``); resumable in ``out_dir``.

    Writes ``vae.safetensors`` (the model, config in the metadata), ``loss.png``, ``log.jsonl`` and
    ``done.json`` (summary). Returns the summary.

    Example:
        >>> train_vae(load_fashion_mnist("train"), VQVAEConfig(ch=32, ch_mult=(1, 2), ...),
        ...           TrainConfig(steps=3000, batch_size=64, lr=1e-3), "runs/vae")
    """
    if data.images.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images are {data.images.shape[1]}x{data.images.shape[2]} but the VQ-VAE config makes "
                         f"{cfg.image_size}x{cfg.image_size} images; load the data at size {cfg.image_size}")
    torch.manual_seed(train.seed)
    vae = VQVAE(cfg)
    trainer = Trainer(out_dir, vae, train, run={"kind": "vae", "vae": asdict(cfg), "beta": beta,
                                                "restart_every": restart_every, "flip": flip,
                                                "data_items": len(data)}, progress=progress)
    if trainer.done:
        return trainer.finish()
    images = torch.from_numpy(data.images)
    vae.train()
    for step, idx in trainer.batches(len(data)):
        gen = trainer.step_generator()
        x = to_model_range(images[idx])
        if flip:
            x = random_flip(x, gen)
        with trainer.autocast():
            f = vae.quant_conv(vae.encoder(x))
        f_hat, vq_loss, indices, residuals = quantize_with_losses(vae.quantize, f.float(), beta)
        with trainer.autocast():
            rec = vae.decoder(vae.post_quant_conv(f_hat)).float()
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        moved = track_and_restart_codes(vae.quantize, indices, residuals, gen, restart=step % restart_every == 0
                                        and step < train.steps * 0.9)
        trainer.update(rec_loss + vq_loss, {"rec": rec_loss.item(), "vq": vq_loss.item(), "restarted": moved})
    used = (vae.quantize.ema_vocab_hit_SV.sum(0) > 0.01).float().mean().item()
    save_model(Path(out_dir) / VAE_WEIGHTS, vae.state_dict(), {"vae": asdict(cfg)})
    return trainer.finish({"codebook_usage_ema": round(used, 4)})


def load_trained_vae(path: str | Path) -> VQVAE:
    """A VQ-VAE saved by :func:`train_vae` (config from the file's metadata), in eval mode without grads."""
    from ..models.loading import CheckpointError, load_strict

    state, meta = read_model(path)
    if "vae" not in meta:
        raise CheckpointError(f"{path} has no litevar VQ-VAE config in its metadata; is it a VQ-VAE from train_vae?")
    cfg = VQVAEConfig(**{**meta["vae"], "ch_mult": tuple(meta["vae"]["ch_mult"]),
                         "patch_nums": tuple(meta["vae"]["patch_nums"])})
    vae = load_strict(VQVAE(cfg), state, f"VQ-VAE {path}")
    return vae.eval().requires_grad_(False)
