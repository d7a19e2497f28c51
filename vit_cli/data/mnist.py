"""data=mnist, data=fashion_mnist and data=kmnist: the MNIST family, read from its IDX files.

MNIST (LeCun et al., 1998), Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) and
Kuzushiji-MNIST (Clanuwat et al., 2018) each come as four IDX files: 60,000 training and
10,000 test images of 28x28 grey levels, and their labels, gzipped or not. They are read from
data.root, laid out flat or as torchvision lays them out (`<root>/FashionMNIST/raw/`); with
no data.root, from Debian's package where there is one (`apt-get install
dataset-fashion-mnist`), else from ~/.cache/vit_cli/data, where vit-train downloads them
with torchvision's own downloader (data.download).

Both splits are held in memory as uint8. The official test split is the val split, unless
data.val_fraction holds out a stratified part of train as val (vit-eval --split test then
scores the test split).

Every header is checked before anything is allocated from it: a file that is not IDX, holds
another type or shape, is shorter or longer than its header says, or whose labels do not
match its images stops the run with one line naming the file.
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

from vit_cli.config import Check, HeldOutConfig, one_of
from vit_cli.data import DataSource
from vit_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torchvision import datasets

    from vit_cli.data._shared import MemoryImages, Splits

log = logging.getLogger(__name__)

NAMES = ("mnist", "fashion_mnist", "kmnist")
# Where Debian's dataset packages put the files (only Fashion-MNIST is packaged).
SYSTEM_FOLDERS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
# Where the files are downloaded to, and looked for, when data.root is not set.
DEFAULT_ROOT = Path("~/.cache/vit_cli/data")
# The files of each split, without their .gz suffix.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX's data type codes (the third byte of the magic number) and their names.
IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
             0x0E: "float64"}  # fmt: skip
UINT8 = 0x08
READ_CHUNK = 1 << 22
# The classes in label order (torchvision's names, with MNIST's digits as plain numerals).
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}  # fmt: skip


@dataclass
class IdxConfig(HeldOutConfig):
    name: str = "fashion_mnist"
    # The folder with the four IDX files, flat or in torchvision's <Name>/raw/ (null: Debian's
    # package folder when it exists, else ~/.cache/vit_cli/data).
    root: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    # Fetch missing files with torchvision's downloader (official mirrors, md5 checked).
    download: bool = True
    # data.val_fraction 0: the official test split is the val split. Above 0: that share of
    # each training class is held out as val instead, and the test split is scored once,
    # by vit-eval --split test.

    def checks(self) -> list[Check]:
        return [*super().checks(), one_of("data.name", self.name, NAMES)]


def _torchvision_class(name: str) -> type[datasets.MNIST]:
    """torchvision's class of data.name: it names the raw folder, the mirrors and the md5s."""
    from torchvision import datasets

    return {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
            "kmnist": datasets.KMNIST}[name]  # fmt: skip


def _root(cfg: IdxConfig) -> Path:
    """data.root, or Debian's folder of this dataset when it exists, or the default root."""
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
        if root.exists() and not root.is_dir():
            raise UserError(f"data.root={cfg.root} is a file; it must name a folder.")
        return root
    system = SYSTEM_FOLDERS.get(cfg.name)
    if system is not None and system.is_dir():
        return system
    return DEFAULT_ROOT.expanduser()


def _find(folder: Path, stem: str) -> Path | None:
    """`stem` in `folder`, uncompressed or gzipped (the uncompressed file when both are)."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _idx_files(cfg: IdxConfig, root: Path) -> dict[str, Path] | None:
    """The four files, by stem, from the first of root and root/<Name>/raw that has them all."""
    stems = [stem for pair in FILES.values() for stem in pair]
    raw = root / _torchvision_class(cfg.name).__name__ / "raw"
    for folder in (root, raw):
        found = {stem: _find(folder, stem) for stem in stems}
        if all(found.values()):
            return found
    return None


def _layout_hint(cfg: IdxConfig, root: Path) -> str:
    cls = _torchvision_class(cfg.name)
    names = ", ".join(f"{stem}.gz" for pair in FILES.values() for stem in pair)
    return (
        f"data={cfg.name} reads {names} (gzipped or not) from {root} or "
        f"{root / cls.__name__ / 'raw'}"
    )


def _download(cfg: IdxConfig, root: Path) -> None:
    """Fetch the files into root/<Name>/raw with torchvision's downloader, which tries each
    official mirror and checks every file's md5; or explain where to put them."""
    from vit_cli.data._shared import network_timeout

    cls = _torchvision_class(cfg.name)
    log.info("downloading %s to %s", cfg.name, root / cls.__name__ / "raw")
    try:
        with network_timeout():
            cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors
        _remove_unverified(cls, root / cls.__name__ / "raw")
        raise UserError(
            f"data={cfg.name}: could not download the files ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Fetch them from {cls.mirrors[0]} "
            f"and put them in {root}, then run again. {_layout_hint(cfg, root)}."
        ) from e


def _remove_unverified(cls: type[datasets.MNIST], folder: Path) -> None:
    """Delete downloaded files whose md5 is not the official one, so that a failed or
    corrupted download is not read as the dataset on the next run."""
    from torchvision.datasets.utils import check_integrity

    for filename, md5 in cls.resources:
        path = folder / filename
        if path.is_file() and not check_integrity(str(path), md5):
            path.unlink()


def prepare(cfg: IdxConfig) -> None:
    """Download the files when they are missing and data.download is true."""
    root = _root(cfg)
    if _idx_files(cfg, root) is not None:
        return
    if not cfg.download:
        raise UserError(
            f"{_layout_hint(cfg, root)}, and they are not there. Put them there, set "
            "data.root=<folder>, or set data.download=true."
        )
    root.mkdir(parents=True, exist_ok=True)
    _download(cfg, root)


# ----------------------------------------------------------------------------- IDX files


class BadIdxFile(ValueError):
    """An IDX file that cannot be what it claims; the message says what is wrong."""


def _read_bounded(f: BinaryIO, size: int) -> bytearray:
    """Up to `size + 1` bytes of `f`, in chunks: memory grows with the bytes that are
    really there, never with what a header claims."""
    data = bytearray()
    while len(data) <= size:
        chunk = f.read(min(READ_CHUNK, size + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _read_idx(f: BinaryIO, ndim: int, file_size: int | None) -> np.ndarray:
    """An IDX array of `ndim` dimensions and uint8 values from `f`.

    `file_size` (None for a compressed stream) is checked against the header before any
    data is read.
    """
    import numpy as np

    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\x00\x00":
        raise BadIdxFile(
            f"it is not an IDX file (it starts with {magic.hex() or 'nothing'}; an IDX file "
            "starts with 0000, then a type and a dimension count)"
        )
    dtype, dims = magic[2], magic[3]
    if dtype != UINT8:
        kind = IDX_TYPES.get(dtype, "an unknown type")
        raise BadIdxFile(
            f"its values are {kind} (type code 0x{dtype:02X}); the MNIST family holds uint8 (0x08)"
        )
    if dims != ndim:
        raise BadIdxFile(f"it has {dims} dimensions where {ndim} were expected")
    header = f.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise BadIdxFile("it ends inside its header")
    shape = struct.unpack(f">{ndim}I", header)
    if min(shape) == 0:
        raise BadIdxFile(f"its header declares an empty array {shape}")
    size = math.prod(shape)
    declared = f"its header declares {' x '.join(map(str, shape))} values ({size:,} bytes)"
    # A plain file's length is checked before reading; a compressed stream's as it is read.
    data = None if file_size is not None else _read_bounded(f, size)
    held = file_size - 4 - 4 * ndim if data is None else len(data)
    if held < size:
        raise BadIdxFile(f"{declared}, but it holds only {held:,}: it is truncated")
    if held > size:
        raise BadIdxFile(f"{declared}, but it holds more: it is longer than its header says")
    if data is None:
        data = _read_bounded(f, size)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array in the IDX file at `path` (gzipped or not); raises UserError naming
    the file and what is wrong with it."""
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=raw) as f:
                    return _read_idx(f, ndim, None)
            return _read_idx(raw, ndim, path.stat().st_size)
    except BadIdxFile as e:
        reason = str(e)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        reason = f"it cannot be read ({type(e).__name__}: {e})"
    raise UserError(f"{path}: {reason}. Replace it with the dataset's original file.")


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> MemoryImages:
    """One split's images (N, 1, H, W) and labels (N,), checked against each other."""
    import torch

    from vit_cli.data._shared import MemoryImages

    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds "
            f"{len(labels):,} labels. Replace them with the dataset's original files."
        )
    bad = labels >= num_classes
    if bad.any():
        row = int(bad.argmax())
        raise UserError(
            f"{labels_path}: label {int(labels[row])} at row {row} is outside 0..{num_classes - 1}"
            ". Replace it with the dataset's original file."
        )
    pixels = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W)
    return MemoryImages(pixels, torch.from_numpy(labels).long())


def _hold_out(data: MemoryImages, fraction: float, seed: int, num_classes: int):
    """`data` split into train and a stratified held-out val (`split_each_class`)."""
    import torch

    from vit_cli.data._shared import MemoryImages, split_each_class

    images, labels = data.tensors
    members = [(labels == k).nonzero().flatten().tolist() for k in range(num_classes)]
    kept, held_out = split_each_class([m for m in members if m], fraction, seed)

    def subset(groups: list[list[int]]) -> MemoryImages:
        index = torch.tensor(sorted(i for group in groups for i in group))
        return MemoryImages(images[index], labels[index])

    return subset(kept), subset(held_out)


def build(cfg: IdxConfig, img_size: int) -> Splits:
    """Both splits in memory as uint8; val is the test split or a held-out part of train."""
    from vit_cli.data._shared import Splits

    root = _root(cfg)
    files = _idx_files(cfg, root)
    if files is None:
        raise UserError(
            f"{_layout_hint(cfg, root)}, and they are not there. vit-train downloads them with "
            "data.download=true; vit-eval reads only data that is in place."
        )
    class_names = CLASS_NAMES[cfg.name]
    splits = {
        split: read_split(files[images], files[labels], len(class_names))
        for split, (images, labels) in FILES.items()
    }
    train, test = splits["train"], splits["test"]
    if train.tensors[0].shape[1:] != test.tensors[0].shape[1:]:
        raise UserError(
            f"The training images are {tuple(train.tensors[0].shape[2:])} and the test images "
            f"{tuple(test.tensors[0].shape[2:])} in {root}: both splits must have one size."
        )
    if cfg.val_fraction == 0:
        return Splits(train, test, class_names, test=test)
    train, val = _hold_out(train, cfg.val_fraction, cfg.split_seed, len(class_names))
    return Splits(train, val, class_names, test=test)


SOURCE = DataSource(schema=IdxConfig, build=build, prepare=prepare, names=NAMES)
