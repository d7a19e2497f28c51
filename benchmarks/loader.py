"""Is the data loader fast enough? Loader img/s alone against the model's training img/s.

Builds the training loader exactly as `vit-train` does (`build_data`, with the config's
augmentation, batch size and workers) and times iterating it with no model; then times
training steps of the config's model on batches of the same shape (the training step of
benchmarks/throughput.py: forward, cross-entropy, backward, optimizer step). Windows of
each take turns, so a change in machine load hits both alike; figures are medians.

Without CIFAR on disk (`--synthetic`, the default), random uint8 images in the real CIFAR
batch format are written to a temporary folder and read through the real loader.

Examples:
    python benchmarks/loader.py                                  # experiment=vit_cifar10
    python benchmarks/loader.py experiment=vit_cifar10 data.augment.auto_augment=none
    python benchmarks/loader.py data=cifar10 data.root=~/data --no-synthetic
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torchvision import datasets

from vit_cli.config import compose_train_config
from vit_cli.data import build_data
from vit_cli.host_memory import keep_freed_memory
from vit_cli.models import build_model
from vit_cli.optim import build_optimizer
from vit_cli.precision import resolve_precision


def _load_throughput():
    """benchmarks/throughput.py, for its config, device and training-step helpers."""
    path = Path(__file__).with_name("throughput.py")
    spec = importlib.util.spec_from_file_location("throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


throughput = _load_throughput()


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # as vit-train does
    console = Console(width=None if sys.stdout.isatty() else 120)
    cfg = compose_train_config(args.overrides)
    device = throughput.resolve_device(args.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)
    img_size = cfg.model.img_size or cfg.data.img_size

    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic and cfg.data.name in ("cifar10", "cifar100"):
            write_synthetic_cifar(Path(tmp), cfg.data.name, args.train_size)
            cfg.data.root, cfg.data.download = tmp, False
            source = f"synthetic CIFAR-format data ({args.train_size} random 32x32 images)"
        else:
            source = f"data={cfg.data.name} from {cfg.data.root}"
        generator = torch.Generator()
        data = build_data(cfg.data, img_size, generator)
        batches = endless(data.train_loader, generator)

        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, img_size, data.in_chans, data.num_classes).to(device)
        images, labels = next(batches)
        step = throughput.make_train_step(
            model,
            build_optimizer(cfg.optimizer, model),
            precision,
            images.to(device),
            labels.to(device),
        )
        model.train()

        def loader_window(n: int) -> float:
            start = time.perf_counter()
            seen = sum(len(next(batches)[1]) for _ in range(n))
            return seen / (time.perf_counter() - start)

        batch = cfg.data.batch_size
        loader_window(args.warmup)
        for _ in range(args.warmup):
            step()
        loader_ips, train_ips = [], []
        for _ in range(args.windows):
            loader_ips.append(loader_window(args.batches_per_window))
            seconds, _ = throughput.time_window(step, args.steps_per_window, device)
            train_ips.append(args.steps_per_window * batch / seconds)

    loader_median, train_median = statistics.median(loader_ips), statistics.median(train_ips)
    aug = cfg.data.augment
    console.print(
        f"{throughput.device_name(device)} ({device.type}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {source}\n"
        f"loader: batch {batch}, {cfg.data.num_workers} workers, shift {cfg.data.shift}, "
        f"hflip {aug.hflip}, auto_augment {aug.auto_augment}, erase {aug.erase_prob}; "
        f"model: {cfg.model.name} at {img_size} px, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"precision {precision.name}\n"
        f"medians of {args.windows} windows: loader {args.batches_per_window} batches, "
        f"training {args.steps_per_window} steps"
    )
    ratio = loader_median / train_median
    console.print(f"loader   img/s: {loader_median:10.1f}  (windows {_fmt(loader_ips)})")
    console.print(f"training img/s: {train_median:10.1f}  (windows {_fmt(train_ips)})")
    console.print(
        f"ratio: the loader is {ratio:.1f}x the training step "
        + ("(>= 5x: the loader is not the bottleneck)" if ratio >= 5 else "[red](below 5x)[/]")
    )
    return 0


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
