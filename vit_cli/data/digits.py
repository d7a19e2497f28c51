"""data=digits: the 1,797 8x8 digits that ship inside scikit-learn (no download)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vit_cli.config import DataConfig
from vit_cli.data import DataSource

if TYPE_CHECKING:
    from vit_cli.data._shared import Splits


def build(cfg: DataConfig, img_size: int) -> Splits:
    """The digits split 80/20 (stratified, seed 0), held in memory at `img_size`."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from vit_cli.data._shared import MemoryImages, Splits

    digits = load_digits()
    # Pixels are 0..16; scale to [0, 1] like any image.
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        range(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    if img_size != images.shape[-1]:
        # Upsampled once here, so that data.shift counts pixels at the model's resolution.
        images = F.interpolate(
            images, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    return Splits(
        MemoryImages(images[train_idx], labels[train_idx]),
        MemoryImages(images[val_idx], labels[val_idx]),
        [str(d) for d in range(10)],
    )


# The digits have no keys beyond those every source has.
SOURCE = DataSource(schema=DataConfig, build=build)
