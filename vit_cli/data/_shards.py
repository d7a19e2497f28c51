"""WebDataset tar shards read as a stream that every process and loader worker shares out
exactly: the `webdataset` library opens and unpacks the shards (`gopen`, its tar iterator,
its shuffle buffer); this module decides which samples each worker reads.

An epoch is the concatenation of the split's shards, in an order that seed and epoch fix
(training) or as listed (eval). Each process takes a contiguous run of that sequence, the
same number of batches in every process (the few samples left over at the end of a training
epoch are left out, as `EpochSampler` leaves them out); each loader worker takes a
contiguous run of its process's batches, and shuffles it through a seeded buffer. The order
of a whole epoch is then a function of the seed alone, which is what makes a mid-epoch resume
exact in what it covers: a resumed epoch replays its workers' streams and drops, before
decoding, the samples that were already trained on.

Sample counts per shard come from the `manifest.json` that `vit-data pack` writes beside its
shards, or else from a pass over the tar headers of local shards (no image is read).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vit_cli.data._decode import UNREADABLE
from vit_cli.data._image_files import SkipCounter
from vit_cli.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # what vit-data pack writes beside its shards


def webdataset_module() -> Any:
    """The webdataset package, or a UserError that says how to install it."""
    try:
        import webdataset
    except ImportError:
        raise UserError(
            "data=webdataset and vit-data pack need the webdataset package: "
            'pip install "vit-cli[webdataset]" (pip install -e ".[webdataset]" in a checkout).'
        ) from None
    return webdataset


# ----------------------------------------------------------------------------- shard lists


class Shard(NamedTuple):
    url: str  # a local path, or any URL webdataset's gopen opens (pipe:, http://, ...)
    samples: int


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url or url.startswith("pipe:") else os.path.expanduser(url)


def _read_manifest(folder_url: str) -> dict[str, Any] | None:
    """The manifest.json in a folder of shards, if there is one (None otherwise)."""
    local = _local_path(folder_url)
    try:
        if local is not None:
            with open(os.path.join(local, MANIFEST), "rb") as f:
                return json.load(f)
        with webdataset_module().gopen(f"{folder_url}/{MANIFEST}") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def count_samples(path: str) -> int:
    """The samples in a local tar shard, counted from its member headers as webdataset groups
    them (consecutive members with one base name are one sample); the data is skipped over."""
    base_plus_ext = webdataset_module().tariterators.base_plus_ext
    count, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = base_plus_ext(member.name)[0] if member.isreg() else None
            if key is None or _is_meta(member.name) or key == last:
                continue
            count, last = count + 1, key
    return count


def _is_meta(name: str) -> bool:
    """Whether webdataset's tar reader leaves the member out as metadata (`__index__`)."""
    top_level = "/" not in name and name.startswith("__") and name.endswith("__")
    return top_level or re.match(r"__[^/]*__($|/)", name) is not None


def shard_list(spec: str, setting: str) -> tuple[list[Shard], dict[str, Any] | None]:
    """The shards that `spec` names in WebDataset's notation ('train-{000000..000099}.tar',
    several joined by '::'), each with its count of samples, and the manifest beside the
    first of them (None if it has none)."""
    wds = webdataset_module()
    urls = wds.shardlists.expand_urls(spec)
    manifests: dict[str, dict[str, Any] | None] = {}
    listed: dict[str, dict[str, tuple[int, int]]] = {}
    shards = []
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in manifests:
            manifests[folder] = _read_manifest(folder or ".")
            listed[folder] = listed_shards(manifests[folder], folder or ".")
        shards.append(Shard(url, _samples_in(url, name, listed[folder], setting)))
    return shards, next(iter(manifests.values()), None)


TAR_BLOCK = 512  # a tar member takes a header block and at least one data block


def listed_shards(manifest: dict[str, Any] | None, where: str) -> dict[str, tuple[int, int]]:
    """(samples, bytes) of each shard file a manifest lists, checked to be counts that the
    file's size can hold, so that no count is taken on trust from a damaged manifest."""
    listed = {}
    try:
        for split in (manifest or {}).get("splits", {}).values():
            for entry in split["shards"]:
                samples, size = entry["samples"], entry["bytes"]
                if not (isinstance(samples, int) and isinstance(size, int)):
                    raise TypeError("counts must be integers")
                if samples < 0 or samples * 2 * TAR_BLOCK > size:
                    raise ValueError(f"{entry['file']}: {samples} samples in {size} bytes")
                listed[str(entry["file"])] = (samples, size)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{where}/{MANIFEST} is malformed ({type(e).__name__}: {e}). Write it again with "
            "vit-data pack, or remove it to count the shards' samples from their tar headers."
        ) from None
    return listed


def _samples_in(url: str, name: str, listed: dict[str, tuple[int, int]], setting: str) -> int:
    local = _local_path(url)
    if local is not None and not os.path.isfile(local):
        raise UserError(
            f"{setting}: shard {url} does not exist. Check the path and the brace range "
            "(e.g. 'shards/train-{000000..000009}.tar')."
        )
    if name in listed:
        samples, size = listed[name]
        if local is None or os.path.getsize(local) == size:
            return samples
    if local is None:
        raise UserError(
            f"{setting}: {url} has no {MANIFEST} beside it listing its samples, and a remote "
            "shard cannot be counted without reading it. Write the shards with vit-data pack "
            "(which writes the manifest), or copy them to a local disk."
        )
    try:
        return count_samples(local)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{setting}: {url} is not a readable tar file ({e}).") from None


# ----------------------------------------------------------------------------- samples


class BadSample(ValueError):
    """A sample that training skips and counts: a member name that leaves the shard's folder,
    no image or label under the configured keys, a label outside the classes, a truncated
    shard."""


@dataclass(frozen=True)
class Missing:
    """In place of a sample the shard was supposed to hold but could not give."""

    url: str
    reason: str


class SampleReader:
    """A WebDataset sample (a dict of the member files' bytes by extension) -> (uint8 image
    tensor, label, key); `read_image` decodes the image bytes as image folders' files are
    decoded (`FileReader`)."""

    def __init__(
        self,
        read_image: Callable[[Any], torch.Tensor],
        image_keys: list[str],
        label_key: str,
        num_classes: int,
    ) -> None:
        self.read_image = read_image
        self.image_keys = image_keys
        self.label_key = label_key
        self.num_classes = num_classes

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int, str]:
        key = sample["__key__"]
        if key.startswith("/") or ".." in PurePosixPath(key).parts:
            raise BadSample(f"member name {key!r} points outside the shard")
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        if image is None:
            raise BadSample(f"no image under {', '.join(self.image_keys)} (data.image_key)")
        if self.label_key not in sample:
            raise BadSample(f"no label under {self.label_key} (data.label_key)")
        text = sample[self.label_key].decode("utf-8", "replace").strip()
        if not text.isdigit() or int(text) >= self.num_classes:
            raise BadSample(f"label {text!r} is not a class number 0..{self.num_classes - 1}")
        return self.read_image(io.BytesIO(image)), int(text), key


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Block:
    """A loader worker's part of its process's share: `batches` batches, from sample `start`
    to `stop` of the epoch's sequence."""

    start: int
    stop: int
    batches: int


def batch_ranges(total: int, rank: int, world_size: int, batch: int, train: bool) -> list[range]:
    """The batches of process `rank` as ranges of the epoch's sequence of `total` samples.

    Training: every process takes total // world_size samples, cut down to whole batches
    when there is more than one batch (the rest of the epoch is left out), so that every
    process runs the same number of steps. Eval: every sample in exactly one process.
    """
    if train:
        share = total // world_size
        if share > batch:
            share -= share % batch
        start, stop = rank * share, (rank + 1) * share
    else:
        start, stop = rank * total // world_size, (rank + 1) * total // world_size
    return [range(b, min(b + batch, stop)) for b in range(start, stop, batch)]


def worker_blocks(batches: list[range], workers: int) -> list[Block]:
    """Contiguous runs of `batches` for `workers` loader workers: worker w takes as many as
    a DataLoader's round robin asks of it (batches w, w + workers, ... of the process)."""
    blocks, first = [], 0
    for w in range(workers):
        n = len(range(w, len(batches), workers))
        if n == 0:
            blocks.append(Block(0, 0, 0))
            continue
        blocks.append(Block(batches[first].start, batches[first + n - 1].stop, n))
        first += n
    return blocks


class ShardStream(IterableDataset):
    """One split's shards as (image, label, key) samples (None for a sample that cannot be
    read, counted in `skipped`), shared out between processes and loader workers.

    `distribute(batch_size, rank, world_size)` fixes the process's part; `set_epoch(seed,
    start)` fixes the next pass's order and where it starts, as `EpochSampler.set_epoch`
    does for indexable data. The epoch's seed and start sit in shared memory, so that
    persistent loader workers read them when the next pass begins.
    """

    def __init__(
        self,
        shards: list[Shard],
        reader: SampleReader,
        skipped: SkipCounter,
        train: bool,
        shuffle_buffer: int,
        key_log: Path | None = None,
    ) -> None:
        self.shards = shards
        self.reader = reader
        self.skipped = skipped
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.key_log = key_log
        self.total = sum(s.samples for s in shards)
        self.batch_size, self.rank, self.world_size = 1, 0, 1
        self.epoch = torch.zeros(2, dtype=torch.int64).share_memory_()  # seed, start

    def distribute(self, batch_size: int, rank: int, world_size: int) -> None:
        """Read as process `rank` of `world_size`, in batches of `batch_size`."""
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def batches(self) -> list[range]:
        return batch_ranges(self.total, self.rank, self.world_size, self.batch_size, self.train)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())

    def set_epoch(self, seed: int, start: int = 0) -> None:
        """Fix the next pass's shard order and shuffle by `seed`, and start it at sample
        `start` of this process's share (a whole number of batches: a resumed epoch). Set
        before every training pass (`DataBundle.train_epoch`); eval reads in order."""
        self.epoch[0], self.epoch[1] = seed, start // self.batch_size

    def without_keys(self, batches: Iterator[tuple], epoch: int) -> Iterator[tuple]:
        """`batches` (images, labels, keys) as (images, labels). With `key_log`, each batch's
        keys are appended to key_log/keys-rank<R>.txt as the batch is taken to be trained
        on, a line each (the epoch, a tab, the key): what every process trained on."""
        path = None if self.key_log is None else self.key_log / f"keys-rank{self.rank}.txt"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        for images, labels, keys in batches:
            if path is not None:
                with path.open("a") as f:
                    f.writelines(f"{epoch}\t{key}\n" for key in keys)
            yield images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str] | None]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        seed, done = self.epoch.tolist()
        # The DataLoader asks its workers for batches in turn from worker 0, so a resumed
        # pass gives worker 0 the part whose turn is next.
        part = (worker + done) % workers
        block = worker_blocks(self.batches(), workers)[part]
        stream: Iterator[Any] = self._read(self._order(seed), block)
        if self.train:
            shuffle = webdataset_module().filters.shuffle
            buffer = min(self.shuffle_buffer, block.stop - block.start) or 1
            stream = shuffle(buffer, initial=buffer, seed=f"{seed}/{self.rank}/{part}")(stream)
        consumed = len(range(part, done, workers)) * self.batch_size
        for sample in itertools.islice(stream, consumed, None):
            yield self._decoded(sample)

    def _order(self, seed: int) -> list[Shard]:
        if not self.train:
            return self.shards
        generator = torch.Generator().manual_seed(seed)
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator)]

    def _read(self, shards: list[Shard], block: Block) -> Iterator[dict[str, Any] | Missing]:
        """The samples from `block.start` to `block.stop` of the sequence of `shards`,
        undecoded; a sample a shard fails to give is `Missing`."""
        offset = 0
        for shard in shards:
            first, last = max(block.start - offset, 0), min(block.stop - offset, shard.samples)
            offset += shard.samples
            if first < last:
                yield from self._read_shard(shard.url, first, last)
            if offset >= block.stop:
                return

    def _read_shard(self, url: str, first: int, last: int) -> Iterator[dict[str, Any] | Missing]:
        wds = webdataset_module()
        errors: list[Exception] = []

        def stop_on_error(error: Exception) -> bool:
            errors.append(error)
            return False

        samples = wds.tariterators.tarfile_samples([{"url": url}], handler=stop_on_error)
        got = 0
        for sample in itertools.islice(samples, first, last):
            got += 1
            yield sample
        if got < last - first:
            why = f"{type(errors[0]).__name__}: {errors[0].args[0]}" if errors else "fewer samples"
            reason = f"shard ends early ({why}); its manifest or tar headers list more samples"
            yield from itertools.repeat(Missing(url, reason), last - first - got)

    def _decoded(self, sample: dict[str, Any] | Missing) -> tuple[torch.Tensor, int, str] | None:
        if isinstance(sample, Missing):
            self.skipped.add(sample.url, BadSample(sample.reason), "sample")
            return None
        try:
            return self.reader(sample)
        except (BadSample, *UNREADABLE) as e:
            self.skipped.add(f"{sample['__key__']} of {sample['__url__']}", e, "sample")
            return None
