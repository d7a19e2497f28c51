"""`vit-predict`: classify image files with a vit-train checkpoint.

Writes nothing but its output: a table, or JSON lines (`--json`) for scripts. A file that
cannot be read gets its own error line and the exit status 1; the others are classified.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vit_cli.cli import add_model_options, reported_errors
from vit_cli.config import MAX_COUNT
from vit_cli.host_memory import choose_freed_memory

USAGE_EXAMPLES = """examples:
  vit-predict best.pt digit.png
  vit-predict best.pt photos/ --topk 3
  vit-predict best.pt 'photos/**/*.jpg' --json > predictions.jsonl
  vit-predict best.pt photo.jpg --attention maps/

Inputs are image files, folders (their image files, recursively) or glob patterns (quote
them so that the shell leaves them to vit-predict). Images are converted, resized and
cropped as at eval time.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-predict",
        description="Classify image files with a vit-train checkpoint: top-k classes and "
        "their probabilities.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by vit-train")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument(
        "--attention",
        type=Path,
        metavar="OUT",
        help="also write each image's attention maps as a PNG into folder OUT (ViT and DeiT: "
        "attention rollout and the last block's heads; Swin: Grad-CAM)",
    )
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (32)")
    parser.add_argument(
        "--workers",
        type=int,
        help="processes that read images while the model runs (default: none on the CPU, "
        "where reading between batches is fastest; up to 4 on a GPU)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="refuse image files with more pixels, before decoding them (default: the "
        "training run's data.max_image_pixels, 67,108,864)",
    )
    args = parser.parse_args(argv)
    limits = {
        "topk": (1, MAX_COUNT),
        "batch_size": (1, MAX_COUNT),
        "workers": (0, MAX_COUNT),
        "max_pixels": (1, None),
    }
    for name, (low, high) in limits.items():
        value = getattr(args, name)
        if value is not None and (value < low or (high is not None and value > high)):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            parser.error(f"--{name.replace('_', '-')} must be {bounds}")
    return args


def run(args: argparse.Namespace) -> int:
    """Classify the inputs and print the results; returns the exit status."""
    from rich.table import Table

    from vit_cli.console import console_for
    from vit_cli.inference import (
        LoadedModel,
        eval_transform_of,
        expand_inputs,
        predict_files,
        read_for_inference,
        trained_precision,
    )
    from vit_cli.models.factory import model_from_checkpoint
    from vit_cli.runtime import resolve_device

    paths = expand_inputs(args.inputs)
    ckpt = read_for_inference(args.checkpoint)
    device = resolve_device(args.device)
    choose_freed_memory(args.keep_freed_memory, device.type)
    precision = trained_precision(ckpt, device, args.precision)
    model = model_from_checkpoint(ckpt, args.checkpoint, args.ema).to(device)
    loaded = LoadedModel(model, eval_transform_of(ckpt), list(ckpt["data"]["class_names"]))
    if args.max_pixels is not None:
        loaded.transform.max_pixels = args.max_pixels
    pictures = (
        write_attention(loaded, paths, args.attention, args.batch_size) if args.attention else {}
    )
    results = predict_files(loaded, paths, args.topk, precision, args.batch_size, args.workers)

    failed = 0
    stderr = console_for(sys.stderr)
    if args.json:
        for result in results:
            line = {"path": str(result.path)}
            if result.error is None:
                line["predictions"] = [p._asdict() for p in result.predictions]
                if result.path in pictures:
                    line["attention"] = str(pictures[result.path])
            else:
                line["error"] = result.error
                failed += 1
            print(json.dumps(line), flush=True)
    else:
        table = Table(title=f"vit-predict {args.checkpoint} ({len(paths)} images)")
        table.add_column("file", overflow="fold")
        table.add_column("class")
        table.add_column("prob", justify="right")
        table.add_column(f"top-{args.topk}" if args.topk > 1 else "", overflow="fold")
        for result in results:
            if result.error is not None:
                stderr.print(f"[red]error[/red] {result.path}: {result.error}", highlight=False)
                failed += 1
                continue
            best, *rest = result.predictions
            others = ", ".join(f"{p.label} {p.prob:.1%}" for p in rest)
            table.add_row(str(result.path), best.label, f"{best.prob:.1%}", others)
        if table.rows:
            console_for(sys.stdout).print(table)
    if failed:
        stderr.print(f"{failed} of {len(paths)} files could not be read.", highlight=False)
    if pictures and not args.json:
        stderr.print(
            f"Attention maps of {len(pictures)} images in {args.attention}/", highlight=False
        )
    return 1 if failed else 0


def write_attention(loaded, paths: list[Path], out: Path, batch_size: int) -> dict[Path, Path]:
    """Each readable image's attention maps as `OUT/<file stem>.png`; returns the PNG of
    each image file. Files of the same stem from different folders get `_2`, `_3`..."""
    from vit_cli.figures import save_png
    from vit_cli.inference import attention_pictures

    out.mkdir(parents=True, exist_ok=True)
    written: dict[Path, Path] = {}
    taken: set[str] = set()
    for path, picture in attention_pictures(loaded, paths, batch_size):
        name, n = path.stem, 1
        while name in taken:
            n += 1
            name = f"{path.stem}_{n}"
        taken.add(name)
        written[path] = out / f"{name}.png"
        save_png(picture, written[path])
    return written


def main(argv: list[str] | None = None) -> None:
    """`vit-predict`: classify image files; see `vit-predict --help`."""
    args = parse_args(argv)
    with reported_errors(tool="vit-predict"):
        try:
            status = run(args)
        except BrokenPipeError:
            # The reader (e.g. `head`) closed stdout: stop quietly, as Unix tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            status = 1
    sys.exit(status)


if __name__ == "__main__":
    main()
