"""Fidelity of a candidate to the dense reference on the same labels and seeds.

Two views, both per scale:
- token agreement: both models sample freely with the same per-image generators; the share of positions where
  the candidate drew the reference's token (errors compound across scales, as they do in use);
- KL(reference || candidate) of the guided distributions (before top-k/top-p), with both models fed the
  reference's tokens on the KV-cached path, so each scale is judged on the same context.
Image-level: PSNR (from the mean squared error over the set), SSIM, and the share of byte-identical images.
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import psnr, ssim


class FidelityAccumulator:
    """Sums token matches and KL per scale over batches.

    Args:
        tokens_per_scale: positions per image at each scale (pn*pn).

    Example:
        >>> acc = FidelityAccumulator([1, 4])
        >>> acc.add_tokens([torch.zeros(2, 1), torch.zeros(2, 4)], [torch.zeros(2, 1), torch.ones(2, 4)])
        >>> acc.result()["token_agreement_per_scale"]
        [1.0, 0.0]
    """

    def __init__(self, tokens_per_scale: list[int]) -> None:
        self.tokens_per_scale = list(tokens_per_scale)
        n = len(tokens_per_scale)
        self.matches = torch.zeros(n, dtype=torch.float64)
        self.token_count = torch.zeros(n, dtype=torch.float64)
        self.kl_sum = torch.zeros(n, dtype=torch.float64)
        self.kl_count = torch.zeros(n, dtype=torch.float64)

    def add_tokens(self, reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> None:
        for si, (ref_Bl, cand_Bl) in enumerate(zip(reference, candidate, strict=True)):
            self.matches[si] += (ref_Bl.cpu() == cand_Bl.cpu()).sum().item()
            self.token_count[si] += ref_Bl.numel()

    def add_kl(self, si: int, ref_logp_BlV: torch.Tensor, cand_logits_BlV: torch.Tensor) -> None:
        """KL(p_ref || p_cand) summed over the positions of one scale; identical inputs give exactly 0."""
        cand_logp = cand_logits_BlV.float().log_softmax(dim=-1)
        kl_Bl = (ref_logp_BlV.exp() * (ref_logp_BlV - cand_logp)).sum(dim=-1)
        self.kl_sum[si] += kl_Bl.double().sum().item()
        self.kl_count[si] += kl_Bl.numel()

    def result(self) -> dict:
        agree = (self.matches / self.token_count.clamp_min(1)).tolist()
        kl = (self.kl_sum / self.kl_count.clamp_min(1)).tolist()
        weights = torch.tensor(self.tokens_per_scale, dtype=torch.float64)
        return {"token_agreement_per_scale": agree,
                "token_agreement": float((self.matches.sum() / self.token_count.sum().clamp_min(1))),
                "kl_per_scale": kl,
                "kl_mean": float((torch.tensor(kl, dtype=torch.float64) * weights).sum() / weights.sum())}


def image_fidelity(reference_NHWC: np.ndarray, candidate_NHWC: np.ndarray) -> dict:
    """PSNR (dB, from the mean squared error over all images; inf when every image is identical), mean SSIM and
    the share of byte-identical images, for uint8 image sets in the same order."""
    if reference_NHWC.shape != candidate_NHWC.shape:
        raise ValueError(f"image sets differ in shape: {reference_NHWC.shape} vs {candidate_NHWC.shape}")
    identical = (reference_NHWC == candidate_NHWC).reshape(len(reference_NHWC), -1).all(axis=1)
    return {"psnr_db": psnr(reference_NHWC, candidate_NHWC, data_range=255.0, per_image=False),
            "ssim": ssim(reference_NHWC, candidate_NHWC, data_range=255.0),
            "identical_images": float(identical.mean())}
