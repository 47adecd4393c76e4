"""PTQ4ARVG = GPS + STWQ + Distribution-Guided Calibration (the cond/uncond mix of the calibration rows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..transform import QuantConfig, register_method
from .gps import quantize_gps


@dataclass
class PTQ4ARVGConfig(QuantConfig):
    """The full PTQ4ARVG recipe.

    Args:
        dgc: choose the share of conditional rows in the calibration set by distribution distance (else 50/50).
        shrinkage: covariance shrinkage toward the identity for the Mahalanobis distances (the feature width
            usually exceeds the number of calibration samples, where the plain estimate is singular).
    """

    activations: str = "stwq"
    dgc: bool = True
    shrinkage: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {self.shrinkage}")


def mahalanobis(x: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Distance of each row of ``x`` [n, C] to the rows' mean under their shrunk covariance."""
    x = x.double()
    centred = x - x.mean(0)
    cov = centred.T @ centred / max(len(x) - 1, 1)
    target = cov.diagonal().mean().clamp_min(1e-12) * torch.eye(x.shape[1], dtype=x.dtype)
    shrunk = (1 - shrinkage) * cov + shrinkage * target
    return (centred @ torch.linalg.pinv(shrunk) * centred).sum(1).clamp_min(0).sqrt()


@torch.no_grad()
def first_token_features(pipe, labels: list[int]) -> torch.Tensor:
    """The last block's output at the first scale's token, rows [conditional; unconditional] as in CFG sampling.

    The first scale does not depend on the sampling seed (its input is the class embedding), so one forward pass
    of that scale gives what a full generation would record there."""
    from ...attention.context import AttnContext

    var = pipe.var
    labels_B = torch.tensor(labels, device=pipe.device)
    cond_BD, block_mods, _ = var.conditioning(torch.cat((labels_B, torch.full_like(labels_B, var.cfg.num_classes))))
    x_BLC = var.first_tokens(cond_BD, var.level_pos())
    ctx = AttnContext(cfg_batch=len(labels))
    for block, mod in zip(var.blocks, block_mods):
        x_BLC = block(x_BLC, mod, ctx)
    return x_BLC[:, 0].float()


def conditional_share(pipe, samples: int, shrinkage: float) -> float:
    """DGC: the share of conditional rows among the most distant half of the last block's first-scale token
    outputs (conditional and unconditional rows measured within their own group)."""
    feats = first_token_features(pipe, [i % pipe.num_classes for i in range(samples)])
    cond, uncond = feats[:samples], feats[samples:]
    dist = torch.cat((mahalanobis(cond, shrinkage), mahalanobis(uncond, shrinkage)))
    far = dist.argsort(descending=True)[:len(cond)]
    return float((far < len(cond)).float().mean())


def quantize_ptq4arvg(pipe, config: PTQ4ARVGConfig, filter_fn=None) -> None:
    share = conditional_share(pipe, config.calib_samples, config.shrinkage) if config.dgc else None
    pipe.quant_calibration = {"cond_share": share}
    quantize_gps(pipe, config, filter_fn, cond_share=share)


register_method(PTQ4ARVGConfig, quantize_ptq4arvg, "ptq4arvg")
