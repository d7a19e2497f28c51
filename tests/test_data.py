"""Every dataset loads from data made here: digits, fake, image folders and CIFAR archives."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import sys
import tarfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from tests.conftest import TINY, run_command
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.config import AugmentConfig, DataConfig, validate
from vit_cli.data import UNREADABLE, UnsupportedImage, build_data, prepare_data, read_image
from vit_cli.data.cifar import CifarConfig
from vit_cli.data.digits import cache_path, split_digits
from vit_cli.data.fake import FakeConfig
from vit_cli.data.imagefolder import ImageFolderConfig
from vit_cli.errors import UserError
from vit_cli.eval_cli import main as eval_main
from vit_cli.runtime import Runtime
from vit_cli.trainer import fit


def digits(**kw) -> DataConfig:
    return DataConfig(name="digits", **kw)


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------- digits, fake


def test_digits_split_is_fixed_stratified_80_20():
    a = build_data(digits(), 8, torch.Generator())
    b = build_data(digits(), 8, torch.Generator())
    train, val = a.train_loader.dataset, a.val_loader.dataset
    assert (len(train), len(val)) == (1437, 360)
    assert torch.equal(val.tensors[1], b.val_loader.dataset.tensors[1])
    assert torch.equal(val.tensors[0], b.val_loader.dataset.tensors[0])
    # Stratified: every class holds ~20% of its images in val.
    counts = torch.bincount(val.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # The first val labels of the split with random_state=0, as before this loader existed.
    assert val.tensors[1][:10].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3]
    assert a.class_names == [str(d) for d in range(10)]
    images, labels = next(iter(a.train_loader))
    assert images.shape == (64, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (64,)


def test_the_digits_split_kept_in_the_cache_is_scikit_learns_and_spares_its_import(
    tmp_path, monkeypatch
):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    digits = load_digits()
    train, val = train_test_split(
        range(1797), test_size=0.2, stratify=digits.target, random_state=0
    )
    pixels = torch.tensor(digits.images, dtype=torch.float32)

    def check(split) -> None:
        assert torch.equal(split["images"].float(), pixels)
        assert split["labels"].tolist() == digits.target.tolist()
        assert (split["train"].tolist(), split["val"].tolist()) == (train, val)

    check(split_digits())  # from scikit-learn, then kept
    cache = cache_path()
    assert cache.parent == tmp_path / "vit_cli" and cache.is_file()
    check(split_digits())  # from the cache

    # A fresh process reads the kept split without importing scikit-learn.
    code = (
        "import sys; from vit_cli.data.digits import split_digits; split_digits(); "
        "print('sklearn' in sys.modules)"
    )
    result = run_command([sys.executable, "-c", code], tmp_path, {**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"

    # A damaged or foreign file is made again; a cache that can't be written is no error.
    for damage in (b"not a torch file", None):
        if damage is None:
            torch.save({"images": torch.zeros(3)}, cache)
        else:
            cache.write_bytes(damage)
        check(split_digits())
        check(torch.load(cache, weights_only=True))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
    check(split_digits())


def test_digits_val_batches_are_the_normalised_pixels():
    data = build_data(digits(mean=[0.3], std=[0.4]), 8, torch.Generator())
    images, labels = all_batches(data.val_loader)
    stored, stored_labels = data.val_loader.dataset.tensors
    torch.testing.assert_close(images, (stored - 0.3) / 0.4)
    assert torch.equal(labels, stored_labels)
    assert stored.min() >= 0.0 and stored.max() <= 1.0


def test_digits_resize_to_the_model_resolution():
    data = build_data(digits(), 32, torch.Generator())
    images, _ = next(iter(data.val_loader))
    assert images.shape[1:] == (1, 32, 32)
    assert data.img_size == 32


def test_fixed_generator_seed_fixes_the_batch_order_and_augmentation():
    gen = torch.Generator()
    data = build_data(digits(shift=1), 8, gen)
    gen.manual_seed(5)
    torch.manual_seed(0)
    first = next(iter(data.train_loader))
    gen.manual_seed(5)
    torch.manual_seed(0)
    again = next(iter(data.train_loader))
    assert torch.equal(again[1], first[1]) and torch.equal(again[0], first[0])


def test_batches_are_augmented_on_the_configured_threads_and_the_count_is_restored():
    from vit_cli.runtime import Runtime

    seen = []

    def spy(images):
        seen.append(torch.get_num_threads())
        return images

    before = torch.get_num_threads()
    for threads, device, expected in [(None, "cpu", 1), (2, "cpu", 2), (None, "cuda", before)]:
        data = build_data(digits(augment_threads=threads), 8, torch.Generator(),
                          runtime=Runtime(torch.device(device)))  # fmt: skip
        data.train_loader.collate_fn.augment = spy
        next(iter(data.train_loader))
        assert seen.pop() == expected and torch.get_num_threads() == before


def test_repeated_augmentation_keeps_the_epoch_length():
    cfg = digits(batch_size=30, shift=1, augment=AugmentConfig(repeats=3))
    data = build_data(cfg, 8, torch.Generator().manual_seed(0))
    images, labels = all_batches(data.train_loader)
    assert len(data.train_loader) == 1437 // 30
    # Copies sit in a row and are shifted independently.
    assert torch.equal(labels[0::3], labels[1::3])
    assert not torch.equal(images[0::3], images[1::3])


def test_fake_data_has_the_requested_shape_and_classes():
    cfg = FakeConfig(
        in_chans=3,
        num_classes=4,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        batch_size=8,
        train_size=16,
        val_size=8,
    )
    data = build_data(cfg, 24, torch.Generator())
    images, labels = next(iter(data.train_loader))
    assert images.shape == (8, 3, 24, 24)
    assert labels.max() < 4
    assert len(data.val_loader.dataset) == 8


def test_num_classes_must_match_the_dataset():
    with pytest.raises(UserError, match="data.num_classes=3 but data=digits has 10"):
        build_data(digits(num_classes=3), 8, torch.Generator())


def test_a_source_configured_with_another_source_s_schema_is_refused():
    with pytest.raises(UserError, match="choose it with data=fake, not by setting data.name"):
        build_data(DataConfig(name="fake"), 8, torch.Generator())
    with pytest.raises(UserError, match="Unknown data.name='nope'. Valid names: cifar10, "):
        build_data(DataConfig(name="nope"), 8, torch.Generator())


# ----------------------------------------------------------------------------- image folders


def write_pngs(root: Path, split: str, classes: list[str], n: int = 3, size: int = 20) -> None:
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size + i), color=(i * 40, 100, 200)).save(
                root / split / c / f"{i}.png"
            )


def corrupt_png(path: Path) -> None:
    """A PNG cut off halfway: the header parses, decoding fails."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), color=(9, 9, 9)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def folder_cfg(root: Path, **kw) -> ImageFolderConfig:
    kw = {"in_chans": 3, "num_classes": 2, "mean": [0.5] * 3, "std": [0.5] * 3, **kw}
    return ImageFolderConfig(root=str(root), **kw)


def test_imagefolder_loads_train_and_val_folders(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "dog"], n=2)
    data = build_data(folder_cfg(tmp_path, batch_size=2), 16, torch.Generator())
    assert data.class_names == ["cat", "dog"]
    images, labels = all_batches(data.val_loader)
    assert images.shape == (4, 3, 16, 16)
    assert labels.tolist() == [0, 0, 1, 1]


def test_imagefolder_train_crops_flips_and_erases_at_the_model_size(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"], size=40)
    write_pngs(tmp_path, "val", ["cat", "dog"])
    augment = AugmentConfig(
        crop_scale=[0.08, 1.0], hflip=0.5, auto_augment="randaugment", erase_prob=0.5
    )
    data = build_data(folder_cfg(tmp_path, batch_size=3, augment=augment), 16, torch.Generator())
    images, _ = next(iter(data.train_loader))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32


def test_unreadable_images_are_skipped_counted_and_warned_about_once(tmp_path, caplog):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "dog"])
    corrupt_png(tmp_path / "train" / "cat" / "truncated.png")
    (tmp_path / "train" / "dog" / "garbage.jpg").write_bytes(b"not an image at all")
    data = build_data(folder_cfg(tmp_path, batch_size=4), 16, torch.Generator())
    with caplog.at_level(logging.WARNING, logger="vit_cli.data"):
        _, labels = all_batches(data.train_loader)
        _, labels_again = all_batches(data.train_loader)
    assert len(labels) == len(labels_again) == 6  # 8 files, 2 unreadable
    assert data.skipped.take() == 4  # two passes
    assert data.skipped.take() == 0
    warnings = [r for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warnings) == 1


def test_unreadable_images_are_counted_across_loader_workers(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"], n=4)
    write_pngs(tmp_path, "val", ["cat", "dog"])
    for i in range(4):
        corrupt_png(tmp_path / "train" / "cat" / f"bad{i}.png")
    cfg = folder_cfg(tmp_path, batch_size=2, num_workers=2)
    data = build_data(cfg, 16, torch.Generator())
    _, labels = all_batches(data.train_loader)  # 6 batches of 2 files, over 2 processes
    assert len(labels) == 8
    assert data.skipped.take() == 4


def test_auto_workers_are_the_cores_of_this_process_less_one_shared_on_the_machine(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert Runtime(torch.device("cpu")).loader_workers() == 15
    assert Runtime(torch.device("cpu"), local_world_size=4).loader_workers() == 3
    # Bound to cores of its own (srun --cpu-bind, taskset): they are this process's alone.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert Runtime(torch.device("cpu"), local_world_size=4).loader_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert Runtime(torch.device("cpu")).loader_workers() == 1  # never none

    monkeypatch.undo()
    write_pngs(tmp_path, "train", ["cat", "dog"], n=2)
    write_pngs(tmp_path, "val", ["cat", "dog"], n=2)
    data = build_data(folder_cfg(tmp_path, num_workers="auto"), 16, torch.Generator())
    assert data.train_loader.num_workers == Runtime(torch.device("cpu")).loader_workers() >= 1
    for bad in ("many", -1):
        with pytest.raises(UserError, match="data.num_workers.*auto, or from 0 to"):
            validate(folder_cfg(tmp_path, num_workers=bad))


def test_a_batch_of_only_unreadable_images_is_empty_not_an_error(tmp_path):
    write_pngs(tmp_path, "train", ["cat"], n=1)
    write_pngs(tmp_path, "val", ["cat"], n=1)
    corrupt_png(tmp_path / "val" / "cat" / "0.png")
    data = build_data(folder_cfg(tmp_path, num_classes=1, batch_size=4), 16, torch.Generator())
    images, labels = next(iter(data.val_loader))
    assert images.shape == (0, 3, 16, 16) and labels.shape == (0,)


def test_single_folder_is_split_per_class_with_a_fixed_seed(tmp_path):
    write_pngs(tmp_path, ".", ["cat", "dog", "eel"], n=10)

    def split(seed: int) -> tuple[set, set]:
        cfg = folder_cfg(tmp_path, num_classes=3, val_fraction=0.2, split_seed=seed)
        data = build_data(cfg, 16, torch.Generator())
        train = {p for p, _ in data.train_loader.dataset.samples}
        val = data.val_loader.dataset.samples
        assert sorted(label for _, label in val) == [0, 0, 1, 1, 2, 2]  # 20% of each class
        return train, {p for p, _ in val}

    train, val = split(0)
    assert len(train) == 24 and not train & val
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_imagefolder_classes_come_from_the_folders_and_a_given_count_must_match(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog", "eel"])
    write_pngs(tmp_path, "val", ["cat", "dog", "eel"])
    data = build_data(folder_cfg(tmp_path, num_classes=None), 16, torch.Generator())
    assert data.num_classes == 3 and data.class_names == ["cat", "dog", "eel"]
    with pytest.raises(UserError, match=r"data.num_classes=2 but .* has 3 class folders \(cat, "):
        build_data(folder_cfg(tmp_path, num_classes=2), 16, torch.Generator())


def test_missing_root_says_what_to_do(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="does not exist.*train/ and val/.*val_fraction"):
        build_data(folder_cfg(tmp_path), 16, torch.Generator())
    with pytest.raises(UserError, match="nowhere does not exist. Point data.root"):
        build_data(folder_cfg(tmp_path / "nowhere"), 16, torch.Generator())


def test_val_classes_that_train_lacks_are_an_error(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "eel"])
    with pytest.raises(UserError, match="val has classes that train lacks: eel"):
        build_data(folder_cfg(tmp_path), 16, torch.Generator())


def test_val_may_lack_a_train_class_and_keeps_train_labels(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["dog"])
    data = build_data(folder_cfg(tmp_path), 16, torch.Generator())
    assert [label for _, label in data.val_loader.dataset.samples] == [1, 1, 1]


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "dog"])
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(UserError, match=r"train/emu holds no images"):
        build_data(folder_cfg(tmp_path), 16, torch.Generator())


def test_val_fraction_with_train_and_val_folders_is_an_error(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "dog"])
    with pytest.raises(UserError, match="set data.val_fraction=0"):
        build_data(folder_cfg(tmp_path, val_fraction=0.1), 16, torch.Generator())


# ----------------------------------------------------------------------------- CIFAR


class _Py2Str(str):
    """A key pickled as a Python 2 byte string, as in the official CIFAR batches."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: _Py2Str) -> None:
        data = obj.encode("latin1")
        self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str


def cifar_batch(images: np.ndarray, labels: list[int], label_key: str) -> bytes:
    """A batch file: {b"data": uint8 (N, 3072) rows of R, G, B planes, b"labels": [...]}."""
    buffer = io.BytesIO()
    entry = {_Py2Str("data"): images.reshape(len(images), 3072), _Py2Str(label_key): labels}
    _Py2Pickler(buffer, protocol=2).dump(entry)
    return buffer.getvalue()


def write_cifar_archive(root: Path, name: str = "cifar10", per_batch: int = 6) -> np.ndarray:
    """A small archive in the official layout; returns the test images (N, 3, 32, 32)."""
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(0)
    files = {}
    for file_name, _ in cls.train_list + cls.test_list:
        images = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(i % classes) for i in range(per_batch)]
        files[file_name] = (images, cifar_batch(images, labels, label_key))
    meta = {_Py2Str(cls.meta["key"]): [_Py2Str(f"class{i}") for i in range(classes)]}
    meta_buffer = io.BytesIO()
    _Py2Pickler(meta_buffer, protocol=2).dump(meta)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / cls.filename, "w:gz") as tar:
        contents = {name: data for name, (_, data) in files.items()}
        contents[cls.meta["filename"]] = meta_buffer.getvalue()
        for file_name, data in contents.items():
            info = tarfile.TarInfo(f"{cls.base_folder}/{file_name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return files[cls.test_list[0][0]][0]


def cifar_cfg(root: Path, name: str = "cifar10", **kw) -> CifarConfig:
    return CifarConfig(
        name=name,
        root=str(root),
        in_chans=3,
        num_classes=10 if name == "cifar10" else 100,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        batch_size=4,
        **kw,
    )


def test_test_archive_batches_unpickle_like_the_official_ones(tmp_path):
    write_cifar_archive(tmp_path)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        raw = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    entry = pickle.loads(raw, encoding="bytes")
    assert set(entry) == {b"data", b"labels"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (6, 3072)


def test_cifar10_loads_from_an_archive_whose_md5_is_not_the_official_when_told_to(tmp_path):
    test_images = write_cifar_archive(tmp_path)
    with pytest.raises(UserError, match="not the official archive.*data.check_md5=false"):
        prepare_data(cifar_cfg(tmp_path))
    assert not (tmp_path / "cifar-10-batches-py").exists()
    prepare_data(cifar_cfg(tmp_path, check_md5=False))
    data = build_data(cifar_cfg(tmp_path), 32, torch.Generator())
    assert len(data.train_loader.dataset) == 30 and len(data.val_loader.dataset) == 6
    assert data.class_names == [f"class{i}" for i in range(10)]
    images, labels = all_batches(data.val_loader)
    # mean 0, std 1: the batches are the stored pixels in [0, 1], channels first.
    torch.testing.assert_close(images, torch.from_numpy(test_images).float() / 255)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    # Once extracted, the folder is read directly, and the archive is not needed.
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    prepare_data(cifar_cfg(tmp_path))
    assert len(build_data(cifar_cfg(tmp_path), 32, torch.Generator()).val_loader.dataset) == 6


def test_reading_cifar_never_extracts_an_archive(tmp_path):
    write_cifar_archive(tmp_path)
    with pytest.raises(UserError, match="vit-eval reads only data that is in place"):
        build_data(cifar_cfg(tmp_path, check_md5=False), 32, torch.Generator())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar100_loads_fine_labels_and_resizes_to_the_model(tmp_path):
    write_cifar_archive(tmp_path, "cifar100", per_batch=5)
    cfg = cifar_cfg(tmp_path, "cifar100", shift=4, augment=AugmentConfig(hflip=0.5))
    prepare_data(cifar_cfg(tmp_path, "cifar100", check_md5=False))
    data = build_data(cfg, 48, torch.Generator())
    assert len(data.train_loader.dataset) == 5 and len(data.class_names) == 100
    images, _ = next(iter(data.train_loader))
    assert images.shape == (4, 3, 48, 48)


def test_cifar_without_archive_and_download_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError) as info:
        prepare_data(cifar_cfg(tmp_path, download=False))
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "data.download=true" in message


def test_cifar_download_failure_says_where_to_put_the_archive(tmp_path, monkeypatch):
    # All traffic goes through a proxy on a closed local port: refused at once, and nothing
    # leaves the machine.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="could not download") as info:
        prepare_data(cifar_cfg(tmp_path, download=True))
    assert f"put cifar-10-python.tar.gz in {tmp_path}" in str(info.value)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_cifar_folder_missing_a_batch_is_reported(tmp_path):
    write_cifar_archive(tmp_path)
    prepare_data(cifar_cfg(tmp_path, check_md5=False))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="lacks data_batch_3. Delete the folder"):
        build_data(cifar_cfg(tmp_path), 32, torch.Generator())


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink"])
def test_a_malicious_archive_writes_nothing_outside_data_root(tmp_path, attack):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if attack == "symlink":  # a link out of the folder, then a file written through it
            link = tarfile.TarInfo("cifar-10-batches-py")
            link.type, link.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(link)
            name = "cifar-10-batches-py/data_batch_1"
        else:
            name = "../outside/x" if attack == "dotdot" else str(outside / "x")
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    outside.mkdir()
    if attack == "absolute":  # the "data" filter strips the leading slash: it lands in root
        prepare_data(cifar_cfg(root, check_md5=False))
        assert (root / str(outside / "x").lstrip("/")).read_bytes() == b"bad"
    else:
        with pytest.raises(UserError, match="tries to write outside"):
            prepare_data(cifar_cfg(root, check_md5=False))
    assert list(outside.iterdir()) == []


def _cifar_folder_with(tmp_path: Path, batch: bytes) -> Path:
    write_cifar_archive(tmp_path)
    prepare_data(cifar_cfg(tmp_path, check_md5=False))
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(batch)
    return tmp_path / "cifar-10-batches-py" / "data_batch_2"


def test_a_cifar_batch_of_python_objects_is_refused_naming_the_file(tmp_path):
    objects = np.array([["hello"] * 3072] * 2, dtype=object)
    path = _cifar_folder_with(tmp_path, cifar_batch(objects, [0, 1], "labels"))
    with pytest.raises(UserError, match="object array; CIFAR batches hold numbers") as info:
        build_data(cifar_cfg(tmp_path), 32, torch.Generator())
    assert str(path) in str(info.value)


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    path = _cifar_folder_with(tmp_path, pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(UserError, match="is not allowed in a CIFAR batch") as info:
        build_data(cifar_cfg(tmp_path), 32, torch.Generator())
    assert str(path) in str(info.value) and not (tmp_path / "pwned").exists()


def test_cifar_labels_out_of_range_are_reported_when_read(tmp_path):
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    path = _cifar_folder_with(tmp_path, cifar_batch(images, [3, 10], "labels"))
    with pytest.raises(UserError, match=r"labels outside 0..9 \(e.g. 10 at row 1\)") as info:
        build_data(cifar_cfg(tmp_path), 32, torch.Generator())
    assert str(path) in str(info.value)


def test_a_cifar_batch_of_the_wrong_shape_is_a_short_error(tmp_path):
    images = np.zeros((2, 3, 16, 16), dtype=np.uint8)  # 768 values a row, not 3072
    buffer = io.BytesIO()
    entry = {_Py2Str("data"): images.reshape(2, -1), _Py2Str("labels"): [0, 1]}
    _Py2Pickler(buffer, protocol=2).dump(entry)
    _cifar_folder_with(tmp_path, buffer.getvalue())
    with pytest.raises(UserError, match="is not a CIFAR batch.*2 rows of 768 values"):
        build_data(cifar_cfg(tmp_path), 32, torch.Generator())


def test_an_image_folder_root_that_is_a_file_says_so(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="photos.zip is a file"):
        build_data(folder_cfg(tmp_path / "photos.zip"), 16, torch.Generator())


def test_a_16_bit_grayscale_png_keeps_its_levels_instead_of_clipping_to_white(tmp_path):
    levels = np.array([[0, 256 * 64, 256 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # a uint16 array: mode I;16
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I;16")  # what Pillow hands over: 16 bits a pixel
    gray = np.asarray(read_image(tmp_path / "deep.png", 1, max_pixels=1000))
    assert gray[0].tolist() == [0, 64, 128, 255]
    rgb = np.asarray(read_image(tmp_path / "deep.png", 3, max_pixels=1000))
    assert rgb.shape == (4, 4, 3) and rgb[0, :, 0].tolist() == [0, 64, 128, 255]


def test_floating_point_and_oversized_images_are_refused_before_decoding(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(UnsupportedImage, match="floating-point pixels"):
        read_image(tmp_path / "float.tif", 3, max_pixels=1000)
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    with pytest.raises(UnsupportedImage, match="40x30 = 1,200 pixels, above the limit of 1,000"):
        read_image(tmp_path / "big.png", 3, max_pixels=1000)
    assert issubclass(UnsupportedImage, UNREADABLE)  # skipped and counted like a corrupt file


def test_an_oversized_image_in_a_folder_is_skipped_and_counted(tmp_path):
    write_pngs(tmp_path, "train", ["a", "b"], n=2)
    write_pngs(tmp_path, "val", ["a", "b"], n=2)
    Image.new("RGB", (200, 200)).save(tmp_path / "train" / "a" / "huge.png")
    data = build_data(folder_cfg(tmp_path, max_image_pixels=100 * 100), 16, torch.Generator())
    images, _ = all_batches(data.train_loader)
    assert len(images) == 4 and data.skipped.take() == 1


# ----------------------------------------------------------------------------- sources

TOY_MODULE = '''"""data=toy: four classes of flat grey images, made in memory."""

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from vit_cli.config import DataConfig
from vit_cli.data import DataSource
from vit_cli.data._shared import Splits


@dataclass
class ToyConfig(DataConfig):
    name: str = "toy"
    images: int = 64


def build(cfg: ToyConfig, img_size: int) -> Splits:
    labels = torch.arange(cfg.images) % 4
    images = (labels / 3.0).view(-1, 1, 1, 1).expand(-1, cfg.in_chans, img_size, img_size)
    data = TensorDataset(images.contiguous(), labels)
    return Splits(data, data, ["a", "b", "c", "d"])


SOURCE = DataSource(schema=ToyConfig, build=build)
'''

TOY_YAML = """defaults:
  - /schema/data/toy@_here_
  - _self_

name: toy
img_size: 8
in_chans: 1
num_classes: 4
mean: [0.5]
std: [0.5]
batch_size: 16
images: 64
"""


@pytest.fixture
def toy_source(monkeypatch) -> Iterator[None]:
    """configs/data/toy.yaml and vit_cli/data/toy.py, removed afterwards whatever happens."""
    module = Path(str(files("vit_cli.data"))) / "toy.py"
    yaml = Path(str(files("vit_cli.configs"))) / "data" / "toy.yaml"
    assert not module.exists() and not yaml.exists(), "a toy source is left from another run"
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no toy .pyc in __pycache__
    try:
        module.write_text(TOY_MODULE)
        yaml.write_text(TOY_YAML)
        yield
    finally:
        module.unlink(missing_ok=True)
        yaml.unlink(missing_ok=True)
        for compiled in (module.parent / "__pycache__").glob("toy.*.pyc"):
            compiled.unlink()


@pytest.mark.slow
def test_a_new_source_is_one_module_and_one_yaml(toy_source, run_cli, tmp_path):
    result = run_cli("data=toy", "data.images=48", *TINY, "data.batch_size=16", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["data"]["class_names"] == ["a", "b", "c", "d"]
    assert ckpt["config"]["data"]["images"] == 48
    assert ckpt["state"]["step"] == 2 * 48 // 16  # TINY: 2 epochs of 3 batches of 16
    # Its own keys are checked at composition like any other.
    typo = run_cli("data=toy", "data.imagse=48")
    assert typo.returncode == 2 and "imagse" in typo.stderr


@pytest.mark.slow
def test_a_checkpoint_with_the_flat_data_config_of_before_resumes_and_scores(
    compose_cfg, tmp_path, capsys
):
    fit(compose_cfg(*TINY, "trainer.epochs=1"), tmp_path / "first")
    ckpt = load_checkpoint(tmp_path / "first" / "last.pt")
    # As written when one DataConfig held the keys of every source.
    ckpt["config"]["data"].update(
        root=None, download=False, check_md5=True, val_fraction=0.0, split_seed=0,
        train_size=1024, val_size=256,
    )  # fmt: skip
    save_checkpoint(ckpt, tmp_path / "older.pt")
    resume = f"trainer.resume={tmp_path / 'older.pt'}"
    fit(compose_cfg(*TINY, resume, "trainer.epochs=2"), tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["epoch"] == 2
    eval_main([str(tmp_path / "older.pt"), "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["acc1"] == ckpt["metrics"]["val/acc1"] and metrics["images"] == 360
    capsys.readouterr()
