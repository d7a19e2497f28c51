"""vit-predict's file-to-prediction throughput against the bare model's, in one process.

Writes N JPEG files (224 px by default) and a checkpoint of the configured model with
random weights, then times, in alternating rounds:
  bare:    eval-mode forward passes on ready-made normalised batches (`inference_mode`),
           the figure benchmarks/throughput.py reports as "infer img/s";
  predict: `predict_files`, the code vit-predict runs: read and decode each file, convert,
           resize and crop, normalise, forward, softmax top-k, one result per file.
Both use the same batch size and precision. Prints the medians and their ratio, and the
wall time of one real `vit-predict --json` run over the same files (process start included).

Examples:
    python benchmarks/predict.py
    python benchmarks/predict.py model=vit_tiny --images 1000 --batch-size 32 --workers 1

Like the vit_cli commands, it keeps freed memory in the process (vit_cli/host_memory.py),
unless --malloc-defaults; the real vit-predict run always does.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from vit_cli.checkpoint import FORMAT_VERSION, save_checkpoint
from vit_cli.config import compose_train_config
from vit_cli.host_memory import keep_freed_memory
from vit_cli.inference import expand_inputs, load_model, predict_files
from vit_cli.models import build_model
from vit_cli.precision import resolve_precision


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", default=[], help="Hydra overrides (model=...)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224, help="side of the JPEG files")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="vit-predict's --workers (default 0, as there on the CPU)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-cli", action="store_true", help="skip the real vit-predict run")
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc at its defaults in this process (vit-predict keeps freed "
        "memory; vit_cli/host_memory.py)",
    )
    return parser.parse_args(argv)


def write_images(folder: Path, n: int, size: int) -> None:
    """Photo-like JPEGs: smooth colour fields plus grain, quality 90."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        grain = rng.normal(0, 8, (size, size, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def write_checkpoint(path: Path, overrides: list[str], num_classes: int) -> int:
    """A checkpoint as vit-train writes it, with the model's random initial weights."""
    cfg = compose_train_config(["model=vit_tiny", "data=fake", *overrides])
    img_size = cfg.model.img_size or cfg.data.img_size
    model = build_model(cfg.model, img_size, cfg.data.in_chans, num_classes)
    save_checkpoint(
        {
            "format_version": FORMAT_VERSION,
            "model": model.state_dict(),
            "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            "data": {
                "class_names": [f"class_{k}" for k in range(num_classes)],
                "num_classes": num_classes,
                "in_chans": cfg.data.in_chans,
                "img_size": img_size,
                "mean": list(cfg.data.mean),
                "std": list(cfg.data.std),
            },
            "metrics": {},
            "state": {},
        },
        path,
    )
    return img_size


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kept = False if args.malloc_defaults else keep_freed_memory()
    work = Path(tempfile.mkdtemp(prefix="vit_predict_bench_"))
    try:
        t0 = time.perf_counter()
        write_images(work / "images", args.images, args.size)
        img_size = write_checkpoint(work / "model.pt", args.overrides, args.num_classes)
        print(f"wrote {args.images} JPEGs of {args.size} px in {time.perf_counter() - t0:.1f} s")

        loaded = load_model(work / "model.pt")
        model = loaded.model
        precision = resolve_precision(args.precision, torch.device("cpu"))
        paths = expand_inputs([str(work / "images")])
        batches = math.ceil(args.images / args.batch_size)
        ready = torch.randn(args.batch_size, loaded.transform.in_chans, img_size, img_size)

        def bare() -> float:
            start = time.perf_counter()
            with torch.inference_mode(), precision.autocast():
                for _ in range(batches):
                    model(ready)
            return batches * args.batch_size / (time.perf_counter() - start)

        def predict() -> float:
            start = time.perf_counter()
            results = list(
                predict_files(loaded, paths, 5, precision, args.batch_size, args.workers)
            )
            assert len(results) == args.images and all(r.error is None for r in results)
            return len(results) / (time.perf_counter() - start)

        with torch.inference_mode():
            model(ready)  # warm-up
        figures: dict[str, list[float]] = {"bare": [], "predict": []}
        for r in range(args.rounds):
            order = ("bare", "predict") if r % 2 == 0 else ("predict", "bare")
            for name in order:
                figures[name].append(bare() if name == "bare" else predict())
            print(
                f"round {r + 1}: bare {figures['bare'][-1]:.1f} img/s, "
                f"predict {figures['predict'][-1]:.1f} img/s"
            )
        paired = [p / b for p, b in zip(figures["predict"], figures["bare"], strict=True)]
        bare_median = statistics.median(figures["bare"])
        predict_median = statistics.median(figures["predict"])
        print(
            f"{args.images} images of {args.size} px, model {args.overrides or 'vit_tiny'} at "
            f"{img_size} px, batch {args.batch_size}, {args.precision}, "
            f"{torch.get_num_threads()} torch threads, {args.workers} loader worker(s), "
            f"malloc {'freed memory kept' if kept else 'defaults'}"
        )
        print(f"bare model: {bare_median:.1f} img/s (median of {args.rounds})")
        print(f"predict_files: {predict_median:.1f} img/s (median of {args.rounds})")
        print(
            f"ratio: {predict_median / bare_median:.3f} (of medians); "
            f"{statistics.median(paired):.3f} (median of paired rounds)"
        )
        if not args.no_cli:
            vit_predict = shutil.which("vit-predict") or "vit-predict"
            command = [vit_predict, str(work / "model.pt"), str(work / "images"), "--json"]
            command += ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
            command += ["--precision", args.precision, "--device", "cpu"]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            lines = len(done.stdout.splitlines())
            print(
                f"vit-predict --json (a new process, torch import and model load included): "
                f"{lines} lines in {wall:.1f} s = {lines / wall:.1f} img/s, exit {done.returncode}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
