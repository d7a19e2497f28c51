"""Datasets and loaders: `build_data` turns a data config into train/val DataLoaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from vit_cli.config import DataConfig
from vit_cli.errors import UserError

DATASETS = ("digits", "fake", "imagefolder")


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str]


class ShiftedTensorDataset(Dataset):
    """In-memory images with a random translation of up to `shift` pixels (zero padded)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int) -> None:
        self.images = images
        self.labels = labels
        self.shift = shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.shift > 0:
            s = self.shift
            C, H, W = image.shape
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = F.pad(image, (s, s, s, s))[:, dy : dy + H, dx : dx + W]  # (C, H, W)
        return image, self.labels[i]


def _digits(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset, list[str]]:
    """The 1,797 8x8 digits that ship inside scikit-learn, split 80/20 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are 0..16; scale to [0, 1] before normalising like any image.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    if img_size != images.shape[-1]:
        images = F.interpolate(
            images, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    images = (images - mean) / std
    train = ShiftedTensorDataset(images[train_idx], labels[train_idx], cfg.shift)
    val = TensorDataset(images[val_idx], labels[val_idx])
    return train, val, [str(d) for d in range(10)]


def _eval_transform(cfg: DataConfig, img_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(img_size, antialias=True),
            v2.CenterCrop(img_size),
            v2.Grayscale(1) if cfg.in_chans == 1 else v2.RGB(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def _fake(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset, list[str]]:
    """Random images from torchvision's FakeData, for smoke tests and throughput."""
    shape = (cfg.in_chans, img_size, img_size)
    transform = _eval_transform(cfg, img_size)
    train = datasets.FakeData(cfg.train_size, shape, cfg.num_classes, transform, random_offset=0)
    # A distinct offset keeps the val images different from the train images.
    val = datasets.FakeData(
        cfg.val_size, shape, cfg.num_classes, transform, random_offset=cfg.train_size
    )
    return train, val, [str(c) for c in range(cfg.num_classes)]


def _imagefolder(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset, list[str]]:
    """Class-per-folder images under `root/train` and `root/val`."""
    if cfg.root is None:
        raise UserError("data=imagefolder needs data.root=<folder with train/ and val/>.")
    root = Path(cfg.root).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(
                f"data.root={cfg.root}: folder {root / split} does not exist. "
                "Point data.root at a folder with train/ and val/ subfolders, one folder per class."
            )
    transform = _eval_transform(cfg, img_size)
    train = datasets.ImageFolder(str(root / "train"), transform)
    val = datasets.ImageFolder(str(root / "val"), transform)
    if val.classes != train.classes:
        raise UserError(
            f"data.root={cfg.root}: val classes {val.classes} differ from train classes "
            f"{train.classes}. Give both splits the same class folders."
        )
    return train, val, list(train.classes)


_BUILDERS = {"digits": _digits, "fake": _fake, "imagefolder": _imagefolder}


def build_data(
    cfg: DataConfig, img_size: int, generator: torch.Generator, pin_memory: bool = False
) -> DataBundle:
    """Build train/val loaders at `img_size`. Re-seed `generator` each epoch to fix the order."""
    if cfg.name not in _BUILDERS:
        raise UserError(f"Unknown data.name={cfg.name!r}. Valid names: {', '.join(DATASETS)}.")
    if len(cfg.mean) != cfg.in_chans or len(cfg.std) != cfg.in_chans:
        raise UserError(
            f"data.mean and data.std need one value per channel (data.in_chans={cfg.in_chans})."
        )
    train, val, class_names = _BUILDERS[cfg.name](cfg, img_size)
    if len(class_names) != cfg.num_classes:
        raise UserError(
            f"data.num_classes={cfg.num_classes} but data={cfg.name} has {len(class_names)} "
            f"classes. Set data.num_classes={len(class_names)}."
        )
    workers = cfg.num_workers
    train_loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train) > cfg.batch_size,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(
        val,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    return DataBundle(
        train_loader, val_loader, cfg.num_classes, cfg.in_chans, img_size, class_names
    )
