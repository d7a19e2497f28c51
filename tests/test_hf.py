"""data=hf (vit_cli/data/hf.py): Hugging Face datasets saved with save_to_disk and folders of
Parquet files, built here from real images, read through the image-file decoder."""

from __future__ import annotations

import io
import pickle
import socket
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from vit_cli.checkpoint import load_checkpoint
from vit_cli.config import AugmentConfig
from vit_cli.data import ImageFiles, build_data
from vit_cli.data.hf import HFConfig, build
from vit_cli.errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CLASSES = ["red", "green", "blue"]
SIZE = 16


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    """The datasets cache (where Parquet files are converted to Arrow) inside tmp_path, for
    this process and for the CLI runs it starts."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def jpeg(label: int, seed: int) -> bytes:
    """A noisy 48x36 JPEG of class `label`'s colour."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, size=(36, 48, 3))
    pixels[..., label] += 180
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def table(per_class: int, seed: int = 0, broken: tuple[int, ...] = ()) -> datasets.Dataset:
    """`per_class` images of each colour, in class order, with an Image column and a
    ClassLabel; the rows in `broken` hold random bytes instead of an image."""
    labels = [k for k in range(len(CLASSES)) for _ in range(per_class)]
    images = [jpeg(label, seed * 1000 + i) for i, label in enumerate(labels)]
    for row in broken:
        images[row] = np.random.default_rng(row).bytes(300)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    )
    rows = {"image": [{"bytes": b, "path": None} for b in images], "label": labels}
    return datasets.Dataset.from_dict(rows, features=features)


def hf_cfg(path: Path | str, **kw) -> HFConfig:
    defaults = dict(img_size=SIZE, in_chans=3, mean=[0.5] * 3, std=[0.5] * 3, num_workers=0)
    augment = AugmentConfig(crop_scale=[0.25, 1.0], hflip=0.5)
    return HFConfig(path=str(path), **{**defaults, "augment": augment, **kw})


def saved(tmp_path: Path) -> Path:
    """A DatasetDict with train (4 per class) and validation (2 per class), saved to disk."""
    path = tmp_path / "saved"
    datasets.DatasetDict(train=table(4), validation=table(2, seed=1)).save_to_disk(path)
    return path


def parquet_folder(tmp_path: Path) -> Path:
    """train, validation and test as Parquet files, named as the Hub names them."""
    folder = tmp_path / "parquet"
    folder.mkdir()
    for split, per_class, seed in (("train", 4, 0), ("validation", 2, 1), ("test", 1, 2)):
        table(per_class, seed).to_parquet(folder / f"{split}-00000-of-00001.parquet")
    return folder


def colour(image: torch.Tensor) -> int:
    """The brightest channel of a (3, H, W) image: its class."""
    return int(image.float().mean(dim=(1, 2)).argmax())


def check_images(data: ImageFiles) -> None:
    """Every image decoded at the model's size, as uint8, in its class's colour."""
    for i in range(len(data)):
        image, label = data[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        assert colour(image) == label


# ----------------------------------------------------------------------------- reading


def test_a_saved_dataset_dict_gives_its_splits_classes_and_images_at_the_model_size(tmp_path):
    splits = build(hf_cfg(saved(tmp_path)), SIZE)
    assert splits.class_names == CLASSES
    assert (len(splits.train), len(splits.val), splits.test) == (12, 6, None)
    assert [label for _, label in splits.val.samples] == [0, 0, 1, 1, 2, 2]
    assert splits.val.samples[0][0] == "validation[0]"  # what logs and vit-eval name
    check_images(splits.train)  # random resized crops
    check_images(splits.val)  # resized and centre-cropped


def test_a_parquet_folder_gives_the_splits_that_datasets_infers_from_the_file_names(tmp_path):
    splits = build(hf_cfg(parquet_folder(tmp_path)), SIZE)
    assert splits.class_names == CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 3)
    check_images(splits.val)
    check_images(splits.test)  # for vit-eval --split test


def test_parquet_globs_name_the_splits_of_a_folder_or_of_data_path_itself(tmp_path):
    folder = tmp_path / "files"
    (folder / "a").mkdir(parents=True)
    table(1).to_parquet(folder / "a" / "part-0.parquet")
    table(1, seed=1).to_parquet(folder / "a" / "part-1.parquet")
    table(1, seed=2).to_parquet(folder / "a" / "held.parquet")
    named = build(hf_cfg(folder, train_files="a/part-*.parquet", val_files="a/held.*"), SIZE)
    assert (len(named.train), len(named.val)) == (6, 3)
    # A glob in data.path is the train split; data.val_files is relative to its folder.
    glob = build(hf_cfg(folder / "a" / "part-*.parquet", val_files="held.parquet"), SIZE)
    assert (len(glob.train), len(glob.val)) == (6, 3)
    check_images(glob.val)


def test_val_fraction_holds_out_each_class_of_train_the_same_way_every_time(tmp_path):
    table(10).save_to_disk(tmp_path / "one")  # one Dataset: the train split
    cfg = hf_cfg(tmp_path / "one", val_fraction=0.2, split_seed=3)
    a, b = build(cfg, SIZE), build(cfg, SIZE)
    train_rows = {name for name, _ in a.train.samples}
    val_rows = {name for name, _ in a.val.samples}
    assert len(train_rows) == 24 and len(val_rows) == 6 and not train_rows & val_rows
    assert sorted(label for _, label in a.val.samples) == [0, 0, 1, 1, 2, 2]
    assert a.val.samples == b.val.samples
    check_images(a.val)
    other = build(hf_cfg(tmp_path / "one", val_fraction=0.2, split_seed=4), SIZE)
    assert other.val.samples != a.val.samples


def test_a_column_of_encoded_bytes_with_integer_labels_takes_the_ids_as_class_names(tmp_path):
    rows = {"png": [jpeg(k, k) for k in (0, 1, 2, 1)], "y": [0, 1, 2, 1]}
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows), val=datasets.Dataset.from_dict(rows)
    ).save_to_disk(tmp_path / "bytes")
    splits = build(hf_cfg(tmp_path / "bytes", image_column="png", label_column="y"), SIZE)
    assert splits.class_names == ["0", "1", "2"]
    check_images(splits.val)


def test_an_unreadable_image_is_skipped_and_counted(tmp_path):
    datasets.DatasetDict(train=table(2), validation=table(2, broken=(1, 4))).save_to_disk(
        tmp_path / "broken"
    )
    data = build_data(hf_cfg(tmp_path / "broken", batch_size=4), SIZE, torch.Generator())
    labels = torch.cat([labels for _, labels in data.val_loader])
    assert labels.tolist() == [0, 1, 1, 2]  # rows 1 and 4 dropped from their batches
    assert data.skipped.take() == 2
    names = data.val_loader.dataset.read_paths()
    assert names == ["validation[0]", "validation[2]", "validation[3]", "validation[5]"]


def test_loader_workers_read_the_rows_of_a_pickled_dataset(tmp_path):
    cfg = hf_cfg(parquet_folder(tmp_path), num_workers=2, batch_size=2)
    val = build(cfg, SIZE).val
    copy = pickle.loads(pickle.dumps(val))
    assert torch.equal(copy[3][0], val[3][0])
    images, labels = zip(*build_data(cfg, SIZE, torch.Generator()).val_loader, strict=True)
    assert torch.cat(labels).tolist() == [0, 0, 1, 1, 2, 2]
    assert [colour(image) for image in torch.cat(images)] == [0, 0, 1, 1, 2, 2]


def test_reading_parquet_files_and_saved_datasets_never_opens_a_connection(tmp_path, monkeypatch):
    tried = []

    def refuse(self, address):
        tried.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert len(build(hf_cfg(parquet_folder(tmp_path)), SIZE).val) == 6
    assert len(build(hf_cfg(saved(tmp_path)), SIZE).val) == 6
    assert tried == []


# ----------------------------------------------------------------------------- errors


def test_each_mistake_gets_one_line_that_names_the_fix(tmp_path):
    path = saved(tmp_path)
    (tmp_path / "empty").mkdir()
    mistakes = [
        (hf_cfg(tmp_path / "nowhere"), "nowhere does not exist"),
        (hf_cfg(tmp_path / "empty"), "holds no .parquet files"),
        (hf_cfg(path, image_column="img"), "no such column, only image, label"),
        (hf_cfg(path, label_column="labels"), "no such column, only image, label"),
        (hf_cfg(path, image_column="label"), "not images"),
        (hf_cfg(path, train_split="fit"), "has the splits train, validation"),
        (hf_cfg(path, val_split="dev"), "has the splits train, validation"),
        (hf_cfg(path, val_split="validation", val_fraction=0.1), "set one of them"),
        (hf_cfg(path, num_classes=4), "Set data.num_classes=3"),
        (hf_cfg(path, decode="device"), "data.decode=workers"),
        (hf_cfg(path, train_files="*.parquet"), "Leave them out"),
    ]
    for cfg, message in mistakes:
        with pytest.raises(UserError, match=message) as error:
            build(cfg, SIZE)
        assert "\n" not in str(error.value)


def test_labels_must_be_class_ids(tmp_path):
    def write(name: str, labels: list) -> HFConfig:
        rows = {"image": [jpeg(0, i) for i in range(len(labels))], "label": labels}
        datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / name)
        return hf_cfg(tmp_path / name, val_fraction=0.5)

    with pytest.raises(UserError, match="row 2 of the train split has label -1, outside"):
        build(write("negative", [0, 1, -1, 1, 0]), SIZE)
    with pytest.raises(UserError, match="from 0 to 2, but 1 never occur"):
        build(write("gap", [0, 2, 0, 2]), SIZE)
    with pytest.raises(UserError, match="class_encode_column"):
        build(write("words", ["cat", "dog", "cat", "dog"]), SIZE)
    with pytest.raises(UserError, match="none of them is a val split"):
        build(hf_cfg(tmp_path / "gap"), SIZE)


def test_a_missing_datasets_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(UserError, match=r'pip install "vit-cli\[hf\]"'):
        build(hf_cfg(tmp_path), SIZE)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_train_on_the_digits_written_as_parquet_from_the_cli(run_cli, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import digits_as_files

    digits_as_files.main([str(tmp_path / "digits"), "--format", "parquet"])
    result = run_cli(
        "data=hf",
        f"data.path={tmp_path / 'digits' / 'parquet'}",
        *digits_as_files.recipe(16),
        *TINY,
        "hydra.run.dir=run",
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["data"]["class_names"] == [str(d) for d in range(10)]
    assert ckpt["config"]["data"]["name"] == "hf"
    # Chance is 10%: the images reach the model with their own labels.
    assert ckpt["metrics"]["val/acc1"] > 20.0
    assert ckpt["metrics"]["data/skipped_images"] == 0
