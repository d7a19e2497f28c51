"""data=cifar10 and data=cifar100: the python batches of Krizhevsky (2009) in data.root.

vit-train extracts the archive there (downloading it with data.download), and both splits
are read into memory as uint8; vit-eval reads only an extracted folder. The batches are
unpickled allowing numeric arrays only, and the archive is extracted inside data.root only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import pickletools
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vit_cli.config import Check, DataConfig, one_of
from vit_cli.data import DataSource
from vit_cli.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torchvision import datasets

    from vit_cli.data._shared import MemoryImages, Splits

log = logging.getLogger(__name__)

NAMES = ("cifar10", "cifar100")


@dataclass
class CifarConfig(DataConfig):
    name: str = "cifar10"
    # The folder that holds the extracted batches, or the archive, or gets the download.
    root: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    # Fetch the archive into data.root when it is not there.
    download: bool = False
    # Refuse an archive whose md5 is not the official one (false: accept a subset or a
    # re-packed copy of your own).
    check_md5: bool = True

    def checks(self) -> list[Check]:
        return [*super().checks(), one_of("data.name", self.name, NAMES)]


def _cifar_class(name: str) -> type[datasets.CIFAR10]:
    """torchvision's CIFAR class of data.name: it names the files, the official address and
    the archive's md5."""
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


def _numeric_dtype(spec, *args) -> np.dtype:
    """numpy.dtype, for numbers only: an object array would unpickle arbitrary objects."""
    import numpy as np

    dtype = np.dtype(spec, *args)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"it holds a {dtype} array; CIFAR batches hold numbers")
    return dtype


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of numeric numpy arrays and lists) and nothing else.

    The batches are Python 2 pickles; allowing only the globals that numeric numpy arrays
    need keeps a doctored file from running code, as `weights_only` does for checkpoints.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        if (module, name) == ("numpy", "dtype"):
            return _numeric_dtype
        return super().find_class(module, name)


def _check_sizes(data: bytes) -> None:
    """Raise ValueError where the pickle `data` states a size its bytes do not hold.

    The unpickler allocates what a length field or a memo index says before it reads on: a
    damaged byte could make it claim up to 2**63 bytes. pickletools walks the opcodes
    without allocating, and raises ValueError for a length beyond the end of the data.
    """
    opcodes = list(pickletools.genops(data))
    for opcode, arg, position in opcodes:
        if opcode.name.endswith("PUT") and arg > len(opcodes):
            raise ValueError(f"a memo index of {arg} at byte {position}, beyond its objects")


def _read_batch(path: Path) -> dict:
    data = path.read_bytes()
    _check_sizes(data)
    try:
        entry = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # only the allowed globals run: a damaged file's calls fail
        raise ValueError(f"{type(e).__name__}: {e}") from e
    if not isinstance(entry, dict):
        raise ValueError(f"it holds a {type(entry).__name__}, not a dict")
    return entry


def _read_cifar(
    folder: Path, cls: type[datasets.CIFAR10], train: bool, num_classes: int
) -> MemoryImages:
    """The batch files of one split as uint8 images (N, 3, 32, 32) and labels (N,)."""
    import numpy as np
    import torch

    from vit_cli.data._shared import MemoryImages

    images, labels = [], []
    for name, _ in cls.train_list if train else cls.test_list:
        path = folder / name
        try:
            entry = _read_batch(path)
            data = entry["data"]
            batch_labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
                raise ValueError("its data is not a uint8 array of rows")
            if data.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(data):
                raise ValueError(
                    f"{len(data)} rows of {data.shape[1]} values, {len(batch_labels)} labels"
                )
            batch_labels = torch.tensor(batch_labels, dtype=torch.long)
        except (
            pickle.UnpicklingError,
            EOFError,
            KeyError,
            TypeError,
            ValueError,
            RuntimeError,
        ) as e:
            raise UserError(
                f"{path} is not a CIFAR batch ({type(e).__name__}: {e}). Delete {folder} and "
                f"extract {cls.filename} again, or fetch it anew."
            ) from e
        bad = (batch_labels < 0) | (batch_labels >= num_classes)
        if bad.any():
            raise UserError(
                f"{path} has labels outside 0..{num_classes - 1} (e.g. {int(batch_labels[bad][0])}"
                f" at row {int(bad.nonzero()[0])}). Delete {folder} and extract {cls.filename} again."
            )
        images.append(torch.from_numpy(data).view(-1, 3, 32, 32))  # rows: R, G, B planes
        labels.append(batch_labels)
    return MemoryImages(torch.cat(images), torch.cat(labels))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_cifar(cls: type[datasets.CIFAR10], root: Path, name: str) -> None:
    """Download the archive into `root` (checked against its md5), or explain where to put it."""
    from torchvision.datasets.utils import download_url

    from vit_cli.data._shared import network_timeout

    archive = root / cls.filename
    log.info("downloading %s to %s", cls.url, root)
    try:
        with network_timeout():
            download_url(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors
        archive.unlink(missing_ok=True)  # a partial download would be taken for the archive
        raise UserError(
            f"data={name}: could not download {cls.url} ({type(e).__name__}: {e}). Download "
            f"{cls.url} and put {cls.filename} in {root} (the folder data.root names), then "
            "run again."
        ) from e


def _extract(archive: Path, root: Path) -> None:
    """Extract a tar archive inside `root` only: Python's "data" filter refuses members with
    absolute paths or `..`, links that leave the folder, and device files."""
    if not hasattr(tarfile, "data_filter"):
        raise UserError(
            f"This Python ({sys.version.split()[0]}) cannot extract archives safely (tarfile's "
            f"data filter). Upgrade Python, or extract {archive} into {root} yourself."
        )
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    except tarfile.FilterError as e:
        raise UserError(
            f"{archive} tries to write outside {root} or holds a link or device ({e}); nothing "
            "more was extracted. Use the official archive."
        ) from e
    except (OSError, EOFError, tarfile.TarError) as e:
        raise UserError(
            f"{archive} is not a readable tar.gz ({e}). Delete it and download it again."
        ) from e


def _cifar_root(cfg: CifarConfig, cls: type[datasets.CIFAR10]) -> Path:
    """data.root, which must be given and must not be a file."""
    if cfg.root is None:
        raise UserError(f"data={cfg.name} needs data.root=<folder for {cls.filename}>.")
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root={cfg.root} is a file; it must name a folder.")
    return root


def prepare(cfg: CifarConfig) -> None:
    """When the extracted folder is missing, extract the archive in data.root (first
    downloading it when data.download is true). An archive whose md5 is not the official
    one is refused unless data.check_md5 is false (a subset or a re-packed copy).
    """
    cls = _cifar_class(cfg.name)
    root = _cifar_root(cfg, cls)
    folder, archive = root / cls.base_folder, root / cls.filename
    if folder.is_dir():
        return
    if not archive.is_file():
        if not cfg.download:
            raise UserError(
                f"data={cfg.name}: neither {folder} nor {archive} exists. Download "
                f"{cls.url} and put {cls.filename} in {root}, or set data.download=true."
            )
        root.mkdir(parents=True, exist_ok=True)
        _download_cifar(cls, root, cfg.name)
    if cfg.check_md5 and _md5(archive) != cls.tgz_md5:
        raise UserError(
            f"{archive} is not the official archive (its md5 differs from {cls.tgz_md5}). "
            f"Download {cls.url} again; if you made it yourself (a subset, a re-packed copy), "
            "set data.check_md5=false."
        )
    _extract(archive, root)


def build(cfg: CifarConfig, img_size: int) -> Splits:
    """CIFAR-10/100 from the extracted folder in data.root, held in memory as uint8 tensors."""
    from vit_cli.data._shared import Splits

    cls = _cifar_class(cfg.name)
    folder = _cifar_root(cfg, cls) / cls.base_folder
    if not folder.is_dir():
        raise UserError(
            f"data={cfg.name}: {folder} does not exist. vit-train extracts {cls.filename} "
            "there (and downloads it with data.download=true); vit-eval reads only data "
            "that is in place."
        )
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"data={cfg.name}: {folder} lacks {', '.join(missing)}. Delete the folder so that "
            f"{cls.filename} is extracted again."
        )
    meta = folder / cls.meta["filename"]
    try:
        class_names = [str(n) for n in _read_batch(meta)[cls.meta["key"]]]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{meta} is not a CIFAR meta file ({type(e).__name__}: {e}). Delete {folder} and "
            f"extract {cls.filename} again."
        ) from e
    num_classes = len(class_names)
    train = _read_cifar(folder, cls, True, num_classes)
    test = _read_cifar(folder, cls, False, num_classes)
    return Splits(train, test, class_names, test=test)


SOURCE = DataSource(schema=CifarConfig, build=build, prepare=prepare, names=NAMES)
