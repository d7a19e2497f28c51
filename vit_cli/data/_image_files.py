"""Image files as datasets: each file read by `FileReader` (`_decode.read_crop`, as a uint8
tensor), unreadable ones skipped and counted. The files may also be encoded images held
elsewhere, such as the rows of a table (data=hf): `ImageFiles(..., fetch=...)`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from vit_cli.augment import CropGeometry
from vit_cli.config import AugmentConfig
from vit_cli.data._decode import UNREADABLE, read_crop

log = logging.getLogger(__name__)


class FileReader:
    """Image file -> uint8 tensor (in_chans, img_size, img_size), as one split of a dataset
    reads it (`_decode.read_crop`); a picklable callable for loader workers."""

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        aug: AugmentConfig,
        train: bool,
        max_pixels: int,
        dct_scaling: bool = True,
    ) -> None:
        self.in_chans = in_chans
        self.geometry = CropGeometry(img_size, aug, train)
        self.max_pixels = max_pixels
        self.dct_scaling = dct_scaling

    def __call__(self, path: str | Path | BinaryIO) -> torch.Tensor:
        crop = read_crop(path, self.in_chans, self.geometry, self.max_pixels, self.dct_scaling)
        return TF.pil_to_tensor(crop)


class SkipCounter:
    """Counts unreadable images across loader workers, in shared memory.

    Each worker adds to its own slot, so no two processes write the same number. The first
    unreadable file is named in a warning; later ones are only counted.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(65, dtype=torch.int64).share_memory_()
        self.warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def add(self, path: str, error: Exception, what: str = "image") -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self.counts) - 1)
        self.counts[slot] += 1
        if not bool(self.warned):
            self.warned.fill_(True)
            log.warning(
                "unreadable %s %s skipped (%s: %s); further ones are counted in the log "
                "and in TensorBoard's data/skipped_images",
                what, path, type(error).__name__, error,
            )  # fmt: skip

    def take(self) -> int:
        """How many were skipped since the last call."""
        total = int(self.counts.sum())
        self.counts.zero_()
        return total


class ImageFiles(Dataset):
    """(path, label) pairs read by `reader`; an unreadable file yields None and is counted.

    With `fetch`, `reader` reads `fetch(i)` instead of sample i's path (data=hf: a table
    row's image bytes), and the path only names the sample, in logs and in `read_paths`.
    `fetch` is called inside the loader workers, so it must pickle.

    `unreadable[i]` (shared with loader workers) marks sample i once it failed to read, so
    that vit-eval can name the files behind its per-image predictions.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        reader: Callable[[Any], Any],
        skipped: SkipCounter,
        fetch: Callable[[int], Any] | None = None,
    ) -> None:
        self.samples = samples
        self.reader = reader
        self.skipped = skipped
        self.fetch = fetch
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, label = self.samples[i]
        try:
            return self.reader(path if self.fetch is None else self.fetch(i)), label
        except UNREADABLE as e:
            self.skipped.add(path, e)
            self.unreadable[i] = True
            return None

    def read_paths(self) -> list[str]:
        """The paths (or names) of the samples read so far without error, in order."""
        unreadable = self.unreadable.tolist()
        return [path for (path, _), bad in zip(self.samples, unreadable, strict=True) if not bad]
