"""`vit-data pack`: shards written from the real digits and from image folders built here,
read back with webdataset's own reader. The CLI runs as a subprocess where a signal or a
fresh process matters, and in this process (`data_cli.main`) elsewhere, to save the start-up
of torch in each run."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset
from hydra.core.override_parser.overrides_parser import OverridesParser
from PIL import Image

from tests.conftest import finish
from tests.test_data_cli import photo, vit_data, vit_data_command
from vit_cli import data_cli
from vit_cli.data import sources


def pack_here(capsys, *args: object) -> tuple[int, str, str]:
    """Run `vit-data pack ARGS` in this process: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        data_cli.main(["pack", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.suffix == ".tar")


def stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Each shard's inode and modification time: unchanged unless it was written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}


@pytest.fixture(scope="module")
def digits_pack(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`vit-data pack digits OUT --shard-size 500`, run once as a subprocess."""
    root = tmp_path_factory.mktemp("digits")
    result = vit_data(root, "pack", "digits", root / "out", "--shard-size", 500)
    assert result.returncode == 0, result.stderr
    return root / "out", result


@pytest.fixture(scope="module")
def digits_source():
    """The digits splits as vit-train builds them at data.img_size=16."""
    from vit_cli.composition import compose_train_config

    cfg = compose_train_config(["data=digits"]).data
    return sources()["digits"].build(cfg, cfg.img_size)


@pytest.mark.slow
def test_digits_shards_hold_500_samples_each_and_the_manifest_describes_them(digits_pack):
    out, _ = digits_pack
    assert shard_files(out) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"
    ]  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest.pop("splits")
    assert manifest == {
        "format": "vit-data pack 1",
        "source": "digits",
        "classes": [str(d) for d in range(10)],
        "img_size": 16,
        "in_chans": 1,
        "mean": [0.3053],
        "std": [0.376],
        "label_key": "cls",
        "image_keys": ["png"],
    }
    assert {name: split["samples"] for name, split in splits.items()} == {"train": 1437, "val": 360}
    counts = {s["file"]: s["samples"] for split in splits.values() for s in split["shards"]}
    assert counts == {
        "train-000000.tar": 500, "train-000001.tar": 500, "train-000002.tar": 437,
        "val-000000.tar": 360,
    }  # fmt: skip
    for split in splits.values():
        for shard in split["shards"]:
            path = out / shard["file"]
            assert shard["bytes"] == path.stat().st_size
            assert shard["md5"] == md5(path)


@pytest.mark.slow
def test_each_sample_is_its_index_as_png_and_cls_once(digits_pack):
    out, _ = digits_pack
    for split, count, shards in (("train", 1437, 3), ("val", 360, 1)):
        names = [m for k in range(shards) for m in members(out / f"{split}-{k:06d}.tar")]
        expected = [f"{i:08d}.{ext}" for i in range(count) for ext in ("cls", "png")]
        assert names == expected, split


@pytest.mark.slow
def test_webdatasets_reader_gets_the_sources_labels_and_pixels(digits_pack, digits_source):
    out, _ = digits_pack
    for split, data in (("train", digits_source.train), ("val", digits_source.val)):
        shards = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
        samples = list(webdataset.WebDataset(shards, shardshuffle=False))
        images, labels = data.tensors  # (N, 1, 16, 16) float in [0, 1], (N,)
        assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(len(labels))]
        assert [int(s["cls"]) for s in samples] == labels.tolist()
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in samples])
        assert decoded.dtype == np.uint8 and decoded.shape == (len(labels), 16, 16)
        expected = (images[:, 0] * 255).round().numpy().astype(np.uint8)
        np.testing.assert_array_equal(decoded, expected)


@pytest.mark.slow
def test_the_printed_command_names_the_shards_in_brace_notation(digits_pack, compose_cfg):
    out, result = digits_pack
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("train 1437 samples in 3 shards, val 360 samples in 1 shard; ")
    assert "wrote 4, already there 0, unreadable 0;" in lines[-3]
    words = shlex.split(lines[-1])
    assert words[:2] == ["vit-train", "data=webdataset"]
    values = {
        o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[2:])
    }
    assert values == {
        "data.train_shards": f"{out}/train-{{000000..000002}}.tar",
        "data.val_shards": f"{out}/val-000000.tar",
        "data.num_classes": 10,
        "data.img_size": 16,
        "data.in_chans": 1,
        "data.mean": [0.3053],
        "data.std": [0.376],
        # How data=digits trains, where data=webdataset's defaults (those of photos) differ.
        "data.shift": 1,
        "data.augment.crop_scale": None,
        "data.augment.hflip": 0.0,
        "data.augment.eval_crop_ratio": 1.0,
    }
    # The reader's config takes the command as it is, and webdataset expands the braces.
    data = compose_cfg(*words[1:]).data
    assert webdataset.shardlists.expand_urls(data.train_shards) == [
        str(out / f"train-{k:06d}.tar") for k in range(3)
    ]


@pytest.mark.slow
def test_a_rerun_keeps_the_shards_there_and_writes_the_missing_one_again(
    digits_pack, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(digits_pack[0], out)
    before = stamps(out)
    manifest = (out / "manifest.json").read_text()
    removed = md5(out / "train-000001.tar")
    (out / "train-000001.tar").unlink()
    (out / "manifest.json").unlink()

    status, stdout, stderr = pack_here(capsys, "digits", out, "--shard-size", 500)
    assert status == 0, stderr
    assert "wrote 1, already there 3," in stdout
    after = stamps(out)
    del after["train-000001.tar"], before["train-000001.tar"]
    assert after == before
    assert md5(out / "train-000001.tar") == removed
    assert (out / "manifest.json").read_text() == manifest

    status, _, stderr = pack_here(capsys, "digits", out, "--shard-size", 400)
    assert status == 2
    assert "differ in --shard-size" in stderr and "choose an empty folder" in stderr


# The image folder: (path, the format it is written in). "broken.jpg" is no image at all,
# and "named.png" is a JPEG: its key is its format's.
FILES = {
    "train/cat/a.jpg": "JPEG",
    "train/cat/b.png": "PNG",
    "train/cat/broken.jpg": None,
    "train/cat/deeper/c.JPEG": "JPEG",
    "train/dog/d.jpeg": "JPEG",
    "train/dog/e.webp": "WEBP",
    "val/cat/f.jpg": "JPEG",
    "val/cat/named.png": "JPEG",
    "val/dog/g.PNG": "PNG",
    "val/dog/h.bmp": "BMP",
}


def image_folder(root: Path) -> Path:
    for i, (rel, fmt) in enumerate(FILES.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt is None:
            path.write_bytes(b"not an image\n" * 10)
        else:
            photo(24 + i, 20, seed=i).save(path, fmt)
    return root


KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


def split_order(root: Path, split: str) -> list[tuple[Path, int]]:
    """A split's files and labels in data=imagefolder's order: by class, then by path."""
    classes = sorted(p.name for p in (root / split).iterdir())
    return [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / split / name).rglob("*"), key=str)
        if path.is_file()
    ]


@pytest.mark.slow
def test_image_files_are_copied_byte_for_byte_under_their_own_extension(tmp_path, capsys):
    src, out = image_folder(tmp_path / "photos"), tmp_path / "shards"
    status, stdout, stderr = pack_here(capsys, src, out, "--shard-size", 2)
    assert status == 0, stderr
    assert shard_files(out) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "val-000000.tar", "val-000001.tar",
    ]  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "imagefolder" and manifest["classes"] == ["cat", "dog"]
    assert manifest["image_keys"] == ["bmp", "jpg", "png", "webp"]
    assert manifest["splits"]["train"]["samples"] == 5  # 6 files, one of them broken

    for split in ("train", "val"):
        shards = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
        samples = {s["__key__"]: s for s in webdataset.WebDataset(shards, shardshuffle=False)}
        expected = {}
        for i, (path, label) in enumerate(split_order(src, split)):
            fmt = FILES[str(path.relative_to(src))]
            if fmt is not None:
                expected[f"{i:08d}"] = (KEYS[fmt], path.read_bytes(), label)
        assert sorted(samples) == sorted(expected), split
        for key, (extension, data, label) in expected.items():
            sample = samples[key]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} == {extension, "cls"}
            assert sample[extension] == data and int(sample["cls"]) == label, key
        for shard in shards:
            assert all(re.fullmatch(r"\d{8}\.(cls|jpg|png|webp|bmp)", m) for m in members(shard))

    assert f"unreadable {src / 'train/cat/broken.jpg'}: " in stdout
    assert "unreadable 1 (listed above)" in stdout
    # The reader takes jpg, jpeg, png and webp unless told: the command names the bmp too.
    assert """'data.image_key="bmp;jpg;png;webp"'""" in stdout.splitlines()[-1]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_ends_as_an_uninterrupted_pack(
    tmp_path, start, capsys
):
    out = tmp_path / "out"
    # 180 shards of 10 digits: a second or more of writing after the first one is in place.
    proc = start(vit_data_command("pack", "digits", out, "--shard-size", 10), tmp_path)
    while proc.poll() is None and not (out / "train-000000.tar").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit-data: Interrupted with "), stderr
    assert "Run the same command again to continue" in lines[0]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()
    assert 1 <= len(shard_files(out)) < 180
    kept = stamps(out)

    status, _, err = pack_here(capsys, "digits", out, "--shard-size", 10)
    assert status == 0, err
    assert {name: stamp for name, stamp in stamps(out).items() if name in kept} == kept
    whole = tmp_path / "whole"
    status, _, err = pack_here(capsys, "digits", whole, "--shard-size", 10)
    assert status == 0, err
    assert (out / "manifest.json").read_text() == (whole / "manifest.json").read_text()
    assert shard_files(out) == shard_files(whole)
    for name in shard_files(whole):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


@pytest.mark.parametrize(
    "case, args, says",
    [
        ("unknown SRC", ["nope", "out"], "SRC nope is neither a data config"),
        ("OUT is a file", ["digits", "taken.txt"], "is a file"),
        ("shard size 0", ["digits", "out", "--shard-size", 0], "--shard-size must be at least 1"),
        ("foreign files", ["digits", "theirs"], "did not write: choose an empty folder"),
        ("not a data key", ["digits", "out", "model.depth=2"], "data.KEY=VALUE overrides"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line_that_says_the_fix(
    tmp_path, capsys, monkeypatch, case, args, says
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "taken.txt").write_text("mine\n")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine\n")
    status, _, stderr = pack_here(capsys, *args)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit-data: error: "), stderr
    assert says in lines[0]
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt", "theirs"]


def test_help_of_pack_shows_examples(tmp_path):
    result = vit_data(tmp_path, "pack", "--help")
    assert result.returncode == 0, result.stderr
    assert "vit-data pack digits digits_shards/ --shard-size 500" in result.stdout
    assert "--shard-size" in result.stdout and "manifest.json" in result.stdout
