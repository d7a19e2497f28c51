"""data=hf: a Hugging Face `datasets` dataset on local disk, never from the Hub: a dataset
saved with `save_to_disk`, or Parquet files (`pip install "vit-cli[hf]"`).

The images are read as image files are (`_image_files`): `datasets` hands over each row's
encoded bytes undecoded, and `FileReader` decodes them with the DCT-scaled JPEG decode, the
EXIF orientation, the crop and the pixel limit. An unreadable image is skipped and counted.
The classes are the label column's `ClassLabel` names, or its integer ids 0..K-1.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from vit_cli.config import HeldOutConfig
from vit_cli.data import DataSource
from vit_cli.errors import UserError, first_line

if TYPE_CHECKING:
    import datasets
    import numpy as np

    from vit_cli.data._image_files import ImageFiles, SkipCounter
    from vit_cli.data._shared import Splits

log = logging.getLogger(__name__)


@dataclass
class HFConfig(HeldOutConfig):
    name: str = "hf"
    # A folder saved with save_to_disk, a folder of Parquet files, or a Parquet file or glob
    # (which is then the train split).
    path: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    # Parquet in a folder: globs relative to data.path naming the train and val files
    # (null: the splits that `datasets` infers from the file and folder names).
    train_files: Optional[str] = None  # noqa: UP045
    val_files: Optional[str] = None  # noqa: UP045
    train_split: str = "train"
    # null: the first of VAL_SPLITS that the data has.
    val_split: Optional[str] = None  # noqa: UP045
    image_column: str = "image"
    label_column: str = "label"
    # data.val_fraction: for data without a val split.
    # The label column decides the classes; a number given here must match them.
    num_classes: Optional[int] = None  # noqa: UP045


# The splits taken as val when data.val_split is null, in this order: the names `datasets`
# gives inferred val files (validation), the usual others, then the test split.
VAL_SPLITS = ("validation", "valid", "val", "test")

_LAYOUT = (
    "Point data.path at a dataset saved with save_to_disk (a folder with dataset_dict.json, "
    "or with state.json and dataset_info.json) or at a folder of Parquet files."
)


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data=hf needs the datasets package, which is not installed. Install it with "
            'pip install -e ".[hf]" in a checkout, or pip install "vit-cli[hf]".'
        ) from None
    return datasets


# ----------------------------------------------------------------------------- splits


def _is_saved(folder: Path) -> bool:
    """Whether `folder` holds what `datasets.load_from_disk` reads."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _is_glob(path: Path | str) -> bool:
    return any(c in str(path) for c in "*?[")


def _fixed_folder(pattern: Path) -> Path:
    """The folder a glob searches in: its leading parts without wildcards."""
    parts = pattern.parts
    return Path(*parts[: next(i for i, part in enumerate(parts) if _is_glob(part))])


def _matching(pattern: Path, key: str, value: str) -> list[str]:
    """The Parquet files that the glob `pattern` (data.<key>=value) matches; none is an error."""
    found = sorted(
        p
        for p in glob.glob(str(pattern), recursive=True)
        if p.endswith(".parquet") and Path(p).is_file()
    )
    if not found:
        raise UserError(f"{key}={value} matches no .parquet files ({pattern}).")
    return found


def _inferred_parquet(folder: Path) -> dict[str, list[str]]:
    """The Parquet files of each split, named as `datasets` infers splits from file and
    folder names (train-00000-of-00002.parquet, val/part-0.parquet; all: train)."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    base = str(folder.resolve())
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base)
    except EmptyDatasetError:
        files = {}
    splits = {
        str(split): [f for f in found if f.endswith(".parquet")] for split, found in files.items()
    }
    splits = {split: found for split, found in splits.items() if found}
    if not splits:
        raise UserError(f"data.path={folder} holds no .parquet files. {_LAYOUT}")
    return splits


def _parquet_files(cfg: HFConfig, path: Path) -> dict[str, list[str]]:
    """The Parquet files of each split: as `datasets` infers them in a folder, or as
    data.train_files and data.val_files (or a file or glob in data.path) name them."""
    if path.is_dir() and cfg.train_files is None and cfg.val_files is None:
        return _inferred_parquet(path)
    if path.is_dir():
        if cfg.train_files is None:
            raise UserError(
                f"data.val_files={cfg.val_files} needs data.train_files too, e.g. "
                "data.train_files='train/*.parquet'."
            )
        folder = path
        train = _matching(path / cfg.train_files, "data.train_files", cfg.train_files)
    else:
        if cfg.train_files is not None:
            raise UserError(
                f"data.path={cfg.path} names the train files already: point data.path at "
                f"their folder to use data.train_files={cfg.train_files}."
            )
        folder = path.parent if path.is_file() else _fixed_folder(path)
        train = _matching(path, "data.path", cfg.path)
    files = {cfg.train_split: train}
    if cfg.val_files is not None:
        val = _matching(folder / cfg.val_files, "data.val_files", cfg.val_files)
        files[cfg.val_split or VAL_SPLITS[0]] = val
    return files


def _load(cfg: HFConfig) -> dict[str, datasets.Dataset]:
    """The splits that data.path holds, by name, memory-mapped from local files."""
    datasets = _require_datasets()
    if cfg.path is None:
        raise UserError(f"data=hf needs data.path=<folder>. {_LAYOUT}")
    path = Path(cfg.path).expanduser()
    if not _is_glob(path) and not path.exists():
        raise UserError(f"data.path={cfg.path} does not exist. {_LAYOUT}")
    if path.is_dir() and _is_saved(path):
        if cfg.train_files is not None or cfg.val_files is not None:
            raise UserError(
                f"data.path={cfg.path} is a saved dataset, whose splits are its own: "
                "data.train_files and data.val_files name Parquet files. Leave them out."
            )
        try:
            saved = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"Could not read data.path={cfg.path}: {first_line(e)}") from e
        # One saved Dataset, rather than a DatasetDict, is the train split.
        return dict(saved) if isinstance(saved, datasets.DatasetDict) else {cfg.train_split: saved}
    if path.is_file() and not path.name.endswith(".parquet"):
        raise UserError(f"data.path={cfg.path} is not a .parquet file. {_LAYOUT}")
    files = _parquet_files(cfg, path)
    try:
        # The "parquet" builder reads local files only: nothing here asks the Hub. The first
        # read converts the files to Arrow in the datasets cache (HF_DATASETS_CACHE), which
        # later runs memory-map.
        return dict(datasets.load_dataset("parquet", data_files=files))
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        # A split's files that disagree fail as a DatasetGenerationError, whose cause says
        # which columns (HYDRA_FULL_ERROR=1 shows it).
        hint = (
            " (do the files of each split have the same columns?)"
            if isinstance(e, datasets.exceptions.DatasetGenerationError)
            else ""
        )
        raise UserError(
            f"Could not read the Parquet files of data.path={cfg.path}: {first_line(e)}{hint}"
        ) from e


def _split_names(cfg: HFConfig, names: list[str]) -> tuple[str, str | None, str | None]:
    """The train, val (None: held out of train) and test (None: none) splits' names."""
    there = f"data.path={cfg.path} has the splits {', '.join(names)}"
    if cfg.train_split not in names:
        raise UserError(f"data.train_split={cfg.train_split} is not a split: {there}.")
    if cfg.val_fraction > 0 and cfg.val_split is not None:
        raise UserError(
            f"data.val_split={cfg.val_split} and data.val_fraction={cfg.val_fraction} both "
            "choose the val images: set one of them."
        )
    if cfg.val_fraction > 0:
        val = None
    elif cfg.val_split is not None:
        if cfg.val_split not in names:
            raise UserError(f"data.val_split={cfg.val_split} is not a split: {there}.")
        val = cfg.val_split
    else:
        val = next((n for n in VAL_SPLITS if n in names and n != cfg.train_split), None)
        if val is None:
            raise UserError(
                f"{there}, and none of them is a val split ({', '.join(VAL_SPLITS)}). Name "
                "one with data.val_split=NAME, or hold out part of train with "
                "data.val_fraction=0.1."
            )
    if val == cfg.train_split:
        raise UserError(f"data.val_split={val} is the train split: name another one.")
    test = "test" if "test" in names and cfg.train_split != "test" else None
    return cfg.train_split, val, test


# ----------------------------------------------------------------------------- columns


def _column(cfg: HFConfig, table: datasets.Dataset, key: str, split: str) -> Any:
    """The feature of the column that data.<key> names; a missing column is an error."""
    column = getattr(cfg, key)
    if column not in table.features:
        raise UserError(
            f"data.{key}={column}: the {split} split has no such column, only "
            f"{', '.join(table.column_names)}. Set data.{key} to one of them."
        )
    return table.features[column]


def _encoded_images(cfg: HFConfig, table: datasets.Dataset, split: str) -> datasets.Dataset:
    """The image column alone, its images left encoded (an `Image` feature not decoded)."""
    import datasets

    feature = _column(cfg, table, "image_column", split)
    images = table.select_columns([cfg.image_column])
    if isinstance(feature, datasets.Image):
        # Only the feature changes: the Arrow data is neither copied nor decoded.
        return images.cast_column(cfg.image_column, datasets.Image(decode=False))
    binary = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
    stored = isinstance(feature, dict) and "bytes" in feature  # {bytes, path} without the feature
    if not (binary or stored):
        raise UserError(
            f"data.image_column={cfg.image_column} holds {feature}, not images: name a "
            f"column of the datasets Image feature or of encoded image bytes "
            f"({', '.join(table.column_names)})."
        )
    return images


def _labels(cfg: HFConfig, table: datasets.Dataset, split: str) -> np.ndarray:
    """The label column as int64, checked to be whole numbers with none missing."""
    import datasets

    feature = _column(cfg, table, "label_column", split)
    integer = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if not (isinstance(feature, datasets.ClassLabel) or integer):
        raise UserError(
            f"data.label_column={cfg.label_column} holds {feature}: vit_cli needs class ids "
            "(integers from 0) or a ClassLabel. Convert it before saving, e.g. with "
            f"dataset.class_encode_column('{cfg.label_column}')."
        )
    if len(table) == 0:
        raise UserError(f"The {split} split of data.path={cfg.path} has no rows.")
    column = table.select_columns([cfg.label_column]).with_format("arrow")[:].column(0)
    if column.null_count:
        row = int(column.is_null().to_numpy(zero_copy_only=False).argmax())
        raise UserError(
            f"data.label_column={cfg.label_column}: row {row} of the {split} split has no "
            "label. Fix or remove that row."
        )
    return column.to_numpy().astype("int64")


def _check_range(cfg: HFConfig, labels: np.ndarray, count: int, split: str) -> None:
    """Every label is a class id below `count`; the first that is not is an error."""
    outside = (labels < 0) | (labels >= count)
    if outside.any():
        row = int(outside.argmax())
        raise UserError(
            f"data.label_column={cfg.label_column}: row {row} of the {split} split has label "
            f"{labels[row]}, outside the class ids 0..{count - 1}. Fix or remove that row."
        )


def _class_names(cfg: HFConfig, tables: dict[str, datasets.Dataset], labels: dict) -> list[str]:
    """The class names, in label order: the ClassLabel's names, or the ids 0..K-1."""
    import datasets
    import numpy as np

    train = tables[cfg.train_split].features[cfg.label_column]
    if isinstance(train, datasets.ClassLabel):
        for split, table in tables.items():
            feature = table.features[cfg.label_column]
            if not isinstance(feature, datasets.ClassLabel) or feature.names != train.names:
                raise UserError(
                    f"data.label_column={cfg.label_column}: the {split} split's classes are "
                    f"not the {cfg.train_split} split's ({', '.join(train.names[:10])}). "
                    "Save every split with the same ClassLabel."
                )
        return list(train.names)
    ids = np.unique(np.concatenate(list(labels.values())))
    missing = sorted(set(range(int(ids[-1]) + 1)) - set(ids.tolist()))
    if missing:
        raise UserError(
            f"data.label_column={cfg.label_column} holds integers, which are the class ids, "
            f"so they must run from 0 to {ids[-1]}, but {', '.join(map(str, missing[:10]))} "
            "never occur. Renumber the classes from 0, or save the column as a ClassLabel."
        )
    return [str(k) for k in range(int(ids[-1]) + 1)]


# ----------------------------------------------------------------------------- datasets


class RowImages:
    """Row i of an image column -> what `FileReader` reads: the encoded image's bytes, or
    the path of the file the row names. A `datasets.Dataset` pickles as the paths of its
    memory-mapped files, so loader workers get it cheaply."""

    def __init__(self, table: datasets.Dataset, column: str) -> None:
        self.table = table
        self.column = column

    def __call__(self, i: int) -> io.BytesIO | str:
        value = self.table[i][self.column]
        if isinstance(value, dict):  # an Image feature, stored as {bytes, path}
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if value is None:
            raise ValueError("the row holds no image")  # one of _decode.UNREADABLE
        return value if isinstance(value, str) else io.BytesIO(value)


def _image_rows(
    cfg: HFConfig,
    img_size: int,
    table: datasets.Dataset,
    split: str,
    rows: list[int],
    labels: np.ndarray,
    train: bool,
    skipped: SkipCounter,
) -> ImageFiles:
    """`rows` of a split as image files named `split[row]`, read as `train` says."""
    from vit_cli.data._image_files import FileReader, ImageFiles

    images = _encoded_images(cfg, table, split)
    if len(rows) != len(table):
        images = images.select(rows)
    values = labels.tolist()
    samples = [(f"{split}[{row}]", values[row]) for row in rows]
    reader = FileReader(
        img_size, cfg.in_chans, cfg.augment, train, cfg.max_image_pixels, cfg.dct_scaling
    )
    return ImageFiles(samples, reader, skipped, fetch=RowImages(images, cfg.image_column))


def _test_labels(
    cfg: HFConfig, table: datasets.Dataset, class_names: list[str]
) -> np.ndarray | None:
    """The test split's labels, or None when they are not the class ids of train (a test
    split published without labels holds -1): then vit-eval --split test is not offered."""
    import datasets

    try:
        labels = _labels(cfg, table, "test")
        _check_range(cfg, labels, len(class_names), "test")
    except UserError as e:
        log.info("the test split is left out: %s", e)
        return None
    feature = table.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel) and feature.names != class_names:
        log.info("the test split is left out: its ClassLabel names are not train's")
        return None
    return labels


def _held_out(labels: np.ndarray, count: int, fraction: float, seed: int) -> tuple[list, list]:
    """The train and the val rows: `fraction` of each class's rows held out, drawn with `seed`."""
    from vit_cli.data._shared import split_each_class

    members: list[list[int]] = [[] for _ in range(count)]
    for row, label in enumerate(labels.tolist()):
        members[label].append(row)
    kept, held_out = split_each_class(members, fraction, seed)
    # In row order, so that reading follows the files.
    return sorted(itertools.chain(*kept)), sorted(itertools.chain(*held_out))


def build(cfg: HFConfig, img_size: int) -> Splits:
    """The train and val splits that data.path holds (and test, when it is labelled)."""
    from vit_cli.data._image_files import SkipCounter
    from vit_cli.data._shared import Splits

    if cfg.decode == "device":
        raise UserError(
            "data=hf decodes its images on the loader workers: set data.decode=workers."
        )
    tables = _load(cfg)
    train_name, val_name, test_name = _split_names(cfg, sorted(tables))
    used = {name: tables[name] for name in (train_name, val_name) if name is not None}
    labels = {name: _labels(cfg, table, name) for name, table in used.items()}
    class_names = _class_names(cfg, used, labels)
    count = len(class_names)
    for split, found in labels.items():
        _check_range(cfg, found, count, split)
    if cfg.num_classes is not None and cfg.num_classes != count:
        raise UserError(
            f"data.num_classes={cfg.num_classes} but data.path={cfg.path} has {count} classes "
            f"({', '.join(class_names[:10])}). Set data.num_classes={count}, or leave it out "
            "to take the data's classes."
        )
    skipped = SkipCounter()

    def dataset(split: str, rows: list[int] | None, train: bool) -> ImageFiles:
        rows = list(range(len(labels[split]))) if rows is None else rows
        table = tables[split]
        return _image_rows(cfg, img_size, table, split, rows, labels[split], train, skipped)

    if val_name is None:
        train_rows, val_rows = _held_out(
            labels[train_name], count, cfg.val_fraction, cfg.split_seed
        )
        if not val_rows:  # a class gives one row to val only when it has two or more
            raise UserError(
                f"data.val_fraction={cfg.val_fraction} holds out no rows: no class of the "
                f"{train_name} split has two. Add rows, or give the data a val split."
            )
        train, val = dataset(train_name, train_rows, True), dataset(train_name, val_rows, False)
    else:
        train, val = dataset(train_name, None, True), dataset(val_name, None, False)
    test = val if val_name == "test" else None
    if test_name is not None and test is None:
        found = _test_labels(cfg, tables[test_name], class_names)
        if found is not None:
            labels[test_name] = found
            test = dataset(test_name, None, False)
    return Splits(train, val, class_names, skipped, test)


SOURCE = DataSource(schema=HFConfig, build=build)
