"""data=digits: the 1,797 8x8 digits that ship inside scikit-learn (no download)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from vit_cli.config import DataConfig
from vit_cli.data import DataSource

if TYPE_CHECKING:
    import torch

    from vit_cli.data._shared import Splits

SPLIT_SIZES = (1437, 360)  # 80/20


def build(cfg: DataConfig, img_size: int) -> Splits:
    """The digits split 80/20 (stratified, seed 0), held in memory at `img_size`."""
    import torch.nn.functional as F

    from vit_cli.data._shared import MemoryImages, Splits

    digits = split_digits()
    # Pixels are 0..16; scale to [0, 1] like any image.
    images = digits["images"].float().unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = digits["labels"]
    if img_size != images.shape[-1]:
        # Upsampled once here, so that data.shift counts pixels at the model's resolution.
        images = F.interpolate(
            images, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    train, val = digits["train"], digits["val"]
    return Splits(
        MemoryImages(images[train], labels[train]),
        MemoryImages(images[val], labels[val]),
        [str(d) for d in range(10)],
    )


def split_digits() -> dict[str, torch.Tensor]:
    """The digits' pixels (N, 8, 8) as 0..16, their labels, and the indices of the train and
    val images: scikit-learn's split, from the copy that an earlier run kept in the user's
    cache (`cache_path`) when there is one, since importing scikit-learn is a second of every
    run's start-up."""
    import torch

    cache = cache_path()
    try:
        kept = torch.load(cache, map_location="cpu", weights_only=True)
        if _is_split(kept):
            return kept
    except Exception:  # absent, or damaged: made again below
        pass
    digits = _split_from_scikit_learn()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(digits, f)
            os.replace(tmp, cache)  # whole or not at all, with several runs starting at once
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:  # a home that can't be written: the next run asks scikit-learn again
        pass
    return digits


def cache_path() -> Path:
    """Where the split is kept: `$XDG_CACHE_HOME/vit_cli` (`~/.cache/vit_cli` by default),
    one file per scikit-learn version."""
    from importlib.metadata import version

    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vit_cli" / f"digits-scikit-learn-{version('scikit-learn')}.pt"


def _split_from_scikit_learn() -> dict[str, torch.Tensor]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train, val = train_test_split(
        range(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0
    )
    return {
        "images": torch.tensor(digits.images, dtype=torch.uint8),
        "labels": torch.tensor(digits.target, dtype=torch.long),
        "train": torch.tensor(train, dtype=torch.long),
        "val": torch.tensor(val, dtype=torch.long),
    }


def _is_split(kept: object) -> bool:
    import torch

    return (
        isinstance(kept, dict)
        and set(kept) == {"images", "labels", "train", "val"}
        and all(isinstance(v, torch.Tensor) for v in kept.values())
        and kept["images"].shape == (sum(SPLIT_SIZES), 8, 8)
        and kept["labels"].shape == (sum(SPLIT_SIZES),)
        and (len(kept["train"]), len(kept["val"])) == SPLIT_SIZES
        and all(kept[k].dtype == torch.long for k in ("labels", "train", "val"))
        and all(0 <= int(kept[k].min()) <= int(kept[k].max()) < sum(SPLIT_SIZES)
                for k in ("train", "val"))
    )  # fmt: skip


# The digits have no keys beyond those every source has.
SOURCE = DataSource(schema=DataConfig, build=build)
