"""Datasets for training and evaluation: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and image folders (one
sub-folder per class).

Every dataset here yields images as uint8 ``[N, H, W, 3]`` arrays plus int64 labels; ``to_model_range``
turns a batch into the float ``[-1, 1]`` NCHW tensors the VQ-VAE works on.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where the Debian package installs the files; `make data` unpacks the same package under .data/ without root.
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),
                      Path(".data/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(FileNotFoundError):
    """A dataset that is missing or unreadable."""


@dataclass
class ImageSet:
    """Images (uint8 [N, H, W, 3]), labels (int64 [N]) and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int, seed: int = 0) -> "ImageSet":
        """A class-stratified-by-chance random subset of ``count`` items (deterministic for a seed)."""
        if count >= len(self):
            return self
        order = np.random.default_rng(seed).permutation(len(self))[:count]
        return ImageSet(self.images[order], self.labels[order], self.class_names)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the Fashion-MNIST idx.gz files: ``root``, $LITEVAR_FASHION_MNIST, or the Debian paths."""
    candidates = [Path(root)] if root else []
    if os.environ.get("LITEVAR_FASHION_MNIST"):
        candidates.append(Path(os.environ["LITEVAR_FASHION_MNIST"]))
    candidates += list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if all((folder / name).is_file() for pair in _FILES.values() for name in pair):
            return folder
    raise DatasetError("Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates)
                       + "; run `make data` (unpacks the Debian package dataset-fashion-mnist into .data/) "
                       "or `apt-get install dataset-fashion-mnist`")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, size: int = 32) -> ImageSet:
    """Fashion-MNIST as RGB uint8, zero-padded from 28x28 to ``size`` x ``size`` (centered).

    Args:
        split: "train" (60k) or "test" (10k).
        root: folder with the idx.gz files (default: see ``fashion_mnist_dir``).
        size: output side, >= 28; padding keeps the garments at their original pixel scale.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if size < 28:
        raise ValueError(f"size must be >= 28 for Fashion-MNIST, got {size}")
    folder = fashion_mnist_dir(root)
    grey = _read_idx(folder / _FILES[split][0])
    labels = _read_idx(folder / _FILES[split][1]).astype(np.int64)
    before = (size - 28) // 2
    grey = np.pad(grey, ((0, 0), (before, size - 28 - before), (before, size - 28 - before)))
    return ImageSet(np.repeat(grey[..., None], 3, axis=3), labels, FASHION_MNIST_CLASSES)


def load_image_folder(root: str | os.PathLike, size: int) -> ImageSet:
    """Images under ``root/<class>/*.png|jpg|...``, classes in sorted folder order, resized to ``size``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.png")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    images.append(np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC)))
            except OSError as err:
                raise DatasetError(f"cannot read image {path}: {err}") from None
            labels.append(label)
    if not images:
        raise DatasetError(f"{root} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))


def load_dataset(name: str, split: str = "train", size: int = 32) -> ImageSet:
    """``fashion-mnist`` or a path to an image folder (``split`` then picks ``<path>/<split>`` if it exists)."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, size=size)
    folder = Path(name)
    if (folder / split).is_dir():
        folder = folder / split
    return load_image_folder(folder, size)


def to_model_range(images_BHW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    x = torch.as_tensor(images_BHW3)
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def random_flip(x_BCHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip of a random half of the batch (augmentation that keeps Fashion-MNIST classes)."""
    flip = torch.rand(x_BCHW.shape[0], generator=generator) < 0.5
    out = x_BCHW.clone()
    out[flip] = x_BCHW[flip].flip(-1)
    return out


def resize_batch(x_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    return x_BCHW if x_BCHW.shape[-1] == size else F.interpolate(x_BCHW, size=(size, size), mode="bilinear",
                                                                  antialias=True, align_corners=False)
