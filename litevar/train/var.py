"""VAR training: block-causal teacher forcing on a frozen VQ-VAE's token pyramids, label dropout for CFG.

The dataset is tokenized once (cached next to the run, tied to the VQ-VAE file's hash); every step builds
the teacher-forcing input from the tokens (``idx_to_var_input``) and trains on cross-entropy over all
scales, as upstream VAR does.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import ImageSet, to_model_range
from ..files import reading, write_atomic
from ..models.configs import MVARConfig, VARConfig
from ..models.mvar import MVAR, build_transformer
from ..models.var import VAR
from ..models.vqvae import VQVAE
from .export import save_model
from .loop import TrainConfig, Trainer, TrainingError
from .vae import load_trained_vae

VAR_WEIGHTS = "var.safetensors"
TOKENS_FILE = "tokens.pt"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@torch.no_grad()
def init_var_weights(var: VAR, init_adaln: float = 0.5, init_gamma: float = 1e-5, init_head: float = 0.02) -> None:
    """Initialisation for training from scratch: small truncated-normal weights, AdaLN gammas near zero
    (every block starts close to the identity), a small head, residual outputs scaled by depth."""
    width, depth = var.cfg.width, var.cfg.depth
    std = math.sqrt(1 / width / 3)
    for module in var.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std)
    for param in (var.pos_start, var.pos_1LC):
        nn.init.trunc_normal_(param, std=std)
    var.head.weight.mul_(init_head)
    var.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    gammas = 3 if isinstance(var, MVAR) else 2
    for block in var.blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if not var.cfg.shared_aln:
            ada = block.ada_lin[-1].weight
            ada[:gammas * width].mul_(init_gamma)
            ada[gammas * width:].mul_(init_adaln)
        if isinstance(var, MVAR):
            init_mamba_weights(block.mamba, depth)


@torch.no_grad()
def init_mamba_weights(mamba: nn.Module, depth: int, dt_range: tuple[float, float] = (1e-3, 0.1)) -> None:
    """Mamba-2's own initialisation for the SSM parameters (step sizes log-uniform in ``dt_range``, decay rates
    uniform in [1, 16], D = 1, a unit norm), a small conv, and ``out_proj`` scaled by depth like the other residual
    outputs (upstream M-VAR leaves it unscaled and gives the FFN's gamma a large start: not repeated here)."""
    heads = mamba.dt_bias.numel()
    log_dt = torch.rand(heads) * (math.log(dt_range[1]) - math.log(dt_range[0])) + math.log(dt_range[0])
    dt = log_dt.exp().clamp_min(1e-4)
    mamba.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
    mamba.A_log.copy_(torch.empty(heads).uniform_(1, 16).log())
    mamba.D.fill_(1.0)
    mamba.norm.weight.fill_(1.0)
    nn.init.trunc_normal_(mamba.conv1d.weight, std=0.02)
    mamba.conv1d.bias.zero_()
    mamba.out_proj.weight.div_(math.sqrt(2 * depth))


@torch.no_grad()
def tokenize(vae: VQVAE, data: ImageSet, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Token pyramids of every image, concatenated over scales: int16 [N, L]."""
    out = []
    for start in tqdm(range(0, len(data), batch_size), disable=not progress, desc="tokenize"):
        idx = vae.img_to_idx(to_model_range(data.images[start:start + batch_size]))
        out.append(torch.cat(idx, dim=1).to(torch.int16))
    return torch.cat(out)


def cached_tokens(vae: VQVAE, vae_path: Path, data: ImageSet, progress: bool) -> torch.Tensor:
    """Tokens cached next to the VQ-VAE file (shared by every VAR run on it), recomputed when the VQ-VAE file
    or the data differ."""
    key = f"{file_sha256(vae_path)}:{len(data)}:{hashlib.sha256(data.images.tobytes()).hexdigest()[:16]}"
    path = vae_path.parent / TOKENS_FILE
    if path.exists():
        with reading(path, TrainingError, "token cache", "delete it to tokenize the data again"):
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                if not isinstance(cached["tokens"], torch.Tensor) or len(cached["tokens"]) != len(data):
                    raise TrainingError("its tokens are not one row per image")
                return cached["tokens"]
    tokens = tokenize(vae, data, progress=progress)
    write_atomic(path, lambda tmp: torch.save({"key": key, "tokens": tokens}, tmp))
    return tokens


def teacher_forcing_batch(vae: VQVAE, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(VAR input [B, L - first_l, Cvae], targets [B, L]) from concatenated token pyramids."""
    targets = tokens_BL.long()
    sizes = [pn * pn for pn in vae.cfg.patch_nums]
    with torch.no_grad():
        x_BLCv = vae.quantize.idx_to_var_input(list(targets.split(sizes, dim=1)))
    return x_BLCv, targets


def train_var(data: ImageSet, vae_path: str | Path, cfg: VARConfig, train: TrainConfig, out_dir: str | Path,
              label_drop: float = 0.1, progress: bool = True) -> dict:
    """Train a class-conditional VAR (or an M-VAR, for an :class:`MVARConfig`) on ``data`` with the VQ-VAE in
    ``vae_path``; resumable in ``out_dir``.

    Label dropout replaces a label by the null class ``cfg.num_classes`` with probability ``label_drop``
    (what classifier-free guidance needs). Writes ``var.safetensors``, ``loss.png``, ``log.jsonl``, ``done.json``.

    Example:
        >>> train_var(load_fashion_mnist("train"), "runs/vae/vae.safetensors", VARConfig(depth=4, num_classes=10, ...),
        ...           TrainConfig(steps=2000, batch_size=32, lr=8e-4), "runs/var")
    """
    if not 0 <= label_drop < 1:
        raise ValueError(f"label_drop must be in [0, 1), got {label_drop}")
    if int(data.labels.max()) >= cfg.num_classes:
        raise ValueError(f"the data has labels up to {int(data.labels.max())} but the VAR has {cfg.num_classes} classes")
    vae_path = Path(vae_path)
    vae = load_trained_vae(vae_path)
    if (vae.cfg.vocab_size, vae.cfg.z_channels, vae.cfg.patch_nums) != (cfg.vocab_size, cfg.z_channels, cfg.patch_nums):
        raise ValueError("the VAR config must match the VQ-VAE: vocab_size, z_channels and patch_nums "
                         f"({vae.cfg.vocab_size}, {vae.cfg.z_channels}, {vae.cfg.patch_nums})")
    torch.manual_seed(train.seed)
    var = build_transformer(cfg)
    init_var_weights(var)
    out_dir = Path(out_dir)
    arch = "mvar" if isinstance(cfg, MVARConfig) else "var"
    trainer = Trainer(out_dir, var, train, run={"kind": arch, "var": asdict(cfg), "vae_sha256": file_sha256(vae_path),
                                                "label_drop": label_drop, "data_items": len(data)}, progress=progress)
    if trainer.done:
        return trainer.finish()
    tokens = cached_tokens(vae, vae_path, data, progress)
    labels = torch.from_numpy(data.labels)
    var.train()
    for _, idx in trainer.batches(len(data)):
        gen = trainer.step_generator()
        x_BLCv, target_BL = teacher_forcing_batch(vae, tokens[idx])
        label_B = labels[idx].clone()
        label_B[torch.rand(len(idx), generator=gen) < label_drop] = cfg.num_classes
        with trainer.autocast():
            logits_BLV = var(label_B, x_BLCv)
        loss = F.cross_entropy(logits_BLV.view(-1, cfg.vocab_size), target_BL.view(-1))
        last = var.begin_ends[-1][0]
        acc = (logits_BLV[:, last:].argmax(-1) == target_BL[:, last:]).float().mean()
        trainer.update(loss, {"loss": loss.item(), "acc_last_scale": acc.item()})
    save_model(out_dir / VAR_WEIGHTS, var.state_dict(), {arch: asdict(cfg)})
    return trainer.finish()
