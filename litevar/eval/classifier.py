"""A small Fashion-MNIST classifier, used to measure class consistency of generated images.

Class consistency is the share of generated images that the classifier assigns to the class they were
conditioned on. The shipped weights live in ``litevar/assets/fashion_mnist_classifier.safetensors`` and are
rebuilt with ``python -m litevar.eval.classifier --out litevar/assets/fashion_mnist_classifier.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import ImageSet, load_fashion_mnist, random_flip, resize_batch, to_model_range
from ..files import reading, write_atomic
from ..version import __version__

DEFAULT_CLASSIFIER_PATH = Path(__file__).parent.parent / "assets" / "fashion_mnist_classifier.safetensors"
DEFAULT_WIDTHS = (32, 64, 128)
IMAGE_SIZE = 32
NUM_CLASSES = 10
FORMAT = "litevar.fashion_mnist_classifier/1"


class ClassifierError(ValueError):
    """A classifier file or classifier input that cannot be used."""


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    """Three conv stages (conv-BN-ReLU-maxpool, 32 -> 16 -> 8 -> 4) and a linear head over the 4x4 map (~113k params).

    Colour input is averaged to grey first, so the same weights score real (grey) and generated (RGB) images.

    Args:
        widths: channels of the three stages.
        num_classes: number of logits.

    Example:
        >>> logits_BK = FashionClassifier()(torch.zeros(2, 3, 32, 32))  # [2, 10]
    """

    def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS, num_classes: int = NUM_CLASSES):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ClassifierError(f"widths must be three positive channel counts, got {tuple(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.num_classes = num_classes
        w0, w1, w2 = self.widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, w0),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w0, w1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(w2 * 4 * 4, num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] not in (1, 3) or x_BCHW.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ClassifierError(f"expected images [B, 1 or 3, {IMAGE_SIZE}, {IMAGE_SIZE}], "
                                  f"got {tuple(x_BCHW.shape)}")
        grey_B1HW = x_BCHW.mean(dim=1, keepdim=True)
        feat_BChw = self.features(grey_B1HW.contiguous(memory_format=torch.channels_last))
        return self.head(feat_BChw.flatten(1))


def random_translate(x_BCHW: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with black (-1).

    Args:
        x_BCHW: float images in [-1, 1].
        max_shift: largest shift in pixels; 0 returns the input unchanged.
        generator: source of the per-image shifts.
    """
    if max_shift == 0:
        return x_BCHW
    B, _, H, W = x_BCHW.shape
    padded_BCHW = F.pad(x_BCHW, (max_shift,) * 4, value=-1.0)
    dy_B = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx_B = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    rows_BH = dy_B[:, None] + torch.arange(H)
    cols_BW = dx_B[:, None] + torch.arange(W)
    out_BHWC = padded_BCHW[torch.arange(B)[:, None, None], :, rows_BH[:, :, None], cols_BW[:, None, :]]
    return out_BHWC.permute(0, 3, 1, 2).contiguous()


def _as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (numpy or torch) or float NCHW in [-1, 1] -> float NCHW at 32x32."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ClassifierError(f"expected a batch of images with 4 dimensions, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] not in (1, 3):
            raise ClassifierError(f"uint8 images must be NHWC with 1 or 3 channels, got shape {tuple(x.shape)}")
        x = to_model_range(x)
    elif not x.is_floating_point():
        raise ClassifierError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise ClassifierError(f"float images must be NCHW with 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.shape[-2] != x.shape[-1]:
        raise ClassifierError(f"images must be square, got {x.shape[-2]}x{x.shape[-1]}")
    return resize_batch(x.float(), IMAGE_SIZE)


@torch.inference_mode()
def predict(classifier: FashionClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predicted class of each image (images of another square size are resized to 32x32).

    Args:
        classifier: a ``FashionClassifier`` (run in eval mode here; its mode is restored afterwards).
        images: uint8 NHWC (numpy or torch) or float NCHW in [-1, 1].
        batch_size: images per forward pass.

    Example:
        >>> labels_N = predict(load_classifier(), generated_uint8_NHWC)
    """
    if batch_size < 1:
        raise ClassifierError(f"batch_size must be >= 1, got {batch_size}")
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        preds = []
        for start in range(0, len(images), batch_size):
            x_BCHW = _as_model_input(images[start:start + batch_size]).to(device)
            preds.append(classifier(x_BCHW).argmax(dim=1).cpu())
    finally:
        classifier.train(was_training)
    if not preds:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy().astype(np.int64)


def class_consistency(classifier: FashionClassifier, images: np.ndarray | torch.Tensor,
                      labels: np.ndarray | torch.Tensor | Sequence[int], batch_size: int = 256) -> float:
    """Share in [0, 1] of images that the classifier assigns to their given (conditioning) label.

    Args:
        classifier: a ``FashionClassifier``, e.g. from ``load_classifier()``.
        images: uint8 NHWC (numpy or torch) or float NCHW in [-1, 1].
        labels: one class index per image.
        batch_size: images per forward pass.

    Example:
        >>> score = class_consistency(load_classifier(), out.images, labels)  # 0.93
    """
    labels_N = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    if len(labels_N) != len(images):
        raise ClassifierError(f"got {len(images)} images but {len(labels_N)} labels; pass one label per image")
    if len(labels_N) == 0:
        raise ClassifierError("class consistency needs at least one image")
    return float((predict(classifier, images, batch_size) == labels_N).mean())


def _accuracy(model: FashionClassifier, data: ImageSet, batch_size: int = 1000) -> float:
    return float((predict(model, data.images, batch_size) == data.labels).mean())


def _train_epoch(model: FashionClassifier, optimizer: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, data: ImageSet, batch_size: int, max_shift: int,
                 generator: torch.Generator, bar: tqdm) -> float:
    """One shuffled pass over ``data`` with flip and shift augmentation; returns the mean training loss."""
    images_NHWC = torch.as_tensor(data.images)
    labels_N = torch.as_tensor(data.labels)
    order_N = torch.randperm(len(data), generator=generator)
    steps = math.ceil(len(data) / batch_size)
    model.train()
    loss_sum = 0.0
    for step in range(steps):
        idx_B = order_N[step * batch_size:(step + 1) * batch_size]
        x_BCHW = random_flip(to_model_range(images_NHWC[idx_B]).mean(dim=1, keepdim=True), generator)
        x_BCHW = random_translate(x_BCHW, max_shift, generator)
        loss = F.cross_entropy(model(x_BCHW), labels_N[idx_B])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss_sum / steps


@dataclass(frozen=True)
class ClassifierTraining:
    """How :func:`train_classifier` trains: random horizontal flips and shifts of up to ``max_shift`` pixels, AdamW
    and a cosine learning-rate schedule; the same seed gives the same weights (same machine and thread count).

    Args:
        epochs: passes over the training set.
        seed: seed for initialization, shuffling and augmentation.
        batch_size: images per step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        max_shift: largest random translation in pixels.
        widths: channels of the three conv stages.

    Example:
        >>> ClassifierTraining(epochs=2).batch_size
        128
    """

    epochs: int = 6
    seed: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    max_shift: int = 1
    widths: Sequence[int] = DEFAULT_WIDTHS

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClassifierError(f"`{name}` must be a positive integer, got {value!r}")


def train_classifier(out_path: str | Path, training: ClassifierTraining | None = None,
                     train_set: ImageSet | None = None, test_set: ImageSet | None = None,
                     progress: bool = True) -> dict:
    """Train a ``FashionClassifier``, evaluate it on the test split and save it as safetensors.

    Args:
        out_path: where the weights go (written atomically; the folder is created).
        training: epochs, seed, batch size, optimizer and augmentation (see :class:`ClassifierTraining`).
        train_set: images to train on (default: the 60k Fashion-MNIST train split).
        test_set: images to evaluate on (default: the 10k Fashion-MNIST test split).
        progress: show a progress bar.

    Returns:
        A dict with ``test_accuracy``, ``epoch_losses``, ``train_seconds``, ``epochs``, ``seed`` and ``path``.

    Example:
        >>> train_classifier("out/classifier.safetensors", ClassifierTraining(epochs=6))["test_accuracy"]  # ~0.92
    """
    training = training or ClassifierTraining()
    epochs, seed, batch_size = training.epochs, training.seed, training.batch_size
    train_set = load_fashion_mnist("train") if train_set is None else train_set
    test_set = load_fashion_mnist("test") if test_set is None else test_set
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FashionClassifier(training.widths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    epoch_losses = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="classifier", disable=not progress)
    for _ in range(epochs):
        epoch_losses.append(_train_epoch(model, optimizer, schedule, train_set, batch_size, training.max_shift,
                                         generator, bar))
    bar.close()
    train_seconds = time.perf_counter() - start
    test_accuracy = _accuracy(model, test_set)
    metadata = {"format": FORMAT, "test_accuracy": f"{test_accuracy:.4f}", "epochs": str(epochs), "seed": str(seed),
                "widths": json.dumps(list(model.widths)), "num_classes": str(model.num_classes),
                "train_seconds": f"{train_seconds:.1f}", "litevar_version": __version__}
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    write_atomic(out_path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return {"test_accuracy": test_accuracy, "epoch_losses": epoch_losses, "train_seconds": train_seconds,
            "epochs": epochs, "seed": seed, "path": str(out_path)}


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier saved by ``train_classifier`` (the shipped Fashion-MNIST weights by default), in eval mode.

    Args:
        path: a ``.safetensors`` file; default ``litevar/assets/fashion_mnist_classifier.safetensors``.
        device: where the weights go.

    Example:
        >>> classifier = load_classifier()
    """
    path = DEFAULT_CLASSIFIER_PATH if path is None else Path(path)
    if not path.is_file():
        raise ClassifierError(f"classifier weights {path} not found; train them with "
                              f"`python -m litevar.eval.classifier --out {path}`")
    with reading(path, ClassifierError, "classifier weights", "retrain them with train_classifier"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ClassifierError(f"{path} is not a litevar Fashion-MNIST classifier (format "
                                  f"{metadata.get('format')!r}, expected {FORMAT!r}); retrain it with train_classifier")
        state = load_file(str(path))
        widths, num_classes = json.loads(metadata["widths"]), int(metadata["num_classes"])
        if not isinstance(widths, list) or not all(type(w) is int for w in widths) or num_classes < 1:
            raise ClassifierError("its widths or num_classes metadata are malformed")
        with torch.device("meta"):  # sizes from the metadata, checked against the tensors before any allocation
            expected = {k: v.shape for k, v in FashionClassifier(widths, num_classes).state_dict().items()}
        wrong = sorted(k for k in expected.keys() | state.keys() if k not in state or expected.get(k) != state[k].shape)
        if wrong:
            raise ClassifierError(f"{path} does not match FashionClassifier (bad or missing {wrong[:3]}); "
                                  "retrain it with train_classifier")
        model = FashionClassifier(widths, num_classes)
        model.load_state_dict(state)
    return model.to(device).eval()


def main(argv: Sequence[str] | None = None) -> None:
    """Train the Fashion-MNIST classifier from the command line and print its result as JSON."""
    parser = argparse.ArgumentParser(description="Train the Fashion-MNIST class-consistency classifier.")
    parser.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_PATH, help="output .safetensors file")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    training = ClassifierTraining(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)
    result = train_classifier(args.out, training, progress=not args.no_progress)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
