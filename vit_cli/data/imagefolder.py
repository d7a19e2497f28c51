"""data=imagefolder: one folder per class, under root/train and root/val, or split by share.

The classes are the class folders, sorted by name; data.num_classes may be left out.
Unreadable image files are skipped and counted (`_shared.SkipCounter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from vit_cli.config import HeldOutConfig
from vit_cli.data import DataSource
from vit_cli.errors import UserError

if TYPE_CHECKING:
    from vit_cli.data._image_files import ImageFiles
    from vit_cli.data._shared import Splits


@dataclass
class ImageFolderConfig(HeldOutConfig):
    name: str = "imagefolder"
    root: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    # data.val_fraction: for a root without train/ and val/ subfolders.
    # The class folders decide the classes; a number given here must match them.
    num_classes: Optional[int] = None  # noqa: UP045


def _image_files(folder: Path) -> dict[str, list[str]]:
    """Image paths per class folder of `folder`, sorted; an empty class is an error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

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
    from vit_cli.data._shared import split_each_class

    train, val = split_each_class(list(files.values()), fraction, seed)
    return dict(zip(files, train, strict=True)), dict(zip(files, val, strict=True))


_FOLDER_LAYOUT = (
    "Point data.root at a folder with train/ and val/ subfolders, one folder per class, or "
    "at a folder of class folders with data.val_fraction=0.1 (10% of each class for val)."
)


def _class_files(cfg: ImageFolderConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The image paths per class of the train and val splits."""
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
        return train_files, val_files
    if cfg.val_fraction > 0:
        return _split_by_class(_image_files(root), cfg.val_fraction, cfg.split_seed)
    missing = root / ("val" if (root / "train").is_dir() else "train")
    raise UserError(f"data.root={cfg.root}: {missing} does not exist. {_FOLDER_LAYOUT}")


def build(cfg: ImageFolderConfig, img_size: int) -> Splits:
    """Class folders under `root/train` and `root/val`, or under `root` split by val_fraction."""
    from vit_cli.data._device_decode import BytesReader
    from vit_cli.data._image_files import FileReader, ImageFiles, SkipCounter
    from vit_cli.data._shared import Splits

    train_files, val_files = _class_files(cfg)
    class_names = list(train_files)
    if cfg.num_classes is not None and cfg.num_classes != len(class_names):
        raise UserError(
            f"data.num_classes={cfg.num_classes} but data.root={cfg.root} has "
            f"{len(class_names)} class folders ({', '.join(class_names[:10])}). Set "
            f"data.num_classes={len(class_names)}, or leave it out to take the folders' classes."
        )
    index = {name: i for i, name in enumerate(class_names)}
    skipped = SkipCounter()

    def dataset(files: dict[str, list[str]], train: bool) -> ImageFiles:
        samples = [(path, index[name]) for name, paths in files.items() for path in paths]
        if cfg.decode == "device":
            reader = BytesReader(img_size, cfg.in_chans, cfg.augment, train, cfg.max_image_pixels)
        else:
            reader = FileReader(
                img_size, cfg.in_chans, cfg.augment, train, cfg.max_image_pixels, cfg.dct_scaling
            )
        return ImageFiles(samples, reader, skipped)

    return Splits(dataset(train_files, True), dataset(val_files, False), class_names, skipped)


SOURCE = DataSource(schema=ImageFolderConfig, build=build)
