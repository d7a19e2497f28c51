"""What every data source shares: images in memory, the batch collate step, the
class-stratified hold-out and the loaders (image files: `_image_files`).

Every dataset yields images of one size as uint8 (or [0, 1] float) tensors; the loader's
collate step (`Collate` + `BatchAugment`) augments and normalises a whole batch at once.
Small datasets (digits, CIFAR, the MNIST family) are held in memory (`MemoryImages`), and a
batch is taken from them with one indexing operation: no decoding and no Python per image.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vit_cli.augment import BatchAugment, build_batch_augment
from vit_cli.config import DataConfig
from vit_cli.data._device_decode import (
    BytesReader,
    DecodedLoader,
    DeviceDecoder,
    EncodedCollate,
)
from vit_cli.data._image_files import SkipCounter
from vit_cli.data._shards import ShardStream
from vit_cli.errors import UserError
from vit_cli.runtime import Runtime

T = TypeVar("T")


@dataclass
class DataBundle:
    train_loader: DataLoader  # or a DecodedLoader (data.decode=device), which acts as one
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

    def train_epoch(self, seed: int, skip_batches: int = 0, epoch: int = 0) -> Iterator:
        """The training batches of epoch `epoch`, whose order `seed` fixes, from batch number
        `skip_batches` on (a resumed epoch)."""
        loader = self.train_loader
        start = skip_batches * loader.batch_size
        if isinstance(loader.dataset, ShardStream):
            loader.dataset.set_epoch(seed, start)
            return loader.dataset.without_keys(iter(loader), epoch)
        loader.sampler.set_epoch(seed, start)
        return iter(loader)


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
    """Stack a list of (image, label) or (image, label, key) samples, dropping None (or take
    `StackedSamples` as they are), then run `augment` on the batch with `threads` intra-op
    threads (None: as many as the process has). With `keys`, the batch's sample keys come
    third."""

    def __init__(
        self,
        augment: BatchAugment,
        sample_shape: tuple[int, int, int],
        threads: int | None,
        keys: bool = False,
    ) -> None:
        self.augment = augment
        self.sample_shape = sample_shape
        self.threads = threads
        self.keys = keys

    def __call__(self, samples: list | StackedSamples) -> tuple:
        if isinstance(samples, StackedSamples):
            images, labels = samples
        else:
            samples = [s for s in samples if s is not None]
            if not samples:
                images = torch.empty(0, *self.sample_shape)
                labels = torch.empty(0, dtype=torch.long)
                return (images, labels, []) if self.keys else (images, labels)
            images = torch.stack([s[0] for s in samples])  # (B, C, H, W)
            labels = torch.as_tensor([int(s[1]) for s in samples])  # (B,)
        with _intra_op_threads(self.threads):
            batch = self.augment(images), labels
        return (*batch, [s[2] for s in samples]) if self.keys else batch


# ----------------------------------------------------------------------------- loaders


def _check_device_decoding(cfg: DataConfig, splits: Splits) -> None:
    if not all(
        isinstance(getattr(s, "reader", None), BytesReader) for s in (splits.train, splits.val)
    ):
        raise UserError(
            f"data.decode=device decodes image files; data={cfg.name} holds its images in "
            "memory or decodes them itself. Leave data.decode at workers."
        )


def _stream_loaders(
    cfg: DataConfig,
    splits: Splits,
    runtime: Runtime,
    collates: tuple[Collate, Collate],
    common: dict,
) -> tuple[DataLoader, DataLoader]:
    """The loaders of shards (`ShardStream`): the streams share themselves out between the
    processes and their workers, so there is no sampler; training batches carry their keys."""
    if cfg.augment.repeats > 1:
        raise UserError(
            f"data.augment.repeats={cfg.augment.repeats} repeats samples drawn by index; "
            f"data={cfg.name} streams its samples. Set data.augment.repeats=1."
        )
    eval_batch = cfg.eval_batch_size or cfg.batch_size
    splits.train.distribute(cfg.batch_size, runtime.rank, runtime.world_size)
    splits.val.distribute(eval_batch, runtime.rank, runtime.world_size)
    train_loader = DataLoader(
        splits.train, batch_size=cfg.batch_size, collate_fn=collates[0], **common
    )
    val_loader = DataLoader(splits.val, batch_size=eval_batch, collate_fn=collates[1], **common)
    return train_loader, val_loader


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
    workers = runtime.loader_workers() if cfg.num_workers == "auto" else cfg.num_workers
    threads = cfg.augment_threads
    if threads is None and runtime.device.type == "cpu":
        threads = 1
    common = dict(
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    train_augment = build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, cfg.shift, True)
    val_augment = build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, 0, False)
    on_device = cfg.decode == "device"
    if on_device:
        _check_device_decoding(cfg, splits)
    if isinstance(splits.train, ShardStream):
        collates = (
            Collate(train_augment, shape, threads, keys=True),
            Collate(val_augment, shape, threads),
        )
        train_loader, val_loader = _stream_loaders(cfg, splits, runtime, collates, common)
    else:
        train_sampler = runtime.train_sampler(len(splits.train), generator, cfg.augment.repeats)
        train_loader = DataLoader(
            splits.train,
            batch_size=cfg.batch_size,
            sampler=train_sampler,
            drop_last=len(train_sampler) > cfg.batch_size,
            generator=generator,
            collate_fn=EncodedCollate() if on_device else Collate(train_augment, shape, threads),
            **common,
        )
        val_loader = DataLoader(
            splits.val,
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            sampler=runtime.eval_sampler(len(splits.val)),
            collate_fn=EncodedCollate() if on_device else Collate(val_augment, shape, threads),
            **common,
        )
    if on_device:
        C, device, skipped = cfg.in_chans, runtime.device, splits.skipped
        train_loader = DecodedLoader(
            train_loader, DeviceDecoder(img_size, C, train_augment, device, skipped)
        )
        val_loader = DecodedLoader(
            val_loader, DeviceDecoder(img_size, C, val_augment, device, skipped)
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
