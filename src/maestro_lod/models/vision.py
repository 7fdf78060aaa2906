"""Image classifiers: LeNet-5 and an MLP for digits, CIFAR-style ResNet-18 and VGG-19 (BatchNorm)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_positive_int
from ..data import TaskData
from ..errors import ConfigError
from .registry import register_model, require_image_shape, require_kind


class LeNet5(nn.Module):
    """conv 5×5 C→6, max-pool, conv 5×5 6→16, max-pool, fc →120 →84 →classes (ReLU between).

    On 28×28 inputs fc1 sees 16·4·4 = 256 features, so the five layers' full ranks are
    6 / 16 / 120 / 84 / classes. ``padding`` pads both convolutions (2 fits 8×8 inputs).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, padding: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=padding)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * lenet_side(height, padding) * lenet_side(width, padding), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def lenet_side(size: int, padding: int) -> int:
    """Side length after LeNet's two (5×5 conv, 2×2 max-pool) stages; 0 when the input is too small."""
    for _ in range(2):
        size = max(size + 2 * padding - 4, 0) // 2
    return size


@register_model("lenet5")
def build_lenet5(data: TaskData, padding: int = 0) -> nn.Module:
    """LeNet-5 of the MAESTRO MNIST experiment (see :class:`LeNet5`)."""
    channels, height, width = require_image_shape("lenet5", data)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding={padding!r} must be a non-negative int")
    if min(lenet_side(height, padding), lenet_side(width, padding)) < 1:
        raise ConfigError(f"model 'lenet5' with padding={padding} cannot handle input_shape {data.input_shape} of "
                         f"dataset {data.name!r} (too small for two 5x5 conv + 2x2 pool stages; try padding=2)")
    return LeNet5(channels, height, width, data.num_classes, padding)


@register_model("mlp")
def build_mlp(data: TaskData, hidden_sizes: Sequence[int] = (256, 128)) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden size, then a Linear classifier."""
    require_kind("mlp", data, "classification")
    if data.input_shape is None:
        raise ConfigError(f"model 'mlp' needs an input_shape, dataset {data.name!r} has none")
    if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
        raise ConfigError(f"hidden_sizes={hidden_sizes!r} must be a sequence of positive ints")
    sizes = [math.prod(data.input_shape)]
    sizes += [check_positive_int("hidden_sizes entry", h) for h in hidden_sizes]
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], data.num_classes))
    return nn.Sequential(*layers)


def conv_bn(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution ("same" padding for odd kernels) followed by BatchNorm."""
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN with a residual; a 1×1 conv-BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels, 3)
        changes_shape = stride != 1 or in_channels != out_channels
        shortcut = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride)) if changes_shape else nn.Identity()
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3×3 stride-1 stem (no max-pool), four stages of two basic blocks with
    widths w, 2w, 4w, 8w (w = 64 by default), global average pooling, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, width), nn.ReLU())
        stages, channels = [], width
        for index, stride in enumerate((1, 2, 2, 2)):
            out = width * 2 ** index
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out, 1)))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


@register_model("resnet18")
def build_resnet18(data: TaskData, width: int = 64) -> nn.Module:
    """CIFAR ResNet-18 (see :class:`ResNet18`); ``width`` scales every stage (64 = the standard model)."""
    channels, _, _ = require_image_shape("resnet18", data)
    return ResNet18(channels, data.num_classes, check_positive_int("width", width))


VGG19_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M")
"""VGG-19 convolutions as multiples of the base width (64), "M" = 2×2 max-pool."""
VGG_HEADS = ("mlp", "linear")


class VGG19(nn.Module):
    """CIFAR VGG-19 with BatchNorm: 16 conv-BN-ReLU layers and 5 max-pools, global average pooling
    (identity on 32×32 inputs), then either the 512→512→512→classes head (``"mlp"``, ReLU between,
    as in the MAESTRO / Pufferfish CIFAR experiments) or a single 512→classes layer (``"linear"``)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, head: str = "mlp"):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(channels, width * item), nn.ReLU()]
                channels = width * item
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if head == "mlp":
            self.classifier = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels),
                                            nn.ReLU(), nn.Linear(channels, num_classes))
        else:
            self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("vgg19")
def build_vgg19(data: TaskData, width: int = 64, head: str = "mlp") -> nn.Module:
    """CIFAR VGG-19-BN (see :class:`VGG19`); inputs must be at least 32×32 (five max-pools)."""
    channels, _, _ = require_image_shape("vgg19", data, min_size=32)
    if head not in VGG_HEADS:
        raise ConfigError(f"head={head!r} is not one of {', '.join(VGG_HEADS)}")
    return VGG19(channels, data.num_classes, check_positive_int("width", width), head)


class CNN4(nn.Module):
    """A small VGG-style CNN: conv-BN-ReLU 32 → pool → 64 → pool → 128 → 128 (3×3 convs), global
    average pooling, linear classifier. Four convolutions of 32–128 channels, cheap enough to
    train on a CPU (14.6 M MACs per 28×28 image)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in (32, "M", 64, "M", 128, 128):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [*conv_bn(channels, item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("cnn4")
def build_cnn4(data: TaskData) -> nn.Module:
    """The four-convolution VGG-style CNN (see :class:`CNN4`); inputs at least 4×4 (two max-pools)."""
    channels, _, _ = require_image_shape("cnn4", data, min_size=4)
    return CNN4(channels, data.num_classes)
