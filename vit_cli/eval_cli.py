"""`vit-eval`: score a vit-train checkpoint on the val (or test) split of its data, or of
other data.

The model, its eval transform and the val loader are rebuilt from the config stored in the
checkpoint, and scored by `evaluate`, the same function vit-train logs `val/acc1` with.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from importlib.resources import files
from pathlib import Path

from vit_cli.cli import add_model_options, reported_errors
from vit_cli.errors import UserError
from vit_cli.host_memory import choose_freed_memory

USAGE_EXAMPLES = """examples:
  vit-eval outputs/2026-11-24/10-00-00/best.pt
  vit-eval best.pt --ema
  vit-eval last.pt --split test      # once, after tuning on a held-out val split
  vit-eval best.pt data=imagefolder data.root=~/data/flowers --out eval_flowers

Overrides change the data to score: data=NAME picks another data config (configs/data/), and
data.KEY=VALUE sets one of its values. The model's input (channels, normalisation, crop
ratio, class count) always comes from the checkpoint.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vit-eval",
        description="Score a vit-train checkpoint: top-1, top-5, loss, per-class accuracy, "
        "a confusion matrix (PNG) and per-image predictions (CSV).",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by vit-train (best.pt, last.pt)")
    parser.add_argument("overrides", nargs="*", help="data=NAME and data.KEY=VALUE")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: eval_<name> beside the checkpoint)"
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val (default): the split vit-train scored; test: the data's official test "
        "split (CIFAR, the MNIST family), which is val unless data.val_fraction held out "
        "part of train",
    )
    add_model_options(parser)
    parser.add_argument("--batch-size", type=int, help="default: the training run's eval batch")
    return parser.parse_args(argv)


def eval_data_config(saved: dict, data_info: dict, overrides: list[str]):
    """The data config to score: the checkpoint's, or another one, with overrides applied.

    Composed by Hydra, as vit-train composes its data group: the checkpoint's own data is its
    data=NAME with the saved values as overrides. Whatever the data, the model's input side
    (channels, normalisation, eval crop ratio, class count) is the checkpoint's, set before
    the user's `data.KEY=VALUE` overrides.
    """
    from vit_cli.composition import compose_data_config
    from vit_cli.data import sources

    groups = [o.removeprefix("data=") for o in overrides if o.startswith("data=")]
    keys = [o.removeprefix("data.") for o in overrides if o.startswith("data.")]
    others = [o for o in overrides if not o.startswith(("data=", "data."))]
    if others:
        raise UserError(
            f"vit-eval takes data=NAME and data.KEY=VALUE overrides, not {' '.join(others)}. "
            "The model, precision and device come from the checkpoint and from --flags."
        )
    name = groups[-1] if groups else saved["data"]["name"]
    yaml = files("vit_cli.configs") / "data" / f"{name}.yaml"
    if not yaml.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in yaml.parent.iterdir())
        raise UserError(f"Unknown data={name}. Valid names: {', '.join(names)}.")
    # The training run's data, as saved in the checkpoint: the values its schema has.
    own = [] if groups else _overrides(saved["data"], sources()[name].schema)
    # The model's input side, as KEY=VALUE overrides that the user's own come after.
    pinned = {
        "in_chans": data_info["in_chans"],
        "num_classes": data_info["num_classes"],
        "mean": data_info["mean"],
        "std": data_info["std"],
        "augment.eval_crop_ratio": saved["data"].get("augment", {}).get("eval_crop_ratio", 1.0),
    }
    dotlist = own + [f"{key}={json.dumps(value)}" for key, value in pinned.items()] + keys
    return compose_data_config([f"data={name}", *(f"data.{entry}" for entry in dotlist)])


def _overrides(values: dict, schema: type) -> list[str]:
    """`KEY=VALUE` for each of `values` that `schema` has; a checkpoint of an older vit_cli
    holds the keys of every data source in one flat config."""
    from omegaconf import DictConfig, OmegaConf

    def entries(values: dict, node: DictConfig, prefix: str) -> list[str]:
        found = []
        for key, value in values.items():
            if key not in node:
                continue
            if isinstance(value, dict) and isinstance(node[key], DictConfig):
                found += entries(value, node[key], f"{prefix}{key}.")
            else:
                found.append(f"{prefix}{key}={json.dumps(value)}")
        return found

    return entries(values, OmegaConf.structured(schema), "")


class Tally:
    """Confusion matrix and per-image predictions, fed batch by batch by `evaluate`."""

    def __init__(self, num_classes: int) -> None:
        import torch

        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # (true, pred)
        self.rows: list[tuple[int, int, float]] = []  # (target, predicted, its probability)

    def __call__(self, images, logits, targets) -> None:
        from vit_cli.evaluation import count_confusion

        probs, predicted = logits.softmax(dim=1).max(dim=1)  # (B,), (B,)
        targets, predicted = targets.cpu(), predicted.cpu()
        count_confusion(self.confusion, targets, predicted)
        self.rows += zip(targets.tolist(), predicted.tolist(), probs.tolist(), strict=True)


def run(args: argparse.Namespace) -> dict:
    import torch

    from vit_cli.config import validate
    from vit_cli.data import ImageFiles, build_data
    from vit_cli.evaluation import evaluate
    from vit_cli.figures import confusion_matrix_image, save_png
    from vit_cli.inference import read_for_inference, trained_precision
    from vit_cli.models.factory import model_from_checkpoint
    from vit_cli.runtime import Runtime, resolve_device

    path = Path(args.checkpoint).expanduser()
    suffix = "_ema" if args.ema else ""
    out = args.out or path.parent / f"eval_{path.stem}{suffix}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder (it is made when missing).")
    ckpt = read_for_inference(path)
    saved, data_info = ckpt["config"], ckpt["data"]
    data_cfg = eval_data_config(saved, data_info, args.overrides)
    if args.batch_size is not None:
        data_cfg.eval_batch_size = args.batch_size
    validate(data_cfg)
    device = resolve_device(args.device)
    choose_freed_memory(args.keep_freed_memory, device.type)
    precision = trained_precision(ckpt, device, args.precision)
    model = model_from_checkpoint(ckpt, str(path), args.ema).to(device)
    if hasattr(model, "set_both_heads"):
        # Scored as vit-train scores val: a DeiT student through both heads, and their average.
        model.set_both_heads(True)
    data = build_data(
        data_cfg, data_info["img_size"], torch.Generator(), runtime=Runtime(device),
        eval_split=args.split,
    )  # fmt: skip
    class_names = list(data_info["class_names"])
    if data.class_names != class_names:
        raise UserError(
            f"The classes of data={data_cfg.name} ({', '.join(data.class_names[:10])}) are not "
            f"the checkpoint's ({', '.join(class_names[:10])}), in name or order. Score data "
            "with the classes the model was trained on."
        )

    tally = Tally(len(class_names))
    start = time.perf_counter()
    metrics = evaluate(model, data.val_loader, precision, device, observe=tally)
    seconds = time.perf_counter() - start
    images = len(tally.rows)
    per_class_total = tally.confusion.sum(dim=1)
    per_class = [
        {
            "class": name,
            "images": int(per_class_total[k]),
            "acc1": 100.0 * int(tally.confusion[k, k]) / int(per_class_total[k])
            if per_class_total[k]
            else None,
        }
        for k, name in enumerate(class_names)
    ]
    weights = "ema" if args.ema else "model"
    logged_key = "val_ema/acc1" if args.ema else "val/acc1"
    # The figure vit-train logged is for the same images: the checkpoint's data, and its val.
    own_data = not args.overrides and data.same_val_as_training
    report = {
        "checkpoint": str(path),
        "weights": weights,
        "data": {
            "name": data_cfg.name,
            # Where the images were read: a folder (root), a dataset (hf's path) or shards.
            "root": next(
                (v for k in ("root", "path", "val_shards") if (v := getattr(data_cfg, k, None))),
                None,
            ),
            "split": args.split,
        },
        "precision": precision.label,
        "device": str(device),
        "images": images,
        **metrics,
        "throughput_img_per_s": images / seconds,
        "logged_acc1": ckpt.get("metrics", {}).get(logged_key) if own_data else None,
        "epoch": ckpt.get("state", {}).get("epoch"),
        "per_class": per_class,
        "class_names": class_names,
        "confusion_matrix": tally.confusion.tolist(),
    }

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    save_png(confusion_matrix_image(tally.confusion, class_names), out / "confusion.png")
    # The val loader keeps file order, so the files it read are the rows, one to one.
    dataset = data.val_loader.dataset
    files_of = dataset.read_paths() if isinstance(dataset, ImageFiles) else []
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "target", "predicted", "prob"])
        for i, (target, predicted, prob) in enumerate(tally.rows):
            path_i = files_of[i] if len(files_of) == images else ""
            writer.writerow([i, path_i, class_names[target], class_names[predicted], f"{prob:.6f}"])
    report["out"] = str(out)
    return report


def print_report(report: dict) -> None:
    from rich.table import Table

    from vit_cli.console import console_for

    console = console_for(sys.stdout)
    table = Table(title=f"vit-eval {report['checkpoint']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    data = report["data"]
    where = f" {data['root']}" if data["root"] else ""
    rows = [
        ("weights", report["weights"] + (f" (epoch {report['epoch']})" if report["epoch"] else "")),
        ("data", f"{data['name']}{where}, {data['split']} split"),
        ("images", f"{report['images']:,}"),
        ("top-1", f"{report['acc1']:.2f}%"),
        ("top-5", f"{report['acc5']:.2f}%"),
        ("loss", f"{report['loss']:.4f}"),
    ]
    if "acc1_cls" in report:
        rows.append(
            ("top-1 per head", f"cls {report['acc1_cls']:.2f}%, dist {report['acc1_dist']:.2f}%")
        )
    if report["logged_acc1"] is not None:
        rows.append(("top-1 logged in training", f"{report['logged_acc1']:.2f}%"))
    rows += [
        ("throughput", f"{report['throughput_img_per_s']:,.0f} img/s ({report['device']}, {report['precision']})"),
        ("written to", report["out"]),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)

    per_class = report["per_class"]
    shown = per_class
    title = "per-class top-1"
    if len(per_class) > 20:
        shown = sorted(per_class, key=lambda c: (c["acc1"] is None, c["acc1"]))[:10]
        title += " (the 10 lowest; all in metrics.json)"
    classes = Table(title=title)
    classes.add_column("class")
    classes.add_column("images", justify="right")
    classes.add_column("top-1", justify="right")
    for c in shown:
        acc = "-" if c["acc1"] is None else f"{c['acc1']:.2f}%"
        classes.add_row(c["class"], str(c["images"]), acc)
    console.print(classes)


def main(argv: list[str] | None = None) -> None:
    """`vit-eval`: score a checkpoint; see `vit-eval --help`."""
    args = parse_args(argv)
    with reported_errors(tool="vit-eval"):
        print_report(run(args))


if __name__ == "__main__":
    main()
