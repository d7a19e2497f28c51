"""vit-predict's file-to-prediction throughput against the bare model's, in one process.

Writes N JPEG files (224 px by default) and a checkpoint of the configured model with
random weights, then times, after one untimed step of each, in rounds where the two take
turns (benchmarks/timing.py):
  bare:    eval-mode forward passes on ready-made normalised batches (`inference_mode`),
           the figure benchmarks/throughput.py reports as "infer img/s"; a window is
           as many batches as the files fill;
  predict: `predict_files`, the code vit-predict runs: read and decode each file, convert,
           resize and crop, normalise, forward, softmax top-k, one result per file; a
           window is one pass over all the files.
Both use the same batch size and precision. Prints a table of the medians, their ratio, and
the wall time of one real `vit-predict --json` run over the same files (process start
included).

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
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from rich.markup import escape
from rich.table import Table

from vit_cli.checkpoint import FORMAT_VERSION, save_checkpoint
from vit_cli.composition import compose_train_config
from vit_cli.host_memory import keep_freed_memory
from vit_cli.inference import expand_inputs, load_model, predict_files
from vit_cli.models import build_model
from vit_cli.precision import resolve_precision

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import Timed, describe_host, host, make_console, make_infer_step, measure, ratios


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
    console = make_console()
    cpu = torch.device("cpu")
    work = Path(tempfile.mkdtemp(prefix="vit_predict_bench_"))
    try:
        t0 = time.perf_counter()
        write_images(work / "images", args.images, args.size)
        img_size = write_checkpoint(work / "model.pt", args.overrides, args.num_classes)
        console.print(
            f"wrote {args.images} JPEGs of {args.size} px in {time.perf_counter() - t0:.1f} s"
        )

        loaded = load_model(work / "model.pt")
        precision = resolve_precision(args.precision, cpu)
        paths = expand_inputs([str(work / "images")])
        ready = torch.randn(args.batch_size, loaded.transform.in_chans, img_size, img_size)

        def predict() -> None:
            results = list(
                predict_files(loaded, paths, 5, precision, args.batch_size, args.workers)
            )
            assert len(results) == args.images and all(r.error is None for r in results)

        def report_round(round_: int, timings: dict) -> None:
            console.print(
                f"round {round_ + 1}: bare {timings['bare'].img_per_s[-1]:.1f} img/s, "
                f"predict {timings['predict'].img_per_s[-1]:.1f} img/s"
            )

        batches = math.ceil(args.images / args.batch_size)
        timings = measure(
            {
                "bare": Timed(
                    make_infer_step(loaded.model, precision, ready), args.batch_size, batches
                ),
                "predict": Timed(predict, args.images),
            },
            warmup=1,
            windows=args.rounds,
            device=cpu,
            after_round=report_round,
        )
        model = escape(" ".join(args.overrides) or "vit_tiny")
        console.print(
            f"{describe_host(host(cpu))}; {args.images} images of {args.size} px, model {model} "
            f"at {img_size} px, batch {args.batch_size}, {args.precision}, "
            f"{args.workers} loader worker(s), malloc {'freed memory kept' if kept else 'defaults'}"
        )
        table = Table(caption=f"medians of {args.rounds} rounds")
        for column in ("path", "img/s"):
            table.add_column(column, justify="left" if column == "path" else "right")
        table.add_row("bare model", f"{timings['bare'].median:.1f}")
        table.add_row("predict_files", f"{timings['predict'].median:.1f}")
        console.print(table)
        ratio = ratios(timings["predict"].img_per_s, timings["bare"].img_per_s)
        console.print(
            f"ratio: {ratio['ratio_of_medians']:.3f} (of medians); "
            f"{ratio['median_of_paired_ratios']:.3f} (median of paired rounds)"
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
            console.print(
                f"vit-predict --json (a new process, torch import and model load included): "
                f"{lines} lines in {wall:.1f} s = {lines / wall:.1f} img/s, exit {done.returncode}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
