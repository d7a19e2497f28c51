"""`vit-data`: prepare data for training, once, before the runs that read it.

`vit-data resize` writes a copy of an image folder whose images are at most N pixels on
their short side, so that each epoch decodes small files instead of camera photos.
`vit-data pack` writes any data source's splits as WebDataset tar shards (vit_cli/pack.py),
which data=webdataset streams without a file per image.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps

from vit_cli.cli import reported_errors
from vit_cli.config import DataConfig
from vit_cli.console import on_terminal
from vit_cli.data._decode import (
    UNREADABLE,
    check_pixels,
    exif_orientation,
    is_jpeg,
    upright_size,
)
from vit_cli.errors import UserError

USAGE_EXAMPLES = """examples:
  vit-data resize photos/ photos_256/ --short-side 256
  vit-data resize photos/ photos_256/ --short-side 256 --quality 95 --workers 8
  vit-data pack photos_256/ shards/
  vit-data pack digits digits_shards/ --shard-size 500

Then train on the copy: vit-train data=imagefolder data.root=photos_256 ...
or on the shards, with the vit-train command that `vit-data pack` prints at its end.
Run `vit-data COMMAND --help` for the options of a command.
"""

RESIZE_EXAMPLES = """examples:
  vit-data resize photos/ photos_256/ --short-side 256
  vit-data resize photos/ photos_256/ --short-side 256 --quality 95 --workers 8

SRC is read as vit-train's data=imagefolder reads it: class folders, or train/ and val/
holding them, at any depth. Image files are found by extension (torchvision's
IMG_EXTENSIONS, any case); other files are left out and counted. Each image is turned
upright by its EXIF orientation and, where its short side is longer than N, resized with
Pillow's LANCZOS filter (after a reduced-size JPEG decode) so that its short side is N.
JPEGs are written as JPEG at --quality; PNG, BMP, TIFF, ... in their own format (WEBP at
--quality too). Images that need neither are copied unchanged. DST keeps SRC's folders and
file names.

Unreadable files (corrupt, truncated, not an image, or more than --max-pixels pixels) are
skipped and listed at the end. A file already in DST is left as it is: after Ctrl-C (exit
status 130), run the same command again to continue where it stopped.
"""

PACK_EXAMPLES = """examples:
  vit-data pack photos/ shards/
  vit-data pack imagefolder shards/ --shard-size 1000 data.root=~/photos data.val_fraction=0.1
  vit-data pack digits digits_shards/ --shard-size 500
  vit-data pack cifar10 cifar_shards/ data.root=~/datasets

SRC is the name of a data config (as vit-train's data=NAME), followed by any data.KEY=VALUE
overrides, or an image folder (data=imagefolder with data.root=SRC; write ./NAME for a
folder that has a config's name). The data is read as vit-train reads it, downloads
included. OUT gets train-000000.tar, train-000001.tar, ..., val-000000.tar, ... (and
test-... where the data has a test split apart from val), N samples to a shard in the
split's order, each sample under its index in the split (00000000.png, 00000000.cls):
images held in memory as PNG, image files byte for byte under their format's extension
(jpg, png, webp, ...), the class number as text. Image files that PIL cannot open are
skipped and listed at the end.
Last comes OUT/manifest.json: the classes, the normalisation, and each shard's samples,
size and MD5, which data=webdataset reads.

The same command writes the same shards: after Ctrl-C (exit status 130), run it again to
continue, and the shards already written are kept. An OUT written with other settings is
refused.
"""

# reduce() by an integer factor first, then LANCZOS over the last factor of 3 or less:
# Pillow documents this as indistinguishable from LANCZOS over the whole range, and it is
# several times faster on big PNGs, which have no reduced-size decode as JPEGs do.
REDUCING_GAP = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-data",
        description="Prepare data for vit-train, once, before the training runs.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    resize = commands.add_parser(
        "resize",
        help="copy an image folder with each image's short side at most N pixels",
        description="Copy image folder SRC into DST with each image upright and at most N "
        "pixels on its short side, so that training decodes small files.",
        epilog=RESIZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resize.add_argument("src", type=Path, metavar="SRC", help="the image folder to read")
    resize.add_argument(
        "dst", type=Path, metavar="DST", help="the folder to write (created; outside SRC)"
    )
    resize.add_argument(
        "--short-side",
        type=int,
        required=True,
        metavar="N",
        help="the short side of the written images in pixels; smaller images are copied "
        "(256 suits data.img_size=224, whose eval resize is to 224 / 0.875 = 256)",
    )
    resize.add_argument(
        "--quality",
        type=int,
        default=90,
        metavar="Q",
        help="JPEG and WEBP quality of the re-encoded images, from 1 to 100 (default 90)",
    )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    resize.add_argument(
        "--workers",
        type=int,
        default=cpus,
        metavar="K",
        help="processes that resize images; 1 resizes in this one (default: the CPUs this "
        f"process may use, {cpus} here)",
    )
    resize.add_argument(
        "--max-pixels",
        type=int,
        default=DataConfig.max_image_pixels,
        metavar="P",
        help="skip image files with more pixels as unreadable, before decoding them "
        f"(default {DataConfig.max_image_pixels:,}, vit-train's data.max_image_pixels)",
    )
    resize.set_defaults(run=resize_folder)
    pack = commands.add_parser(
        "pack",
        help="write a data source's splits as WebDataset tar shards, with a manifest",
        description="Write the train and val splits (and test, where there is one) of data "
        "source SRC into folder OUT as WebDataset tar shards, for vit-train data=webdataset.",
        epilog=PACK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pack.add_argument(
        "src", metavar="SRC", help="a data config (digits, cifar10, ...) or an image folder"
    )
    pack.add_argument("out", type=Path, metavar="OUT", help="the folder to write (created)")
    pack.add_argument(
        "overrides", nargs="*", metavar="data.KEY=VALUE", help="overrides of the data config"
    )
    pack.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        metavar="N",
        help="samples in each shard, the last of a split holding the rest (default 1000)",
    )
    pack.set_defaults(run=pack_source)
    # Overrides after --shard-size are left over by argparse, which does not take the
    # positional arguments of one command on both sides of an option.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "pack" or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    return args


class Job(NamedTuple):
    """One image file to write: `src` into `dst`."""

    src: Path
    dst: Path
    short_side: int
    quality: int
    max_pixels: int


class Outcome(NamedTuple):
    """What became of a Job's file: "resized", "copied" or "unreadable" (with the reason)."""

    job: Job
    kind: str
    reason: str = ""


def resize_folder(args: argparse.Namespace) -> int:
    """Write SRC's images into DST, resized where larger; returns the exit status."""
    src, dst = checked_folders(args)
    from torchvision.datasets.folder import IMG_EXTENSIONS

    images, others = [], 0
    for path in sorted(src.rglob("*")):
        if path.is_file():
            if path.suffix.lower() in IMG_EXTENSIONS:
                images.append(path.relative_to(src))
            else:
                others += 1
    if not images:
        raise UserError(
            f"{src} holds no image files (looked for {', '.join(IMG_EXTENSIONS)}, in any "
            "case): give the folder that holds the class folders."
        )
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise UserError(f"Cannot create {dst} ({e.strerror}): choose another DST.") from e

    todo = [rel for rel in images if not (dst / rel).exists()]
    jobs = [
        Job(src / rel, dst / rel, args.short_side, args.quality, args.max_pixels) for rel in todo
    ]
    counts = {"resized": 0, "copied": 0}
    unreadable: list[Outcome] = []
    with stop_on_first_sigint() as stop, progress_bar("resize", len(jobs)) as advance:
        for outcome in resized(jobs, args.workers, stop):
            if outcome.kind == "unreadable":
                unreadable.append(outcome)
            else:
                counts[outcome.kind] += 1
            advance()
    if stop.is_set():
        written = counts["resized"] + counts["copied"]
        print(
            f"vit-data: Interrupted after writing {written} files into {dst} (resized "
            f"{counts['resized']}, copied {counts['copied']}). Run the same command again to "
            "continue: the files written are kept.",
            file=sys.stderr,
            flush=True,
        )
        return 130

    for outcome in unreadable:
        print(f"unreadable {outcome.job.src}: {outcome.reason}")
    listed = " (listed above)" if unreadable else ""
    not_images = f", not images {others} (left out)" if others else ""
    print(
        f"resized {counts['resized']}, copied {counts['copied']}, "
        f"already there {len(images) - len(todo)}, "
        f"unreadable {len(unreadable)}{listed}{not_images}; JPEG quality {args.quality}; "
        f"wrote {dst}",
        flush=True,
    )
    return 0


def pack_source(args: argparse.Namespace) -> int:
    """Write SRC's splits into OUT as shards, then the manifest; returns the exit status."""
    from vit_cli import pack

    packing = pack.open_packing(args.src, args.out, args.overrides, args.shard_size)
    kept = len(packing.written)
    samples = sum(len(shard.indices) for shard in packing.todo())
    with stop_on_first_sigint() as stop, progress_bar("pack", samples) as advance:
        pack.write_shards(packing, stop, advance)
    if packing.todo():
        print(
            f"vit-data: Interrupted with {len(packing.written)} of {len(packing.shards)} "
            f"shards written into {packing.out}. Run the same command again to continue: "
            "the shards written are kept.",
            file=sys.stderr,
            flush=True,
        )
        return 130
    pack.write_manifest(packing)
    print(pack.summary(packing, kept), flush=True)
    return 0


def checked_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """SRC and DST, made absolute, after the checks of the arguments that need no file read."""
    for name, low, high in (
        ("short_side", 1, None),
        ("quality", 1, 100),
        ("workers", 1, None),
        ("max_pixels", 1, None),
    ):
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise UserError(f"--{name.replace('_', '-')} must be {bounds}, not {value}.")
    src, dst = args.src.resolve(), args.dst.resolve()
    if not src.exists():
        raise UserError(f"SRC {args.src} does not exist: give the image folder to resize.")
    if not src.is_dir():
        raise UserError(f"SRC {args.src} is a file: give the folder that holds the images.")
    suggestion = src.with_name(f"{src.name}_{args.short_side}")
    if dst == src:
        raise UserError(
            f"DST is SRC ({args.src}): write the resized images into another folder, e.g. "
            f"{suggestion}."
        )
    if dst.is_relative_to(src):
        raise UserError(
            f"DST {args.dst} is inside SRC {args.src}, where its images would be read as "
            f"SRC's: choose a folder outside it, e.g. {suggestion}."
        )
    return src, dst


@contextlib.contextmanager
def stop_on_first_sigint() -> Iterator[threading.Event]:
    """Ctrl-C sets the returned event, so that the files being written are finished and no
    new one is started; a second Ctrl-C interrupts at once (KeyboardInterrupt)."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar titled `label` on a terminal (stderr, so that stdout can go to a
    log); elsewhere nothing. Yields the function that counts one item done."""
    if not on_terminal(sys.stderr):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


def resized(jobs: list[Job], workers: int, stop: threading.Event) -> Iterator[Outcome]:
    """Each job's outcome, in the order they finish, until `stop` is set: then the files in
    progress are finished (and yielded) and the others are not started."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        use_own_pixel_limit()
        for job in jobs:
            if stop.is_set():
                return
            yield resize_file(job)
        return
    # forkserver: workers start from a fresh process, not a fork of this one, which holds
    # torch (imported with torchvision) and the progress bar's thread.
    pool = ProcessPoolExecutor(workers, get_context("forkserver"), initializer=init_worker)
    pending = iter(jobs)
    in_flight = set()

    def submit_next() -> None:
        job = next(pending, None)
        if job is not None and not stop.is_set():
            in_flight.add(pool.submit(resize_file, job))

    try:
        # Two jobs a worker: none waits for the next, and a stop leaves little to finish.
        for _ in range(2 * workers):
            submit_next()
        while in_flight:
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                in_flight.remove(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    # Ctrl-C reached a worker before it set SIGINT aside (it was starting):
                    # the stop was asked for, and every file written is whole.
                    if stop.is_set():
                        return
                    raise
                yield outcome
                submit_next()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def init_worker() -> None:
    # Ctrl-C on a terminal reaches every process of the command: the main one decides to
    # stop, and the workers finish the file they are writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    use_own_pixel_limit()


def use_own_pixel_limit() -> None:
    # --max-pixels is checked before decoding; Pillow's own limit (89 million pixels for a
    # warning, twice that for an error) would overrule a larger one.
    Image.MAX_IMAGE_PIXELS = None


def resize_file(job: Job) -> Outcome:
    """Write one image file into its place in DST: resized or turned upright, or copied
    where it needs neither. An unreadable file is reported, and nothing is written."""
    try:
        image, options = upright_and_resized(job)
    except UNREADABLE as e:
        return Outcome(job, "unreadable", str(e) or type(e).__name__)
    except Exception as e:  # Pillow on a malformed file: struct.error, IndexError, ...
        return Outcome(job, "unreadable", f"{type(e).__name__}: {e}")
    job.dst.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
        write_atomically(job.dst, lambda tmp: shutil.copyfile(job.src, tmp))
        return Outcome(job, "copied")
    write_atomically(job.dst, lambda tmp: image.save(tmp, **options))
    return Outcome(job, "resized")


def upright_and_resized(job: Job) -> tuple[Image.Image | None, dict]:
    """The image upright (EXIF orientation), with its short side at most `job.short_side`,
    and the options to save it with; None for the image where the file can be copied as it
    is. Decodes the whole file either way, so that a truncated one is found here."""
    n = job.short_side
    with Image.open(job.src) as image:
        check_pixels(image, job.max_pixels, "--max-pixels")
        width, height = image.size
        fmt = "JPEG" if is_jpeg(image) else image.format
        orientation = exif_orientation(image)
        turns = orientation != 1
        shrinks = min(width, height) > n
        if fmt == "JPEG" and shrinks:
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale, no smaller than the size asked for.
            image.draft(image.mode, short_side_size(image.size, n))
        image.load()
        if shrinks and min(image.size) < n:
            raise RuntimeError(f"{job.src}: decoded at {image.size}, below the short side {n}")
        if not (turns or shrinks):
            return None, {}
        icc = image.info.get("icc_profile")
        image = ImageOps.exif_transpose(image)
    if shrinks:
        if image.mode in ("1", "P", "PA"):
            # Pillow resizes these with NEAREST only; grey or colour values average well.
            alpha = image.mode == "PA" or "transparency" in image.info
            image = image.convert("L" if image.mode == "1" else "RGBA" if alpha else "RGB")
        size = short_side_size(upright_size((width, height), orientation), n)
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    if fmt == "JPEG" and image.mode == "CMYK":
        # Its ICC profile is a CMYK one; vit-train reads RGB anyway.
        image, icc = image.convert("RGB"), None
    options = {"format": fmt}
    if icc:
        options["icc_profile"] = icc
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = job.quality
    if fmt == "TIFF":
        # Whatever the input's compression was: group 4 needs 1-bit pixels, JPEG 8-bit.
        options["compression"] = "tiff_lzw"
    return image, options


def short_side_size(size: tuple[int, int], n: int) -> tuple[int, int]:
    """`size` scaled so that its short side is `n`, keeping the aspect ratio."""
    width, height = size
    if width <= height:
        return n, max(1, round(height * n / width))
    return max(1, round(width * n / height)), n


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through a hidden temporary file beside it, renamed when complete, so
    that a file in DST is whole: a resumed run trusts every file it finds there."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """`vit-data`: prepare data for training; see `vit-data --help`."""
    args = parse_args(argv)
    with reported_errors(tool="vit-data"):
        status = args.run(args)
    sys.exit(status)


if __name__ == "__main__":
    main()
