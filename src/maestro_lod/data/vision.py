"""Image datasets read through torchvision (the optional ``vision`` extra), imported lazily.

* ``mnist`` / ``cifar10``: the torchvision copies under ``root`` (fetched when ``download=True``).
  CIFAR-10 training images get the augmentation of the MAESTRO paper when ``augment=True``:
  RandomCrop(32, padding=4) and RandomHorizontalFlip, then per-channel standardisation.
* ``image-folder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (torchvision ImageFolder),
  resized to the size of the first training image so every item has the same shape.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..errors import ConfigError, MissingFileError
from .embedded import MNIST_MEAN, MNIST_STD
from .registry import DIGIT_LABELS, LoadOptions, Normalization, TaskData, register_dataset, require_root

DEFAULT_ROOT = Path.home() / ".cache" / "maestro-lod" / "data"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def import_torchvision(dataset: str) -> ModuleType:
    """The torchvision module, or a ValueError telling how to install the extra."""
    try:
        import torchvision
    except ImportError:
        raise ConfigError(f'dataset {dataset!r} needs torchvision: pip install "maestro-lod[vision]"') from None
    return torchvision


def online_root(options: LoadOptions) -> Path:
    """Where an online dataset lives: ``root`` or the per-user cache directory."""
    return options.root or DEFAULT_ROOT


def open_online(name: str, factory, root: Path, options: LoadOptions, **kwargs):
    """Construct a torchvision dataset, turning "not found, use download=True" into a clear error."""
    try:
        return factory(str(root), download=options.download, **kwargs)
    except RuntimeError as exc:
        if options.download:
            raise
        raise MissingFileError(f"dataset {name!r} not found under {str(root)!r}; pass download=True "
                                f"(--download) to fetch it ({exc})") from None


@register_dataset("mnist")
def load_mnist(options: LoadOptions) -> TaskData:
    """The full MNIST (60,000 / 10,000), standardised with the MNIST mean and std."""
    tv = import_torchvision("mnist")
    t = tv.transforms
    transform = t.Compose([t.ToTensor(), t.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    root = online_root(options)
    train = open_online("mnist", tv.datasets.MNIST, root, options, train=True, transform=transform)
    val = open_online("mnist", tv.datasets.MNIST, root, options, train=False, transform=transform)
    return TaskData(
        name="mnist", kind="classification", train=train, val=val, num_classes=10, input_shape=(1, 28, 28),
        vocab_size=None, seq_len=None,
        description=f"MNIST via torchvision ({str(root)!r}): {len(train):,} train / {len(val):,} val 28x28 digits",
        normalization=Normalization((MNIST_MEAN,), (MNIST_STD,), 1 / 255), labels=DIGIT_LABELS,
    )


@register_dataset("cifar10")
def load_cifar10(options: LoadOptions) -> TaskData:
    """CIFAR-10 (50,000 / 10,000) with crop-and-flip training augmentation when ``augment``."""
    tv = import_torchvision("cifar10")
    t = tv.transforms
    normalise = [t.ToTensor(), t.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    augmentation = [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip()] if options.augment else []
    root = online_root(options)
    train = open_online("cifar10", tv.datasets.CIFAR10, root, options, train=True,
                        transform=t.Compose(augmentation + normalise))
    val = open_online("cifar10", tv.datasets.CIFAR10, root, options, train=False, transform=t.Compose(normalise))
    return TaskData(
        name="cifar10", kind="classification", train=train, val=val, num_classes=10, input_shape=(3, 32, 32),
        vocab_size=None, seq_len=None,
        description=f"CIFAR-10 via torchvision ({str(root)!r}): {len(train):,} train / {len(val):,} val 32x32 "
                    f"images, augmentation {'on' if options.augment else 'off'}",
        normalization=Normalization(CIFAR10_MEAN, CIFAR10_STD, 1 / 255), labels=tuple(train.classes),
    )


@register_dataset("image-folder")
def load_image_folder(options: LoadOptions) -> TaskData:
    """RGB images in class folders; ImageNet standardisation, crop-and-flip augmentation when ``augment``."""
    tv = import_torchvision("image-folder")
    t = tv.transforms
    root = require_root("image-folder", options)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise MissingFileError(f"dataset 'image-folder': directory {str(root / split)!r} does not exist")
    probe = tv.datasets.ImageFolder(str(root / "train"))
    width, height = probe.loader(probe.samples[0][0]).size
    size = (height, width)
    normalise = [t.Resize(size), t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augmentation = [t.RandomCrop(size, padding=max(size) // 8), t.RandomHorizontalFlip()] if options.augment else []
    train = tv.datasets.ImageFolder(str(root / "train"), transform=t.Compose(normalise[:1] + augmentation
                                                                               + normalise[1:]))
    val = tv.datasets.ImageFolder(str(root / "val"), transform=t.Compose(normalise))
    if val.classes != train.classes:
        raise ConfigError(f"image-folder: class folders differ between train {train.classes} and val {val.classes}")
    return TaskData(
        name="image-folder", kind="classification", train=train, val=val, num_classes=len(train.classes),
        input_shape=(3, height, width), vocab_size=None, seq_len=None,
        description=f"image folders under {str(root)!r}: {len(train):,} train / {len(val):,} val images, "
                    f"{len(train.classes)} classes, resized to {height}x{width}",
        normalization=Normalization(IMAGENET_MEAN, IMAGENET_STD, 1 / 255, size), labels=tuple(train.classes),
    )
