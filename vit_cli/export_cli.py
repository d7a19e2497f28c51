"""`vit-export`: write a vit-train checkpoint's model as ONNX, TorchScript or a torch.export
program, checked against the eager model, with its preprocessing as JSON beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit_cli.cli import reported_errors

USAGE_EXAMPLES = """examples:
  vit-export best.pt                          # best.onnx + best.preprocessing.json
  vit-export best.pt --format exported        # best.pt2 (torch.export)
  vit-export best.pt --format torchscript     # best.torchscript.pt
  vit-export best.pt --ema --output serve/model.onnx

Every export is loaded back and run on batches of 1 and 7 random images against the PyTorch
model; a file whose logits differ by more than 1e-4 (ONNX) or 1e-5 (the others) is deleted
and the command fails. ONNX needs the export extra: pip install "vit-cli[export]".
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-export",
        description="Export a vit-train checkpoint for serving, with a dynamic batch "
        "dimension, and write its preprocessing (resize, crop, mean, std, classes) as JSON.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by vit-train")
    parser.add_argument(
        "--format", default="onnx", help="onnx (default), torchscript or exported (torch.export)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="the model file to write (default: beside the checkpoint, <stem>.onnx, "
        "<stem>.torchscript.pt or <stem>.pt2)",
    )
    parser.add_argument("--ema", action="store_true", help="export the weight average (EMA)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda or cuda:N: where a torchscript or exported program runs; "
        "ONNX files are exported on the CPU",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """`vit-export`: export a checkpoint; see `vit-export --help`."""
    args = parse_args(argv)
    with reported_errors(tool="vit-export"):
        from vit_cli.export import export_checkpoint

        result = export_checkpoint(args.checkpoint, args.format, args.output, args.ema, args.device)
        checked_with = {
            "onnx": "ONNX Runtime (CPU)",
            "torchscript": "torch.jit.load",
            "exported": "torch.export.load",
        }[result.format]
        batches = " and ".join(str(b) for b in result.batches)
        for path in result.files:
            print(f"wrote {path}")
        print(
            f"checked with {checked_with} on random batches of {batches} against the PyTorch "
            f"model: max |difference| {result.max_abs_diff:.2g} (tolerance {result.tolerance:.0e})"
        )
        print(f"wrote {result.preprocessing} (preprocessing, classes, input and output)")


if __name__ == "__main__":
    main()
