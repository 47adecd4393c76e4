"""EfficientNet-Lite0 with the shipped ImageNet weights against known outputs: real photographs are their class,
and the pooled features of one photograph equal the numbers recorded when this test was written.

The photographs are those that ship with scikit-image (no download). The class checks fail when the weights, the
architecture or the preprocessing are grossly wrong. They do not catch subtle slips: with a BatchNorm epsilon of 1e-5,
symmetric instead of TensorFlow "SAME" padding, or torchvision's mean/std, every class below still comes out right.
Those slips move the features by more than 1, so the recorded features catch them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from litevar.eval import features

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is missing; install the test extras: "
                                                          "pip install -e '.[test]'")

# ImageNet-1k class indices.
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
TRIPOD = 872
MOPED, MOTOR_SCOOTER = 665, 670  # ImageNet has no motorcycle class: these are the two-wheelers it has
MISSILE, PROJECTILE, SPACE_SHUTTLE = 657, 744, 812

# Pooled features of skimage.data.chelsea(), from this implementation when the test was written (float32, CPU):
# the six largest of the 1280, and the Euclidean norm of all of them.
CHELSEA_FEATURES = {112: 3.892585, 254: 3.171714, 287: 3.924660, 301: 2.885065, 599: 2.630054, 809: 2.424637}
CHELSEA_NORM = 14.647777
TOLERANCE = 1e-4


def _as_batch(image_HWC: np.ndarray) -> torch.Tensor:
    """A uint8 photograph [H, W] or [H, W, 3] -> a float batch [1, 1 or 3, H, W] in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image_HWC)).float().div_(255)
    return x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def efflite0():
    pytest.importorskip(features.WEIGHTS_PACKAGE)
    return features.get_extractor("efflite0")


def _top5(extractor, image_HWC: np.ndarray) -> list[int]:
    with torch.no_grad():
        logits_B1000 = extractor.logits(_as_batch(image_HWC))
    return logits_B1000[0].topk(5).indices.tolist()


@pytest.mark.parametrize("loader, top1_in", [
    pytest.param(skimage_data.chelsea, CATS, id="chelsea-cat"),
    pytest.param(skimage_data.coffee, {ESPRESSO, CUP}, id="coffee-espresso"),
    pytest.param(skimage_data.camera, {TRIPOD}, id="camera-tripod"),  # grey: a man with a camera on a tripod
    pytest.param(lambda: skimage_data.stereo_motorcycle()[0], {MOPED, MOTOR_SCOOTER}, id="motorcycle-moped"),
])
def test_photographs_are_their_imagenet_class(efflite0, loader, top1_in):
    top5 = _top5(efflite0, loader())
    assert top5[0] in top1_in, f"top-1 {top5[0]}, top-5 {top5}, expected one of {sorted(top1_in)}"


def test_rocket_is_a_rocket_within_the_top5(efflite0):
    top5 = _top5(efflite0, skimage_data.rocket())
    # top-1 is the drilling platform (the launch tower around the rocket)
    assert {MISSILE, PROJECTILE, SPACE_SHUTTLE} & set(top5), f"top-5 {top5}"


def test_pooled_features_of_a_photograph_equal_the_recorded_numbers(efflite0):
    with torch.no_grad():
        feats_1D = efflite0(_as_batch(skimage_data.chelsea()))
    assert feats_1D.shape == (1, 1280)
    feats = feats_1D[0].double().numpy()
    indices = sorted(CHELSEA_FEATURES)
    np.testing.assert_allclose(feats[indices], [CHELSEA_FEATURES[i] for i in indices], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(feats), CHELSEA_NORM, rtol=0, atol=TOLERANCE)
