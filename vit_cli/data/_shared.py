"""What every data source shares: image files, images in memory, the batch collate step, the
class-stratified hold-out and the loaders.

Every dataset yields images of one size as uint8 (or [0, 1] float) tensors; the loader's
collate step (`Collate` + `BatchAugment`) augments and normalises a whole batch at once.
Small datasets (digits, CIFAR, the MNIST family) are held in memory (`MemoryImages`), and a
batch is taken from them with one indexing operation: no decoding and no Python per image.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from vit_cli.augment import BatchAugment, build_batch_augment, pil_mode
from vit_cli.config import DataConfig
from vit_cli.runtime import Runtime

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str]
    # Unreadable image files met by either loader (sources that read files: imagefolder).
    skipped: SkipCounter | None = None
    # Whether the val loader reads the images that vit-train scores as val: false when it
    # reads a test split that training never scored (vit-eval --split test).
    same_val_as_training: bool = True

    def train_epoch(self, seed: int, skip_batches: int = 0) -> Iterator:
        """The training batches of the epoch whose order `seed` fixes, from batch number
        `skip_batches` on (a resumed epoch)."""
        self.train_loader.sampler.set_epoch(seed, skip_batches * self.train_loader.batch_size)
        return iter(self.train_loader)


@dataclass
class Splits:
    """What a source's builder returns: the datasets and the class names, in label order."""

    train: Dataset
    val: Dataset
    class_names: list[str]
    # The counter its datasets report unreadable files to (`ImageFiles`), if they read files.
    skipped: SkipCounter | None = None
    # The dataset's official test split, when it has one (vit-eval --split test); it is
    # `val` itself when val is the test split (CIFAR, and the MNIST family by default).
    test: Dataset | None = None


# ----------------------------------------------------------------------------- in memory


class StackedSamples(NamedTuple):
    """A batch of samples taken from `MemoryImages` at once: what its collate step stacks."""

    images: torch.Tensor  # (B, C, H, W)
    labels: torch.Tensor  # (B,)


class MemoryImages(TensorDataset):
    """Images (N, C, H, W) and labels (N,) held as tensors.

    A DataLoader asks for a whole batch at once (`__getitems__`), so a batch is one indexing
    operation instead of one Python call per image and a stack.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(images, labels)

    def __getitems__(self, indices: list[int]) -> StackedSamples:
        index = torch.as_tensor(indices, dtype=torch.long)
        images, labels = self.tensors
        return StackedSamples(images[index], labels[index])


def split_each_class(
    members: list[list[T]], fraction: float, seed: int
) -> tuple[list[list[T]], list[list[T]]]:
    """Hold out `fraction` of each class's members (at least one, never all), drawn with `seed`.

    `members[k]` lists class k's members; returns the kept and the held-out members of each
    class, each in their given order. The same seed always draws the same members.
    """
    generator = torch.Generator().manual_seed(seed)
    kept, held_out = [], []
    for group in members:
        order = torch.randperm(len(group), generator=generator).tolist()
        n_out = min(max(round(len(group) * fraction), 1), len(group) - 1)
        out = set(order[:n_out])
        held_out.append([m for i, m in enumerate(group) if i in out])
        kept.append([m for i, m in enumerate(group) if i not in out])
    return kept, held_out


# ----------------------------------------------------------------------------- loading


class SkipCounter:
    """Counts unreadable images across loader workers, in shared memory.

    Each worker adds to its own slot, so no two processes write the same number. The first
    unreadable file is named in a warning; later ones are only counted.
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(65, dtype=torch.int64).share_memory_()
        self.warned = torch.zeros(1, dtype=torch.bool).share_memory_()

    def add(self, path: str, error: Exception) -> None:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self.counts) - 1)
        self.counts[slot] += 1
        if not bool(self.warned):
            self.warned.fill_(True)
            log.warning(
                "unreadable image %s skipped (%s: %s); further ones are counted in the log "
                "and in TensorBoard's data/skipped_images",
                path, type(error).__name__, error,
            )  # fmt: skip

    def take(self) -> int:
        """How many were skipped since the last call."""
        total = int(self.counts.sum())
        self.counts.zero_()
        return total


# What PIL raises for an unreadable file: OSError when it is truncated or not an image,
# SyntaxError for a broken header, DecompressionBombError (a ValueError subclass in newer
# Pillow) for a huge one.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnsupportedImage(ValueError):
    """An image file vit_cli refuses to decode: too many pixels, or a pixel format it would
    get wrong. One of UNREADABLE, so it is skipped and counted like a corrupt file."""


def read_image(path: str | Path, in_chans: int, max_pixels: int) -> Image.Image:
    """Decode an image file in the model's channels ("L" or "RGB"); raises UNREADABLE.

    An image of more than `max_pixels` is refused before it is decoded (Pillow's own limit,
    about 179 million, would let a 12,000 x 12,000 PNG take 2.7 GB). 16-bit grayscale keeps
    its top 8 bits (PIL's own conversion clips it to white); 32-bit integer and floating
    point images are refused, since their range is unknown.
    """
    with Image.open(path) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise UnsupportedImage(
                f"{width}x{height} = {width * height:,} pixels, above the limit of "
                f"{max_pixels:,} (data.max_image_pixels; vit-predict --max-pixels)"
            )
        if image.mode.startswith("I;16"):
            high_bytes = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            return Image.fromarray(high_bytes, "L").convert(pil_mode(in_chans))
        if image.mode in ("I", "F"):
            kind = "floating-point" if image.mode == "F" else "32-bit integer"
            raise UnsupportedImage(
                f"{kind} pixels (PIL mode {image.mode}) have no fixed range; save the image "
                "with 8 or 16 bits per channel"
            )
        return image.convert(pil_mode(in_chans))


class ImageFiles(Dataset):
    """(path, label) pairs read with PIL; an unreadable file yields None and is counted.

    `unreadable[i]` (shared with loader workers) marks sample i once it failed to read, so
    that vit-eval can name the files behind its per-image predictions.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        in_chans: int,
        transform,
        skipped: SkipCounter,
        max_pixels: int,
    ) -> None:
        self.samples = samples
        self.in_chans = in_chans
        self.max_pixels = max_pixels
        self.transform = transform
        self.skipped = skipped
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            image = read_image(path, self.in_chans, self.max_pixels)
        except UNREADABLE as e:
            self.skipped.add(path, e)
            self.unreadable[i] = True
            return None
        return self.transform(image), label

    def read_paths(self) -> list[str]:
        """The paths of the samples read so far without error, in order."""
        unreadable = self.unreadable.tolist()
        return [path for (path, _), bad in zip(self.samples, unreadable, strict=True) if not bad]


# Seconds to wait on the network when fetching a dataset, so that an offline machine fails fast.
DOWNLOAD_TIMEOUT = 30.0


@contextlib.contextmanager
def network_timeout(seconds: float = DOWNLOAD_TIMEOUT) -> Iterator[None]:
    """Give every socket opened inside a timeout of `seconds` (torchvision's downloaders set
    none), then restore the previous default."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run torch ops on `threads` intra-op threads (None: as they are), then restore the count.

    On a CPU-bound host, augmenting a batch gains little from more threads, and when another
    process holds a core, a thread pool waiting for it stalls loading (docs/results.md, "Host
    settings"). Loader workers already run on one thread.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Collate:
    """Stack a list of (image, label) samples, dropping None (or take `StackedSamples` as
    they are), then run `augment` on the batch with `threads` intra-op threads (None: as many
    as the process has)."""

    def __init__(
        self, augment: BatchAugment, sample_shape: tuple[int, int, int], threads: int | None
    ) -> None:
        self.augment = augment
        self.sample_shape = sample_shape
        self.threads = threads

    def __call__(self, samples: list | StackedSamples) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(samples, StackedSamples):
            images, labels = samples
        else:
            samples = [s for s in samples if s is not None]
            if not samples:
                return torch.empty(0, *self.sample_shape), torch.empty(0, dtype=torch.long)
            images = torch.stack([image for image, _ in samples])  # (B, C, H, W)
            labels = torch.as_tensor([int(label) for _, label in samples])  # (B,)
        with _intra_op_threads(self.threads):
            return self.augment(images), labels


# ----------------------------------------------------------------------------- loaders


def loaders(
    cfg: DataConfig,
    splits: Splits,
    img_size: int,
    generator: torch.Generator,
    pin_memory: bool = False,
    runtime: Runtime | None = None,
) -> DataBundle:
    """The train/val loaders of `splits`, batched, augmented and normalised as `cfg` says."""
    runtime = runtime or Runtime(torch.device("cpu"))
    shape = (cfg.in_chans, img_size, img_size)
    workers = cfg.num_workers
    threads = cfg.augment_threads
    if threads is None and runtime.device.type == "cpu":
        threads = 1
    common = dict(
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    train_sampler = runtime.train_sampler(len(splits.train), generator, cfg.augment.repeats)
    train_loader = DataLoader(
        splits.train,
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        drop_last=len(train_sampler) > cfg.batch_size,
        generator=generator,
        collate_fn=Collate(
            build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, cfg.shift, True),
            shape,
            threads,
        ),
        **common,
    )
    val_loader = DataLoader(
        splits.val,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        sampler=runtime.eval_sampler(len(splits.val)),
        collate_fn=Collate(
            build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, 0, False),
            shape,
            threads,
        ),
        **common,
    )
    return DataBundle(
        train_loader,
        val_loader,
        len(splits.class_names),
        cfg.in_chans,
        img_size,
        splits.class_names,
        splits.skipped,
    )
