"""The MNIST family from IDX files written here: layouts, splits, download, hostile headers."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from tests.conftest import TINY
from tests.test_inference import tool
from vit_cli.checkpoint import load_checkpoint
from vit_cli.data import build_data, prepare_data
from vit_cli.data import mnist as idx_source
from vit_cli.data._shared import MemoryImages, StackedSamples
from vit_cli.data.mnist import IdxConfig, read_idx
from vit_cli.errors import UserError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """`array` (uint8) as an IDX file: 0x0000, type 0x08, its rank, big-endian sizes, values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_family(
    root: Path, gz: bool = True, layout: str = "flat", name: str = "FashionMNIST",
    n_train: int = 200, n_test: int = 60, size: int = 28,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Four small IDX files whose class k images are brightest in row band k (learnable)."""
    folder = root if layout == "flat" else root / name / "raw"
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
        for i, k in enumerate(labels.tolist()):
            images[i, k * size // 10 : (k + 1) * size // 10] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, array in arrays.items():
        write_file(folder / FILE_NAMES[key], idx_bytes(array), gz)
    return arrays


def cfg_for(root: Path | None, name: str = "fashion_mnist", **kw) -> IdxConfig:
    kw = {"download": False, **kw}
    return IdxConfig(
        name=name, root=None if root is None else str(root), img_size=28, in_chans=1,
        mean=[0.3], std=[0.3], batch_size=32, **kw,
    )  # fmt: skip


def loaded(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_the_four_files_load_gzipped_or_not_flat_or_in_torchvision_s_layout(tmp_path, gz, layout):
    arrays = write_family(tmp_path, gz=gz, layout=layout)
    data = build_data(cfg_for(tmp_path), 28, torch.Generator())
    train_images, train_labels = data.train_loader.dataset.tensors
    assert train_images.dtype == torch.uint8 and train_images.shape == (200, 1, 28, 28)
    assert torch.equal(train_images[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(train_labels, torch.from_numpy(arrays["train_labels"]).long())
    # The official test split is the val split, in file order, normalised.
    images, labels = loaded(data.val_loader)
    assert torch.equal(labels, torch.from_numpy(arrays["test_labels"]).long())
    expected = (torch.from_numpy(arrays["test_images"]).float() / 255 - 0.3) / 0.3
    assert torch.allclose(images[:, 0], expected, atol=1e-6)
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_a_batch_is_taken_from_memory_at_once_not_image_by_image():
    images = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    dataset = MemoryImages(images, torch.arange(5))
    batch = dataset.__getitems__([4, 0, 2])
    assert isinstance(batch, StackedSamples)
    assert torch.equal(batch.images, images[[4, 0, 2]]) and batch.labels.tolist() == [4, 0, 2]


def test_each_family_member_names_its_classes_and_reads_its_own_torchvision_folder(tmp_path):
    write_family(tmp_path, layout="torchvision", name="KMNIST")
    assert build_data(cfg_for(tmp_path, "kmnist"), 28, torch.Generator()).class_names[:3] == [
        "o", "ki", "su",
    ]  # fmt: skip
    write_family(tmp_path, layout="torchvision", name="MNIST")
    assert build_data(cfg_for(tmp_path, "mnist"), 28, torch.Generator()).class_names == [
        str(d) for d in range(10)
    ]


def test_images_are_resized_to_the_model_resolution_in_the_batch(tmp_path):
    write_family(tmp_path)
    images, _ = loaded(build_data(cfg_for(tmp_path), 32, torch.Generator()).val_loader)
    assert images.shape == (60, 1, 32, 32)


def test_without_data_root_the_debian_package_folder_is_read(tmp_path, monkeypatch):
    write_family(tmp_path / "debian")
    monkeypatch.setitem(idx_source.SYSTEM_FOLDERS, "fashion_mnist", tmp_path / "debian")
    data = build_data(cfg_for(None), 28, torch.Generator())
    assert len(data.train_loader.dataset) == 200


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_fashion_mnist_yaml_holds_the_mean_and_std_of_the_real_training_images():
    images = read_idx(DEBIAN / "train-images-idx3-ubyte.gz", 3)
    pixels = torch.from_numpy(images).double() / 255
    assert images.shape == (60_000, 28, 28)
    yaml = (Path(idx_source.__file__).parents[2] / "configs/data/fashion_mnist.yaml").read_text()
    assert f"mean: [{pixels.mean():.4f}]" in yaml and f"std: [{pixels.std():.4f}]" in yaml


# ----------------------------------------------------------------------------- splits


def test_val_fraction_holds_out_a_stratified_seeded_part_of_train_and_keeps_the_test_split(
    tmp_path,
):
    arrays = write_family(tmp_path)
    data = build_data(cfg_for(tmp_path, val_fraction=0.1), 28, torch.Generator())
    train_images, train_labels = data.train_loader.dataset.tensors
    val_images, val_labels = data.val_loader.dataset.tensors
    assert len(train_labels) == 180 and len(val_labels) == 20
    assert torch.bincount(val_labels, minlength=10).tolist() == [2] * 10  # stratified
    # Disjoint, and together the whole training file.
    together = torch.cat([train_images, val_images]).flatten(1)
    assert len(torch.unique(together, dim=0)) == 200
    again = build_data(cfg_for(tmp_path, val_fraction=0.1), 28, torch.Generator())
    assert torch.equal(again.val_loader.dataset.tensors[0], val_images)
    other = build_data(cfg_for(tmp_path, val_fraction=0.1, split_seed=1), 28, torch.Generator())
    assert not torch.equal(other.val_loader.dataset.tensors[0], val_images)
    test = build_data(cfg_for(tmp_path, val_fraction=0.1), 28, torch.Generator(), eval_split="test")
    assert torch.equal(
        test.val_loader.dataset.tensors[1], torch.from_numpy(arrays["test_labels"]).long()
    )
    assert not test.same_val_as_training and data.same_val_as_training


def test_a_source_without_a_test_split_says_so(tmp_path):
    from vit_cli.config import DataConfig

    with pytest.raises(UserError, match="data=digits has no test split"):
        build_data(DataConfig(), 16, torch.Generator(), eval_split="test")


# ----------------------------------------------------------------------------- download


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Iterator[Path]:
    """A local HTTP mirror for torchvision's downloader, holding small gzipped IDX files
    whose md5s stand in for the official ones."""
    served = tmp_path / "mirror"
    write_family(served)
    resources = [
        (f"{stem}.gz", hashlib.md5((served / f"{stem}.gz").read_bytes()).hexdigest())
        for stem in FILE_NAMES.values()
    ]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    # Straight to the mirror, past any proxy (urllib keeps the proxies of its first request).
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1")
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [url])
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    yield served
    server.shutdown()


def test_download_fetches_missing_files_with_torchvision_s_downloader_and_checksums(
    tmp_path, mirror
):
    cfg = cfg_for(tmp_path / "data", download=True)
    prepare_data(cfg)
    assert (tmp_path / "data/FashionMNIST/raw/train-images-idx3-ubyte.gz").is_file()
    assert len(build_data(cfg, 28, torch.Generator()).train_loader.dataset) == 200


def test_a_download_whose_md5_differs_is_refused(tmp_path, mirror, monkeypatch):
    wrong = [(name, "0" * 32) for name, _ in datasets.FashionMNIST.resources]
    monkeypatch.setattr(datasets.FashionMNIST, "resources", wrong)
    with pytest.raises(UserError, match="could not download .* put them in"):
        prepare_data(cfg_for(tmp_path / "data", download=True))


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte.gz .* data.download=true"):
        prepare_data(cfg_for(tmp_path))


# ----------------------------------------------------------------------------- hostile files


def corrupt(tmp_path: Path, case: str) -> Path:
    """Write the family, then break one file as `case` says; returns the broken file."""
    arrays = write_family(tmp_path, gz=False)
    train_images = tmp_path / FILE_NAMES["train_images"]
    train_labels = tmp_path / FILE_NAMES["train_labels"]
    if case == "wrong magic":
        train_images.write_bytes(b"\x08\x03\x00\x00" + train_images.read_bytes()[4:])
    elif case == "float values":
        train_images.write_bytes(b"\x00\x00\x0d\x03" + train_images.read_bytes()[4:])
    elif case == "short file":
        train_images.write_bytes(train_images.read_bytes()[:-100])
    elif case == "long file":
        train_images.write_bytes(train_images.read_bytes() + b"\x00" * 5)
    elif case == "count mismatch":
        train_labels.write_bytes(idx_bytes(arrays["train_labels"][:-1]))
        return train_labels
    elif case == "label 11":
        labels = arrays["train_labels"].copy()
        labels[7] = 11
        train_labels.write_bytes(idx_bytes(labels))
        return train_labels
    elif case == "huge header":
        # 1,275,510,204 images of 28x28: 10^12 bytes declared, 200 images there.
        train_images.write_bytes(
            b"\x00\x00\x08\x03" + struct.pack(">3I", 1_275_510_204, 28, 28)
            + arrays["train_images"].tobytes()
        )  # fmt: skip
    elif case == "truncated gzip":
        data = gzip.compress(train_images.read_bytes())
        train_images.unlink()
        train_images = train_images.with_name(train_images.name + ".gz")
        train_images.write_bytes(data[: len(data) // 2])
    return train_images


CASES = {
    "wrong magic": "not an IDX file",
    "float values": r"float32 \(type code 0x0D\)",
    "short file": "it is truncated",
    "long file": "longer than its header says",
    "count mismatch": "200 images but .* 199 labels",
    "label 11": "label 11 at row 7 is outside 0..9",
    "huge header": "declares 1275510204 x 28 x 28 values .* truncated",
    "truncated gzip": "cannot be read",
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_file_is_one_line_naming_it_and_what_is_wrong(tmp_path, case):
    broken = corrupt(tmp_path, case)
    with pytest.raises(UserError, match=CASES[case]) as error:
        build_data(cfg_for(tmp_path), 28, torch.Generator())
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


def test_a_gzipped_header_claiming_a_terabyte_allocates_only_what_the_file_holds(tmp_path):
    images = np.zeros((50, 28, 28), dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", 1_275_510_204, 28, 28)
    path = write_file(tmp_path / "images-idx3-ubyte", header + images.tobytes(), gz=True)
    tracemalloc.start()
    with pytest.raises(UserError, match="truncated"):
        read_idx(path, 3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20  # the 39 kB there, a read chunk or two, and no terabyte


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong magic", "short file", "count mismatch", "label 11",
                                  "huge header"])  # fmt: skip
def test_vit_train_on_a_broken_file_exits_2_naming_it(tmp_path, run_cli, case):
    broken = corrupt(tmp_path / "data", case)
    result = run_cli("data=fashion_mnist", f"data.root={tmp_path / 'data'}", *TINY)
    assert result.returncode == 2, result.stderr
    assert str(broken) in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_vit_train_trains_an_epoch_from_each_layout(tmp_path, run_cli, gz, layout):
    write_family(tmp_path / "data", gz=gz, layout=layout)
    result = run_cli(
        "data=fashion_mnist", f"data.root={tmp_path / 'data'}", *TINY, "trainer.epochs=1",
        "data.batch_size=20", "hydra.run.dir=run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["step"] == 10
    assert ckpt["data"]["class_names"][6] == "Shirt"


@pytest.mark.slow
def test_tuned_on_held_out_val_then_scored_once_on_test_by_vit_eval(tmp_path, run_cli):
    write_family(tmp_path / "data", n_train=400, n_test=100)
    result = run_cli(
        "data=fashion_mnist", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.1",
        *TINY, "trainer.epochs=3", "hydra.run.dir=run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    val = tool("vit-eval", "last.pt", "--out", "eval_val", cwd=run)
    test = tool("vit-eval", "last.pt", "--split", "test", "--out", "eval_test", cwd=run)
    assert val.returncode == 0 and test.returncode == 0, val.stderr + test.stderr
    val_metrics = json.loads((run / "eval_val/metrics.json").read_text())
    test_metrics = json.loads((run / "eval_test/metrics.json").read_text())
    logged = load_checkpoint(run / "last.pt")["metrics"]["val/acc1"]
    assert val_metrics["images"] == 40 and val_metrics["acc1"] == logged
    assert val_metrics["logged_acc1"] == logged
    assert test_metrics["images"] == 100 and test_metrics["data"]["split"] == "test"
    # The test split was never scored in training: there is no logged figure to match.
    assert test_metrics["logged_acc1"] is None
    assert "test split" in test.stdout


@pytest.mark.slow
def test_the_fashion_mnist_preset_trains_its_model_from_the_cli(tmp_path, run_cli):
    write_family(tmp_path / "data", n_train=128, n_test=40)
    result = run_cli(
        "experiment=fashion_mnist_vit", f"data.root={tmp_path / 'data'}", "trainer.epochs=1",
        "hydra.run.dir=run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["step"] == 1  # one batch of 128
    assert ckpt["config"]["model"]["patch_size"] == 7
    assert ckpt["data"]["mean"] == pytest.approx([0.2860])
