"""The Fashion-MNIST class-consistency classifier: shipped weights, scoring, and a tiny training round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from litevar.eval.classifier import (DEFAULT_CLASSIFIER_PATH, ClassifierError, ClassifierTraining, FashionClassifier,
                                     class_consistency, load_classifier, predict, train_classifier)
from litevar.data import FASHION_MNIST_CLASSES, DatasetError, ImageSet, fashion_mnist_dir, to_model_range


@pytest.fixture(scope="module")
def test_images() -> ImageSet:
    try:
        fashion_mnist_dir()
    except DatasetError as err:
        pytest.skip(f"Fashion-MNIST data missing ({err})")
    from litevar.data import load_fashion_mnist
    data = load_fashion_mnist("test")
    return ImageSet(data.images[:1000], data.labels[:1000], data.class_names)


@pytest.fixture(scope="module")
def shipped() -> FashionClassifier:
    return load_classifier()


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine extra threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic_set(count: int, seed: int) -> ImageSet:
    """Each class is a bright square at its own place on a dark background, with a little noise."""
    rng = np.random.default_rng(seed)
    labels_N = np.arange(count, dtype=np.int64) % 10
    images_NHW = rng.integers(0, 30, size=(count, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels_N):
        row, col = 4 + 8 * (label // 4), 4 + 8 * (label % 4)
        images_NHW[i, row:row + 6, col:col + 6] = 255
    return ImageSet(np.repeat(images_NHW[..., None], 3, axis=3), labels_N, FASHION_MNIST_CLASSES)


def test_shipped_file_is_small():
    assert DEFAULT_CLASSIFIER_PATH.is_file()
    assert DEFAULT_CLASSIFIER_PATH.stat().st_size < 2 * 1024 * 1024


def test_shipped_classifier_accuracy(shipped, test_images):
    assert class_consistency(shipped, test_images.images, test_images.labels) >= 0.90


def test_grey_and_rgb_float_inputs_agree(shipped, test_images):
    x_BCHW = to_model_range(test_images.images[:64])
    preds_rgb = predict(shipped, x_BCHW, batch_size=32)
    preds_grey = predict(shipped, x_BCHW[:, :1], batch_size=32)
    preds_uint8 = predict(shipped, test_images.images[:64])
    np.testing.assert_array_equal(preds_rgb, preds_grey)
    np.testing.assert_array_equal(preds_rgb, preds_uint8)


def test_consistency_is_one_for_own_predictions_and_low_for_wrong_labels(shipped, test_images):
    images = test_images.images[:300]
    preds_N = predict(shipped, images)
    assert class_consistency(shipped, images, preds_N) == 1.0
    assert class_consistency(shipped, images, torch.as_tensor(preds_N)) == 1.0
    assert class_consistency(shipped, images, (preds_N + 1) % 10) <= 0.05


def test_consistency_rejects_mismatched_labels():
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ClassifierError, match="one label per image"):
        class_consistency(FashionClassifier(widths=(4, 8, 8)), images, [0, 1, 2])


def test_forward_shape_and_bad_input():
    model = FashionClassifier(widths=(4, 8, 8)).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ClassifierError, match="expected images"):
        model(torch.zeros(2, 2, 32, 32))


def test_missing_file_error(tmp_path):
    with pytest.raises(ClassifierError, match="not found"):
        load_classifier(tmp_path / "nope.safetensors")


def test_tiny_training_learns_saves_and_loads(tmp_path, one_thread):
    train_set, test_set = _synthetic_set(80, seed=0), _synthetic_set(40, seed=1)
    training = ClassifierTraining(epochs=4, seed=3, batch_size=16, lr=1e-2, widths=(4, 8, 8), max_shift=1)
    kwargs = dict(training=training, progress=False, train_set=train_set, test_set=test_set)
    result = train_classifier(tmp_path / "a.safetensors", **kwargs)
    again = train_classifier(tmp_path / "b.safetensors", **kwargs)
    assert result["epoch_losses"][-1] < result["epoch_losses"][0]
    assert result["epoch_losses"] == again["epoch_losses"]
    model = load_classifier(tmp_path / "a.safetensors")
    assert not model.training
    assert model.widths == (4, 8, 8)
    twin = load_classifier(tmp_path / "b.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, twin.state_dict()[name], rtol=0, atol=0)
    assert class_consistency(model, test_set.images, test_set.labels) == pytest.approx(result["test_accuracy"])
