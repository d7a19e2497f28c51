"""Is the data loader fast enough? Loader img/s alone against the model's training img/s.

Builds the training loader exactly as `vit-train` does (`build_data`, with the config's
augmentation, batch size and workers) and times iterating it with no model; then times
training steps of the config's model on batches of the same shape (the training step of
benchmarks/throughput.py: forward, cross-entropy, backward, optimizer step). Both get
`--warmup` untimed batches or steps, then windows of each take turns (benchmarks/timing.py),
so a change in machine load hits both alike. Prints a table of the medians and the windows,
and the loader's img/s over the training step's (5x or more: not the bottleneck).

Without CIFAR on disk (`--synthetic`, the default), random uint8 images in the real CIFAR
batch format are written to a temporary folder and read through the real loader.

With `--folder`, an image folder's loaders against timm's instead (no model): ours as
vit-train builds them (`data.FileReader` per file, the batched collate step), timm's from
`timm.data.create_dataset` and `create_transform` with the same crop scale and ratio, flip,
bilinear interpolation and eval crop (0.875), no colour jitter, and default collation, both
over every file of the folder. Each loader keeps its workers; a window first takes the
batches its workers made while idle (2 per worker, not counted), then times
`--batches-per-window`; the next window waits until the workers have made the backlog
again. Images per second per worker, and ours over timm's (ratio of medians
and median of the paired per-round ratios), for each of `--workers`:

    python benchmarks/photo_folders.py /tmp/photos
    python benchmarks/loader.py --folder /tmp/photos/camera --workers 1 2

With `--shards` as well, the same folder's images from WebDataset shards (written from the
folder by `vit-data pack FOLDER SHARDS`) against the folder itself, both through vit-train's
loaders (data=webdataset and data=imagefolder), with the same workers:

    vit-data pack /tmp/photos/imagenet_size /tmp/photos/shards --shard-size 250 \
        data.val_fraction=0.1
    python benchmarks/loader.py --folder /tmp/photos/imagenet_size --shards /tmp/photos/shards

Examples:
    python benchmarks/loader.py                                  # experiment=vit_cifar10
    python benchmarks/loader.py experiment=vit_cifar10 data.augment.auto_augment=none
    python benchmarks/loader.py data=cifar10 data.root=~/data --no-synthetic
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch.utils.data import DataLoader
from torchvision import datasets

from vit_cli.composition import compose_train_config
from vit_cli.data import build_data
from vit_cli.host_memory import keep_freed_memory
from vit_cli.models import build_model
from vit_cli.optim import build_optimizer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import resolve_device

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import (
    Timed,
    describe_host,
    host,
    make_console,
    make_train_step,
    measure,
    ratios,
    rotated,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vit-train")
    parser.add_argument(
        "--synthetic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CIFAR-format random images in a temporary folder (default: on)",
    )
    parser.add_argument("--train-size", type=int, default=10_000, help="synthetic train images")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches or steps")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--batches-per-window", type=int, default=10, help="loader batches")
    parser.add_argument("--steps-per-window", type=int, default=3, help="training steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    folder = parser.add_argument_group("image folder against timm (--folder)")
    folder.add_argument("--folder", type=Path, help="a folder of class folders of images")
    folder.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    folder.add_argument("--img-size", type=int, default=224)
    folder.add_argument("--folder-batch", type=int, default=16, help="images per batch")
    folder.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0])
    folder.add_argument(
        "--shards", type=Path, help="vit-data pack's shards of --folder: shards against folder"
    )
    args = parser.parse_intermixed_args(argv)
    if not args.overrides:
        args.overrides = ["experiment=vit_cifar10"]
    return args


def write_synthetic_cifar(root: Path, name: str, train_size: int) -> None:
    """Random uint8 images as CIFAR batch files (5 train batches, 1 test batch) in `root`."""
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    classes = 10 if name == "cifar10" else 100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = max(train_size // len(cls.train_list), 1)
    for file_name, _ in cls.train_list + cls.test_list:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels" if name == "cifar10" else "fine_labels": (
                rng.integers(0, classes, per_batch).tolist()
            ),
        }
        (folder / file_name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {cls.meta["key"]: [f"class{i}" for i in range(classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))


def endless(loader, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        generator.manual_seed(epoch)  # as `fit` does at the start of every epoch
        yield from loader
        epoch += 1


def folder_overrides(args: argparse.Namespace, workers: int) -> list[str]:
    """The data settings both sides of a folder comparison share."""
    scale = args.crop_scale
    return [
        f"data.img_size={args.img_size}",
        "data.in_chans=3",
        f"data.batch_size={args.folder_batch}",
        f"data.num_workers={workers}",
        f"data.augment.crop_scale=[{scale[0]},{scale[1]}]",
        "data.augment.hflip=0.5",
        "data.augment.eval_crop_ratio=0.875",
    ]


def shard_loaders(args: argparse.Namespace, workers: int) -> dict[str, DataLoader]:
    """vit-train's train and eval loaders over the training images of `args.shards` and of
    `args.folder` (the same images; eval reads them too, so that an epoch is long enough
    for its start not to weigh: a val split of a few batches would time mostly that)."""
    from vit_cli.data import FileReader, ImageFiles
    from vit_cli.data._shared import Splits, loaders

    manifest = json.loads((args.shards / "manifest.json").read_text())
    files = "::".join(str(args.shards / s["file"]) for s in manifest["splits"]["train"]["shards"])
    common = folder_overrides(args, workers)
    shard_cfg = compose_train_config(
        ["data=webdataset", f"data.train_shards='{files}'", f"data.val_shards='{files}'", *common]
    )
    shards = build_data(shard_cfg.data, args.img_size, torch.Generator())
    split = [] if (args.folder / "val").is_dir() else ["data.val_fraction=0.1"]
    folder_cfg = compose_train_config(
        ["data=imagefolder", f"data.root={args.folder}", *common, *split]
    )
    train = build_data(folder_cfg.data, args.img_size, torch.Generator()).train_loader.dataset
    aug, pixels = folder_cfg.data.augment, folder_cfg.data.max_image_pixels
    as_eval = ImageFiles(
        train.samples, FileReader(args.img_size, 3, aug, False, pixels), train.skipped
    )
    folder = loaders(
        folder_cfg.data, Splits(train, as_eval, manifest["classes"]), args.img_size, torch.Generator()
    )  # fmt: skip
    return {
        "shards train": shards.train_loader,
        "folder train": folder.train_loader,
        "shards eval": shards.val_loader,
        "folder eval": folder.val_loader,
    }


def folder_loaders(args: argparse.Namespace, workers: int) -> dict[str, DataLoader]:
    """Ours and timm's train and eval loaders over every image of `args.folder`."""
    from timm.data import create_dataset, create_transform

    from vit_cli.data import FileReader, ImageFiles, SkipCounter
    from vit_cli.data._shared import Splits, loaders

    size, scale, ratio, crop_pct = args.img_size, tuple(args.crop_scale), (3 / 4, 4 / 3), 0.875
    cfg = compose_train_config(
        ["data=imagefolder", f"data.root={args.folder}", *folder_overrides(args, workers)]
    )
    samples = create_dataset("", root=str(args.folder)).reader.samples  # (path, label)
    pixels = cfg.data.max_image_pixels

    def ours(train: bool) -> ImageFiles:
        reader = FileReader(size, 3, cfg.data.augment, train, pixels, cfg.data.dct_scaling)
        return ImageFiles(samples, reader, SkipCounter())

    splits = Splits(
        ours(True), ours(False), [str(i) for i in range(1 + max(y for _, y in samples))]
    )
    ours_loaders = loaders(cfg.data, splits, size, torch.Generator())
    common = dict(batch_size=args.folder_batch, num_workers=workers, persistent_workers=True)

    def timm(train: bool) -> DataLoader:
        transform = create_transform(
            size, is_training=train, scale=scale, ratio=ratio, hflip=0.5, color_jitter=None,
            interpolation="bilinear", crop_pct=crop_pct,
        )  # fmt: skip
        dataset = create_dataset("", root=str(args.folder), transform=transform)
        return DataLoader(dataset, shuffle=train, drop_last=train, **common)

    return {
        "ours train": ours_loaders.train_loader,
        "timm train": timm(True),
        "ours eval": ours_loaders.val_loader,
        "timm eval": timm(False),
    }


def time_loaders(
    loaders: dict[str, DataLoader], workers: int, batches: int, windows: int
) -> dict[str, list[float]]:
    """Images per second per worker of each loader, one figure per window, rotating.

    A window starts with every worker idle: a loader's workers refill its backlog after its
    window (2 batches each), so the next window waits until they are done, or they would
    take cores from it.
    """
    streams = {name: endless(loader, torch.Generator()) for name, loader in loaders.items()}
    backlog = 2 * workers  # what the workers made while idle (prefetch_factor 2 each)
    refill = {}  # seconds a loader's workers take to refill its backlog
    for name, stream in streams.items():
        start = time.perf_counter()
        for _ in range(backlog + 1):  # start the workers, then let them fill the backlog
            next(stream)
        refill[name] = time.perf_counter() - start  # cold: more than a refill takes
        time.sleep(refill[name])
    rates: dict[str, list[float]] = {name: [] for name in streams}
    for round_ in range(windows):
        for name in rotated(list(streams), round_):
            start = time.perf_counter()
            images = 0
            for i in range(backlog + batches):
                batch = len(next(streams[name])[1])
                images += batch if i >= backlog else 0
            rate = images / (time.perf_counter() - start)
            rates[name].append(rate / workers)
            refill[name] = backlog * (images / batches) / rate
            time.sleep(1.5 * refill[name] + 0.2)
    return rates


def compare_folders(args: argparse.Namespace, console) -> int:
    """Ours against timm on `args.folder`, or, with `args.shards`, shards against folder."""
    a, b = ("shards", "folder") if args.shards else ("ours", "timm")
    make_loaders = shard_loaders if args.shards else folder_loaders
    where = f"{args.shards} against {args.folder}" if args.shards else str(args.folder)
    console.print(f"{describe_host(host(torch.device('cpu')))}; {where}")
    table = Table()
    for column in ("workers", "pipeline", f"{a} img/s/worker", f"{b} img/s/worker",
                   f"{a} / {b}", "paired ratios (median)"):  # fmt: skip
        table.add_column(column, justify="right")
    for workers in args.workers:
        rates = time_loaders(
            make_loaders(args, workers), workers, args.batches_per_window, args.windows
        )
        for pipeline in ("train", "eval"):
            first, second = rates[f"{a} {pipeline}"], rates[f"{b} {pipeline}"]
            paired = ratios(first, second)
            table.add_row(
                str(workers), pipeline, f"{statistics.median(first):.1f}",
                f"{statistics.median(second):.1f}", f"{paired['ratio_of_medians']:.2f}x",
                f"{paired['median_of_paired_ratios']:.2f}x",
            )  # fmt: skip
    console.print(
        f"{args.img_size} px, crop scale {args.crop_scale}, batch {args.folder_batch}; "
        f"medians of {args.windows} windows of {args.batches_per_window} batches"
    )
    console.print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # as vit-train does
    console = make_console()
    if args.folder is not None:
        return compare_folders(args, console)
    cfg = compose_train_config(args.overrides)
    device = resolve_device(args.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)
    img_size = cfg.model.img_size or cfg.data.img_size

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic and cfg.data.name in ("cifar10", "cifar100"):
            write_synthetic_cifar(Path(tmp), cfg.data.name, args.train_size)
            cfg.data.root, cfg.data.download = tmp, False
            source = f"synthetic CIFAR-format data ({args.train_size} random 32x32 images)"
        else:
            root = getattr(cfg.data, "root", None)  # digits and fake have none
            source = f"data={cfg.data.name}" + (f" from {root}" if root else "")
        generator = torch.Generator()
        data = build_data(cfg.data, img_size, generator)
        batches = endless(data.train_loader, generator)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, img_size, data.in_chans, data.num_classes).to(device)
        images, labels = next(batches)
        step = make_train_step(
            model,
            build_optimizer(cfg.optimizer, model),
            precision,
            images.to(device),
            labels.to(device),
        )
        model.train()
        # Every batch has the first one's size: full batches (drop_last), or the whole set.
        batch = len(labels)
        timings = measure(
            {
                "loader": Timed(lambda: next(batches), batch, args.batches_per_window),
                "training": Timed(step, batch, args.steps_per_window),
            },
            warmup=args.warmup,
            windows=args.windows,
            device=device,
        )

    aug = cfg.data.augment
    console.print(
        f"{describe_host(host(device))}; {source}\n"
        f"loader: batch {batch}, {cfg.data.num_workers} workers, shift {cfg.data.shift}, "
        f"hflip {aug.hflip}, auto_augment {aug.auto_augment}, erase {aug.erase_prob}; "
        f"model: {cfg.model.name} at {img_size} px, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"precision {precision.label}\n"
        f"medians of {args.windows} windows: loader {args.batches_per_window} batches, "
        f"training {args.steps_per_window} steps"
    )
    table = Table()
    for column in ("", "img/s (median)", "img/s of each window"):
        table.add_column(column, justify="right" if column == "img/s (median)" else "left")
    for name, timing in timings.items():
        windows = ", ".join(f"{v:.0f}" for v in timing.img_per_s)
        table.add_row(name, f"{timing.median:.1f}", windows)
    console.print(table)
    ratio = timings["loader"].median / timings["training"].median
    verdict = "(>= 5x: the loader is not the bottleneck)" if ratio >= 5 else "[red](below 5x)[/]"
    console.print(f"ratio: the loader is {ratio:.1f}x the training step {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
