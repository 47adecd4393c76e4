"""Distribution and reconstruction metrics on numpy arrays: Frechet distance, precision/recall, PSNR, code usage.

The feature metrics take float arrays ``[N, D]`` (e.g. from :func:`litevar.eval.features.extract_features`)
and compute in float64; nothing here needs scipy.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch


class PrecisionRecall(NamedTuple):
    """Improved precision (fidelity) and recall (coverage), both in [0, 1]."""

    precision: float
    recall: float


class CodebookUsage(NamedTuple):
    """Share of the codebook used at least once, and the perplexity of the code histogram (1..vocab_size)."""

    usage: float
    perplexity: float


def _check_feats(feats: np.ndarray, name: str, min_samples: int = 2) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] of features, got shape {feats.shape}")
    if feats.shape[0] < min_samples:
        raise ValueError(f"{name} has {feats.shape[0]} samples; this metric needs at least {min_samples}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the images and the feature extractor")
    return feats


def _check_same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names} have different feature sizes ({a.shape[1]} vs {b.shape[1]}); use the same "
                         "feature extractor for both sets")


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of a feature set, in float64.

    Args:
        feats: features [N, D] with N >= 2.

    Example:
        >>> mu, sigma = feature_stats(np.random.randn(100, 8))
    """
    feats = _check_feats(feats, "feats")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, where the last trace is the sum of square roots
    of the eigenvalues of the symmetric matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), so it
    needs only symmetric eigendecompositions; round-off negative eigenvalues are clipped to zero.

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D] (symmetric positive semi-definite).

    Example:
        >>> frechet_distance_from_stats(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
        2.0
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if dim < 1 or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"expected means [D] and covariances [D, D] of one size D, got {mu1.shape}, {sigma1.shape}, "
                         f"{mu2.shape}, {sigma2.shape}")
    sqrt1 = _sqrt_psd((sigma1 + sigma1.T) / 2)
    middle = sqrt1 @ sigma2 @ sqrt1
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    Args:
        feats_a: features [N, D], N >= 2.
        feats_b: features [M, D], M >= 2.

    Example:
        >>> fd = frechet_distance(real_feats, fake_feats)
    """
    feats_a = _check_feats(feats_a, "feats_a")
    feats_b = _check_feats(feats_b, "feats_b")
    _check_same_dim(feats_a, feats_b, "feats_a and feats_b")
    if np.array_equal(feats_a, feats_b):
        return 0.0
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def _distance_chunks(rows_ND: torch.Tensor, cols_MD: torch.Tensor, chunk_size: int):
    for start in range(0, rows_ND.shape[0], chunk_size):
        yield start, torch.cdist(rows_ND[start:start + chunk_size], cols_MD)


def _knn_radii(feats_ND: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    radii = torch.empty(feats_ND.shape[0], dtype=feats_ND.dtype, device=feats_ND.device)
    for start, dist_cN in _distance_chunks(feats_ND, feats_ND, chunk_size):
        # k + 1 smallest because each point is its own nearest neighbour at distance 0.
        radii[start:start + dist_cN.shape[0]] = dist_cN.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, chunk_size: int = 1000,
                     device: str | torch.device = "cpu") -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) from k-nearest-neighbour manifolds.

    Each set's manifold is the union of balls around its samples with radius the distance to their k-th
    nearest neighbour in the same set. Precision is the share of fake samples inside the real manifold,
    recall the share of real samples inside the fake manifold. Distances are computed in float64 by blocks
    of ``chunk_size`` rows, so memory stays at ``chunk_size * max(N, M)`` values.

    Args:
        real_feats: features [N, D] of real images, N > k.
        fake_feats: features [M, D] of generated images, M > k.
        k: neighbourhood size (3 in the paper).
        chunk_size: rows of the distance matrix computed at once.
        device: where the distances are computed (e.g. "cuda" for 50k-sample sets).

    Example:
        >>> precision, recall = precision_recall(real_feats, fake_feats, k=3)
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be at least 1, got k={k}, chunk_size={chunk_size}")
    real = _check_feats(real_feats, "real_feats", min_samples=k + 1)
    fake = _check_feats(fake_feats, "fake_feats", min_samples=k + 1)
    _check_same_dim(real, fake, "real_feats and fake_feats")
    real_ND = torch.from_numpy(real).to(device)
    fake_MD = torch.from_numpy(fake).to(device)
    real_radii = _knn_radii(real_ND, k, chunk_size)
    fake_radii = _knn_radii(fake_MD, k, chunk_size)
    fake_inside = torch.zeros(fake_MD.shape[0], dtype=torch.bool, device=fake_MD.device)
    real_inside = torch.zeros(real_ND.shape[0], dtype=torch.bool, device=real_ND.device)
    for start, dist_cN in _distance_chunks(fake_MD, real_ND, chunk_size):
        rows = slice(start, start + dist_cN.shape[0])
        fake_inside[rows] = (dist_cN <= real_radii[None, :]).any(dim=1)
        real_inside |= (dist_cN <= fake_radii[rows, None]).any(dim=0)
    return PrecisionRecall(precision=fake_inside.double().mean().item(), recall=real_inside.double().mean().item())


def _as_float64(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float,
         per_image: bool = True) -> float:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch, or (``per_image=False``)
    from the mean squared error over the whole batch.

    An image identical to its reference has infinite PSNR, and so then has the per-image average; the batch form
    stays finite unless every image is identical.

    Args:
        a, b: image batches of one shape [B, ...] (any layout; every non-batch value is a pixel value).
        data_range: the span of pixel values, e.g. 1.0 for [0, 1] floats, 255 for uint8, 2.0 for [-1, 1].

    Example:
        >>> round(psnr(np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.1), data_range=1.0), 6)
        20.0
    """
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape or a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"psnr needs two non-empty image batches [B, ...] of the same shape, got {a.shape} and {b.shape}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive (e.g. 1.0 or 255), got {data_range}")
    mse_B = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    if not per_image:
        mse_B = mse_B.mean(keepdims=True)
    with np.errstate(divide="ignore"):
        psnr_B = 10.0 * np.log10(data_range ** 2 / mse_B)
    return float(psnr_B.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a_NHWC: np.ndarray | torch.Tensor, b_NHWC: np.ndarray | torch.Tensor, data_range: float = 255.0,
         window: int = 11, sigma: float = 1.5, chunk: int = 64) -> float:
    """Mean structural similarity (Wang et al. 2004) of two image batches [N, H, W, C], averaged over images and
    channels: Gaussian window (11 px, sigma 1.5; shrunk to the image side for small images), K1=0.01, K2=0.03,
    valid positions only. 1.0 exactly for identical images.

    Example:
        >>> ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))
        1.0
    """
    if tuple(a_NHWC.shape) != tuple(b_NHWC.shape) or len(a_NHWC.shape) != 4 or a_NHWC.shape[0] == 0:
        raise ValueError(f"ssim needs two non-empty image batches [N, H, W, C] of one shape, got {tuple(a_NHWC.shape)} "
                         f"and {tuple(b_NHWC.shape)}")
    _, height, width, channels = a_NHWC.shape
    size = min(window, height, width)
    kernel = _gaussian_window(size, sigma).expand(channels, 1, size, size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    total = 0.0
    for start in range(0, a_NHWC.shape[0], chunk):
        x = torch.from_numpy(_as_float64(a_NHWC[start:start + chunk])).permute(0, 3, 1, 2)
        y = torch.from_numpy(_as_float64(b_NHWC[start:start + chunk])).permute(0, 3, 1, 2)
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x ** 2
        var_y = blur(y * y) - mu_y ** 2
        cov = blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        total += float(ssim_map.mean(dim=(1, 2, 3)).sum())
    return total / a_NHWC.shape[0]


def _flat_indices(indices) -> np.ndarray:
    if isinstance(indices, (list, tuple)):
        parts = [_flat_indices(part) for part in indices]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices).reshape(-1)


def codebook_usage(indices: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
                   vocab_size: int) -> CodebookUsage:
    """How much of a codebook a set of token indices uses.

    Args:
        indices: integer code indices of any shape, or a list of them (e.g. the per-scale ``idx_Bl`` of VAR).
        vocab_size: the codebook size V.

    Returns:
        usage: share of the V codes used at least once; perplexity: exp of the entropy of the code histogram
        (V when all codes are equally frequent, 1 when a single code is used).

    Example:
        >>> codebook_usage(np.array([0, 0, 1, 1]), vocab_size=4)
        CodebookUsage(usage=0.5, perplexity=2.0)
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    flat = _flat_indices(indices)
    if flat.size == 0:
        raise ValueError("no code indices given; pass at least one token index")
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"code indices must be integers, got dtype {flat.dtype}")
    if flat.min() < 0 or flat.max() >= vocab_size:
        raise ValueError(f"code indices must lie in [0, {vocab_size}), got values from {flat.min()} to {flat.max()}")
    counts = np.bincount(flat.astype(np.int64), minlength=vocab_size)
    probs = counts[counts > 0] / flat.size
    entropy = -(probs * np.log(probs)).sum()
    return CodebookUsage(usage=float((counts > 0).sum() / vocab_size), perplexity=float(np.exp(entropy)))
