"""The real `vit-data` console script, run as a subprocess on image folders built here."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from tests.conftest import finish, run_command

N = 64  # --short-side of the shared run
RED, BLUE = (220, 20, 20), (20, 20, 220)


def vit_data_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "vit_cli.data_cli", *map(str, args)]


def vit_data(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    return run_command(vit_data_command(*args), cwd, env)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with gradients and noise, which JPEG quality shows in the file."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))


def halves(width: int, height: int) -> Image.Image:
    """Red above blue, upright."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = RED, BLUE
    return Image.fromarray(pixels)


def save_turned(upright: Image.Image, path: Path) -> None:
    """Store `upright` turned a quarter counter-clockwise, with the EXIF orientation 6
    ("rotate 90 clockwise to show") that a camera held upright writes."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


def outputs(folder: Path) -> list[Path]:
    """The finished files under `folder` (not the hidden temporary ones)."""
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


# The shared run's input: (relative path, what it is). Under train/ and val/, class folders
# at two depths, every kind of file the command meets.
RESIZED = {
    "train/cat/big_0.jpg": (1200, 900),
    "train/cat/big_1.jpg": (1200, 900),
    "train/cat/nested/tall.jpg": (600, 1000),
    "train/dog/upper.JPEG": (800, 600),
    "train/dog/phone.jpg": (800, 600),  # MPO, as phones write: written as JPEG
    "val/cat/gray.jpg": (640, 480),
    "val/cat/alpha.png": (300, 200),
    "val/dog/turned.jpg": (200, 400),  # upright size
    "val/dog/turned_small.jpg": (30, 60),  # upright size, below N: turned, not resized
}
COPIED = ["train/dog/small.jpg", "train/dog/edge.png"]
UNREADABLE = ["val/dog/truncated.jpg", "val/dog/x.jpg", "val/dog/huge.png"]
NOT_IMAGES = ["notes.txt", "train/cat/labels.csv"]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One run over a small folder of every case, in two worker processes at quality 70;
    returns SRC, DST and the run."""
    root = tmp_path_factory.mktemp("shared")
    src, dst = root / "photos", root / f"photos_{N}"
    for rel in [*RESIZED, *COPIED, *UNREADABLE, *NOT_IMAGES]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(["train/cat/big_0.jpg", "train/cat/big_1.jpg"]):
        photo(1200, 900, seed=i).save(src / rel, quality=95)
    photo(600, 1000).save(src / "train/cat/nested/tall.jpg", quality=95)
    photo(800, 600).save(src / "train/dog/upper.JPEG", quality=95)
    depth = photo(200, 150).convert("L")
    photo(800, 600).save(
        src / "train/dog/phone.jpg", "MPO", save_all=True, append_images=[depth], quality=95
    )
    photo(640, 480).convert("L").save(src / "val/cat/gray.jpg", quality=95)
    rgba = photo(300, 200)
    rgba.putalpha(Image.linear_gradient("L").rotate(90).resize((300, 200)))
    rgba.save(src / "val/cat/alpha.png")
    save_turned(halves(200, 400), src / "val/dog/turned.jpg")
    save_turned(halves(30, 60), src / "val/dog/turned_small.jpg")
    photo(60, 40).save(src / "train/dog/small.jpg", quality=95)
    photo(100, N).save(src / "train/dog/edge.png")
    whole = io.BytesIO()
    photo(600, 400).save(whole, "JPEG", quality=95)
    (src / "val/dog/truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (src / "val/dog/x.jpg").write_text("not an image\n")
    Image.new("L", (2000, 700), 128).save(src / "val/dog/huge.png")  # 1.4 million pixels
    for rel in NOT_IMAGES:
        (src / rel).write_text("label\n")

    result = vit_data(
        root, "resize", src, dst, "--short-side", N, "--quality", 70, "--workers", 2,
        "--max-pixels", 1_100_000,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return src, dst, result


@pytest.mark.slow
def test_resize_keeps_folders_and_names_and_brings_the_short_side_to_n(shared_run):
    src, dst, result = shared_run
    assert sorted(str(p.relative_to(dst)) for p in outputs(dst)) == sorted([*RESIZED, *COPIED])
    for rel, (width, height) in RESIZED.items():
        with Image.open(dst / rel) as out:
            if rel.endswith("turned_small.jpg"):
                assert out.size == (width, height)
            elif width <= height:
                assert out.size == (N, round(height * N / width)), rel
            else:
                assert out.size == (round(width * N / height), N), rel
            assert out.format == Image.open(src / rel).format.replace("MPO", "JPEG"), rel
    assert (
        f"resized {len(RESIZED)}, copied {len(COPIED)}, already there 0, "
        f"unreadable {len(UNREADABLE)} (listed above), not images {len(NOT_IMAGES)} (left out); "
        f"JPEG quality 70; wrote {dst.resolve()}"
    ) in result.stdout


@pytest.mark.slow
def test_images_small_enough_are_copied_byte_for_byte(shared_run):
    src, dst, _ = shared_run
    for rel in COPIED:
        assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (dst / "val/dog/turned_small.jpg").read_bytes() != (
        src / "val/dog/turned_small.jpg"
    ).read_bytes()


@pytest.mark.slow
def test_jpegs_are_written_at_the_quality_asked_for(shared_run):
    _, dst, _ = shared_run

    def tables(quality: int) -> dict:
        reference = io.BytesIO()
        photo(64, 64).save(reference, "JPEG", quality=quality)
        return Image.open(reference).quantization

    assert tables(70) != tables(90)
    for rel in ["train/cat/big_0.jpg", "train/dog/phone.jpg", "val/dog/turned.jpg"]:
        assert Image.open(dst / rel).quantization == tables(70), rel


@pytest.mark.slow
def test_exif_orientation_is_applied_and_dropped(shared_run):
    _, dst, _ = shared_run
    for rel in ["val/dog/turned.jpg", "val/dog/turned_small.jpg"]:
        with Image.open(dst / rel) as out:
            assert out.height > out.width, rel
            assert ExifTags.Base.Orientation not in out.getexif(), rel
            pixels = np.asarray(out.convert("RGB"), dtype=float)
        quarter = out.height // 4
        top, bottom = pixels[:quarter].mean((0, 1)), pixels[-quarter:].mean((0, 1))
        assert np.abs(top - RED).max() < 30 and np.abs(bottom - BLUE).max() < 30, (rel, top)


@pytest.mark.slow
def test_grayscale_stays_grayscale_and_png_stays_png_with_its_alpha(shared_run):
    _, dst, _ = shared_run
    with Image.open(dst / "val/cat/gray.jpg") as gray:
        assert (gray.format, gray.mode) == ("JPEG", "L")
    with Image.open(dst / "val/cat/alpha.png") as alpha:
        assert (alpha.format, alpha.mode) == ("PNG", "RGBA")
        low, high = alpha.getchannel("A").getextrema()
        assert low < 30 and high > 225


@pytest.mark.slow
def test_unreadable_files_are_listed_skipped_and_not_written(shared_run):
    src, dst, result = shared_run
    listed = [line for line in result.stdout.splitlines() if line.startswith("unreadable ")]
    assert len(listed) == len(UNREADABLE)
    for rel in UNREADABLE:
        assert any(str(src / rel) in line for line in listed), rel
        assert not (dst / rel).exists()
    assert any("above the limit of 1,100,000" in line for line in listed), listed


def test_help_of_the_tool_and_of_resize_show_examples(tmp_path):
    tool = vit_data(tmp_path, "--help")
    resize = vit_data(tmp_path, "resize", "--help")
    assert tool.returncode == 0 and resize.returncode == 0, tool.stderr + resize.stderr
    for text in (tool.stdout, resize.stdout):
        assert "examples:" in text and "vit-data resize photos/ photos_256/" in text
    assert "resize" in tool.stdout
    assert "--short-side" in resize.stdout and "default 90" in resize.stdout
    assert "LANCZOS" in resize.stdout


@pytest.mark.parametrize(
    "case, args, says",
    [
        ("missing SRC", ["nope", "out", "--short-side", N], "does not exist"),
        ("DST is SRC", ["photos", "photos", "--short-side", N], "DST is SRC"),
        ("DST inside SRC", ["photos", "photos/small", "--short-side", N], "inside SRC"),
        ("short side 0", ["photos", "out", "--short-side", 0], "--short-side must be"),
        pytest.param(
            "no images", ["empty", "out", "--short-side", N], "holds no image files",
            marks=pytest.mark.slow,
        ),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line_that_says_the_fix(tmp_path, case, args, says):
    photo(80, 80).save(tmp_path / "cat.jpg")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes((tmp_path / "cat.jpg").read_bytes())
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no image\n")
    result = vit_data(tmp_path, "resize", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vit-data: error: "), result.stderr
    assert says in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "photos" / "small").exists()


def interrupted_run(
    tmp_path: Path, start: Callable[..., subprocess.Popen], interrupt: str, *options: object
) -> tuple[Path, Path, int, str]:
    """Start `vit-data resize` on a folder of 1600x1200 JPEGs and send it SIGINT once a few
    outputs exist (`interrupt`: "process" for the main process alone, "group" for all of its
    processes, as Ctrl-C on a terminal does); returns SRC, DST, the image count and stderr.

    A run that finishes before the signal lands is no failure of vit-data: the next attempt
    has five times as many images (hard links to one file, so no space is taken)."""
    original = tmp_path / "original.jpg"
    photo(1600, 1200).save(original, quality=90)
    for count in (60, 300, 1500):
        src, dst = tmp_path / f"photos_{count}", tmp_path / f"out_{count}"
        for i in range(count):
            path = src / f"class_{i % 2}" / f"{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(original, path)
        # A short side of 400: libjpeg decodes at half size, tens of ms per image.
        proc = start(vit_data_command("resize", src, dst, "--short-side", 400, *options), tmp_path)
        while proc.poll() is None and len(outputs(dst)) < 3:
            time.sleep(0.01)
        if proc.poll() is None:
            if interrupt == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
        _, stderr = finish(proc)
        if proc.returncode == 130 and len(outputs(dst)) < count:
            return src, dst, count, stderr
        assert proc.returncode in (0, 130), stderr  # finished (nearly) before the signal
    pytest.fail("vit-data resized 1,500 images before SIGINT reached it")


@pytest.mark.slow
def test_interrupted_run_stops_cleanly_and_the_same_command_finishes_the_rest(tmp_path, start):
    src, dst, count, stderr = interrupted_run(tmp_path, start, "process", "--workers", 1)
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outputs(dst)}
    assert f"Interrupted after writing {len(first)} files" in stderr
    assert "Run the same command again" in stderr

    result = vit_data(tmp_path, "resize", src, dst, "--short-side", 400, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert len(outputs(dst)) == count
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first} == first
    assert (
        f"resized {count - len(first)}, copied 0, already there {len(first)}, unreadable 0; "
        "JPEG quality 90;"
    ) in result.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_worker_processes_with_every_written_file_whole(tmp_path, start):
    _, dst, _, stderr = interrupted_run(tmp_path, start, "group", "--workers", 2)
    assert "Traceback" not in stderr
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]
    written = outputs(dst)
    assert f"Interrupted after writing {len(written)} files" in stderr
    for path in written:
        with Image.open(path) as image:
            image.load()
            assert min(image.size) == 400
