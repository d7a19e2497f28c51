"""Datasets and loaders: `build_data` turns a data config into train/val DataLoaders.

Every dataset yields images of one size as uint8 (or [0, 1] float) tensors; the loader's
collate step (`Collate` + `BatchAugment`) augments and normalises a whole batch at once.
Small datasets (digits, CIFAR) are held in memory, so a batch costs no decoding at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import socket
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import download_url

from vit_cli.augment import BatchAugment, build_batch_augment, image_transform, pil_mode
from vit_cli.config import DataConfig
from vit_cli.errors import UserError
from vit_cli.runtime import Runtime

log = logging.getLogger(__name__)

DATASETS = ("digits", "fake", "imagefolder", "cifar10", "cifar100")
# Seconds to wait on the network when fetching CIFAR, so an offline machine fails fast.
DOWNLOAD_TIMEOUT = 30.0


@dataclass
class DataBundle:
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_chans: int
    img_size: int
    class_names: list[str]
    # Unreadable image files met by either loader (imagefolder only).
    skipped: SkipCounter | None = None


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    class_names: list[str]


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


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, then restore the previous count.

    Augmenting a batch of small images gains nothing from more threads, and when another
    process holds a core, a thread pool waiting for it made loading 40x slower (measured:
    4,500 vs 110 img/s on 2 shared cores). Loader workers already run on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Collate:
    """Stack a list of (image, label) samples, dropping None, then run `augment` on the batch."""

    def __init__(self, augment: BatchAugment, sample_shape: tuple[int, int, int]) -> None:
        self.augment = augment
        self.sample_shape = sample_shape

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [s for s in samples if s is not None]
        if not samples:
            return torch.empty(0, *self.sample_shape), torch.empty(0, dtype=torch.long)
        with _one_thread():
            images = torch.stack([image for image, _ in samples])  # (B, C, H, W)
            labels = torch.as_tensor([int(label) for _, label in samples])  # (B,)
            return self.augment(images), labels


# ----------------------------------------------------------------------------- datasets


def _digits(cfg: DataConfig, img_size: int, skipped: SkipCounter) -> Splits:
    """The 1,797 8x8 digits that ship inside scikit-learn, split 80/20 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

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
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
        [str(d) for d in range(10)],
    )


def _fake(cfg: DataConfig, img_size: int, skipped: SkipCounter) -> Splits:
    """Random images from torchvision's FakeData, for smoke tests and throughput."""
    shape = (cfg.in_chans, img_size, img_size)
    train_tf = image_transform(img_size, cfg.in_chans, cfg.augment, train=True)
    val_tf = image_transform(img_size, cfg.in_chans, cfg.augment, train=False)
    train = datasets.FakeData(cfg.train_size, shape, cfg.num_classes, train_tf, random_offset=0)
    # A distinct offset keeps the val images different from the train images.
    val = datasets.FakeData(
        cfg.val_size, shape, cfg.num_classes, val_tf, random_offset=cfg.train_size
    )
    return Splits(train, val, [str(c) for c in range(cfg.num_classes)])


def _image_files(folder: Path) -> dict[str, list[str]]:
    """Image paths per class folder of `folder`, sorted; an empty class is an error."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(
            f"{folder} has no class folders. Put the images of each class in their own "
            "subfolder, e.g. cat/1.jpg, dog/2.jpg."
        )
    files = {}
    for name in classes:
        paths = sorted(
            str(p)
            for p in (folder / name).rglob("*")
            if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
        )
        if not paths:
            raise UserError(
                f"Class folder {folder / name} holds no images (looked for "
                f"{', '.join(IMG_EXTENSIONS)}). Add images to it or remove the folder."
            )
        files[name] = paths
    return files


def _split_by_class(
    files: dict[str, list[str]], fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Hold out `fraction` of every class (at least one image, never all), drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    train, val = {}, {}
    for name, paths in files.items():
        order = torch.randperm(len(paths), generator=generator).tolist()
        n_val = min(max(round(len(paths) * fraction), 1), len(paths) - 1)
        val[name] = sorted(paths[i] for i in order[:n_val])
        train[name] = sorted(paths[i] for i in order[n_val:])
    return train, val


_FOLDER_LAYOUT = (
    "Point data.root at a folder with train/ and val/ subfolders, one folder per class, or "
    "at a folder of class folders with data.val_fraction=0.1 (10% of each class for val)."
)


def _imagefolder(cfg: DataConfig, img_size: int, skipped: SkipCounter) -> Splits:
    """Class folders under `root/train` and `root/val`, or under `root` split by val_fraction."""
    if cfg.root is None:
        raise UserError("data=imagefolder needs data.root=<folder with train/ and val/>.")
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root={cfg.root} is a file. {_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root} does not exist. {_FOLDER_LAYOUT}")
    has_splits = (root / "train").is_dir() and (root / "val").is_dir()
    if has_splits and cfg.val_fraction > 0:
        raise UserError(
            f"data.root={cfg.root} has train/ and val/ subfolders, so data.val_fraction="
            f"{cfg.val_fraction} has nothing to split: set data.val_fraction=0."
        )
    if has_splits:
        train_files, val_files = _image_files(root / "train"), _image_files(root / "val")
        extra = sorted(set(val_files) - set(train_files))
        if extra:
            raise UserError(
                f"data.root={cfg.root}: val has classes that train lacks: {', '.join(extra)}. "
                f"Add them to {root / 'train'} or remove them from {root / 'val'}."
            )
    elif cfg.val_fraction > 0:
        train_files, val_files = _split_by_class(
            _image_files(root), cfg.val_fraction, cfg.split_seed
        )
    else:
        missing = root / ("val" if (root / "train").is_dir() else "train")
        raise UserError(f"data.root={cfg.root}: {missing} does not exist. {_FOLDER_LAYOUT}")
    class_names = list(train_files)
    index = {name: i for i, name in enumerate(class_names)}

    def samples(files: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(path, index[name]) for name, paths in files.items() for path in paths]

    def dataset(files: dict[str, list[str]], train: bool) -> ImageFiles:
        transform = image_transform(img_size, cfg.in_chans, cfg.augment, train)
        return ImageFiles(samples(files), cfg.in_chans, transform, skipped, cfg.max_image_pixels)

    return Splits(dataset(train_files, True), dataset(val_files, False), class_names)


# torchvision's CIFAR classes name the files, the official address and the archive's md5.
_CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def _numeric_dtype(spec, *args) -> np.dtype:
    """numpy.dtype, for numbers only: an object array would unpickle arbitrary objects."""
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


def _read_batch(path: Path) -> dict:
    with path.open("rb") as f:
        entry = _BatchUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"it holds a {type(entry).__name__}, not a dict")
    return entry


def _read_cifar(
    folder: Path, cls: type[datasets.CIFAR10], train: bool, num_classes: int
) -> TensorDataset:
    """The batch files of one split as uint8 images (N, 3, 32, 32) and labels (N,)."""
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
    return TensorDataset(torch.cat(images), torch.cat(labels))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_cifar(cls: type[datasets.CIFAR10], root: Path, name: str) -> None:
    """Download the archive into `root` (checked against its md5), or explain where to put it."""
    archive = root / cls.filename
    log.info("downloading %s to %s", cls.url, root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        download_url(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError and timeouts are OSErrors
        archive.unlink(missing_ok=True)  # a partial download would be taken for the archive
        raise UserError(
            f"data={name}: could not download {cls.url} ({type(e).__name__}: {e}). Download "
            f"{cls.url} and put {cls.filename} in {root} (the folder data.root names), then "
            "run again."
        ) from e
    finally:
        socket.setdefaulttimeout(previous)


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


def _cifar_root(cfg: DataConfig, cls: type[datasets.CIFAR10]) -> Path:
    """data.root, which must be given and must not be a file."""
    if cfg.root is None:
        raise UserError(f"data={cfg.name} needs data.root=<folder for {cls.filename}>.")
    root = Path(cfg.root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root={cfg.root} is a file; it must name a folder.")
    return root


def prepare_data(cfg: DataConfig) -> None:
    """Put the data in place before `build_data` reads it: what vit-train does, not vit-eval.

    CIFAR: when the extracted folder is missing, extract the archive in data.root (first
    downloading it when data.download is true). An archive whose md5 is not the official
    one is refused unless data.check_md5 is false (a subset or a re-packed copy). The other
    sources read what is there.
    """
    if cfg.name not in _CIFAR:
        return
    cls = _CIFAR[cfg.name]
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


def _load_cifar(cfg: DataConfig, img_size: int, skipped: SkipCounter) -> Splits:
    """CIFAR-10/100 from the extracted folder in data.root, held in memory as uint8 tensors."""
    cls = _CIFAR[cfg.name]
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
    val = _read_cifar(folder, cls, False, num_classes)
    return Splits(train, val, class_names)


_BUILDERS = {
    "digits": _digits,
    "fake": _fake,
    "imagefolder": _imagefolder,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
}


# ----------------------------------------------------------------------------- loaders


def build_data(
    cfg: DataConfig,
    img_size: int,
    generator: torch.Generator,
    pin_memory: bool = False,
    runtime: Runtime | None = None,
) -> DataBundle:
    """Build train/val loaders at `img_size`. Re-seed `generator` each epoch to fix the order.

    With several processes (`runtime`), each process's loaders read its own share of both
    splits (`Runtime.train_sampler`, `Runtime.eval_sampler`).
    """
    if cfg.name not in _BUILDERS:
        raise UserError(f"Unknown data.name={cfg.name!r}. Valid names: {', '.join(DATASETS)}.")
    if len(cfg.mean) != cfg.in_chans or len(cfg.std) != cfg.in_chans:
        raise UserError(
            f"data.mean and data.std need one value per channel (data.in_chans={cfg.in_chans})."
        )
    runtime = runtime or Runtime(torch.device("cpu"))
    skipped = SkipCounter()
    splits = _BUILDERS[cfg.name](cfg, img_size, skipped)
    if len(splits.class_names) != cfg.num_classes:
        raise UserError(
            f"data.num_classes={cfg.num_classes} but data={cfg.name} has "
            f"{len(splits.class_names)} classes. Set data.num_classes={len(splits.class_names)}."
        )
    shape = (cfg.in_chans, img_size, img_size)
    workers = cfg.num_workers
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
            build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, cfg.shift, True), shape
        ),
        **common,
    )
    val_loader = DataLoader(
        splits.val,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        sampler=runtime.eval_sampler(len(splits.val)),
        collate_fn=Collate(
            build_batch_augment(cfg.augment, img_size, cfg.mean, cfg.std, 0, False), shape
        ),
        **common,
    )
    return DataBundle(
        train_loader,
        val_loader,
        cfg.num_classes,
        cfg.in_chans,
        img_size,
        splits.class_names,
        skipped if cfg.name == "imagefolder" else None,
    )
