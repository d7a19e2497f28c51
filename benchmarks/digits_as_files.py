"""The built-in digits written as image files, so that the sources that read files can be
checked against data=digits, which holds the same images in memory.

The split is data=digits' own (1,437 train, 360 val images). Each image is upsampled as
data=digits upsamples it (bilinear, to --size pixels, 16 by default) and saved as an 8-bit
greyscale PNG:

  OUT/parquet/train.parquet, OUT/parquet/validation.parquet   for data=hf: an Image column
                                                               of the PNGs, a ClassLabel label
  OUT/folder/train/0..9/*.png, OUT/folder/val/0..9/*.png       for data=imagefolder
  OUT/shards/train-000000.tar, ..., OUT/shards/val-000000.tar  for data=webdataset: written
                                                               by webdataset's ShardWriter

    python benchmarks/digits_as_files.py /tmp/digits --format both
    vit-train data=hf data.path=/tmp/digits/parquet <the overrides this script prints>

The overrides it prints give the files data=digits' settings (size, channels, statistics,
shift, batch), without the crops and flips meant for photographs, so that a default run on
the files is the default digits recipe.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLASS_NAMES = [str(d) for d in range(10)]


def recipe(size: int) -> list[str]:
    """The overrides that give the digit files data=digits' settings (configs/data/digits.yaml)."""
    return [
        f"data.img_size={size}", "data.in_chans=1", "data.num_classes=10",
        "data.mean=[0.3053]", "data.std=[0.3760]", "data.shift=1", "data.batch_size=64",
        "data.num_workers=0", "data.augment.crop_scale=null", "data.augment.hflip=0",
        "data.augment.eval_crop_ratio=1.0",
    ]  # fmt: skip


def digit_images(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train and val: uint8 images (N, size, size) and labels (N,), as data=digits sees them."""
    from vit_cli.data.digits import split_digits

    digits = split_digits()
    images = digits["images"].float().unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (images.squeeze(1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = digits["labels"].numpy()
    return {
        split: (pixels[digits[split].numpy()], labels[digits[split].numpy()])
        for split in ("train", "val")
    }


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """One Parquet file per split, named so that `datasets` infers the splits."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)}
    )
    out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation")):
        images, labels = splits[split]
        rows = {
            "image": [{"bytes": png_bytes(image), "path": None} for image in images],
            "label": labels.tolist(),
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(out / f"{name}.parquet")


def write_folder(splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """train/<digit>/<i>.png and val/<digit>/<i>.png, i counting within the split."""
    for split, (images, labels) in splits.items():
        for name in CLASS_NAMES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            (out / split / str(label) / f"{i:04d}.png").write_bytes(png_bytes(image))


def write_shards(splits: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, size: int) -> str:
    """WebDataset shards of `size` samples (key train00012: .png and .cls), written by
    webdataset's own ShardWriter, as another tool would write them (no manifest); returns
    the data.train_shards and data.val_shards overrides that name them."""
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for split, (images, labels) in splits.items():
        pattern = str(out / f"{split}-%06d.tar")
        with webdataset.ShardWriter(pattern, maxcount=size, verbose=0) as writer:
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                writer.write(
                    {"__key__": f"{split}{i:05d}", "png": png_bytes(image), "cls": str(label)}
                )
            count = writer.shard
        last = f"{{000000..{count - 1:06d}}}" if count > 1 else "000000"
        names[split] = f"\"data.{split}_shards='{out}/{split}-{last}.tar'\""
    return f"{names['train']} {names['val']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the folder to write parquet/, folder/, shards/ in")
    parser.add_argument(
        "--format", choices=("parquet", "folder", "shards", "both", "all"), default="both",
        help="both: parquet and folder; all: the three",
    )  # fmt: skip
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard (500)")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels (16)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = digit_images(args.size)
    overrides = " ".join(f"'{o}'" if "[" in o else o for o in recipe(args.size))
    if args.format in ("parquet", "both", "all"):
        write_parquet(splits, args.out / "parquet")
        print(f"vit-train data=hf data.path={args.out / 'parquet'} {overrides}")
    if args.format in ("folder", "both", "all"):
        write_folder(splits, args.out / "folder")
        print(f"vit-train data=imagefolder data.root={args.out / 'folder'} {overrides}")
    if args.format in ("shards", "all"):
        shards = write_shards(splits, args.out / "shards", args.shard_size)
        print(f"vit-train data=webdataset {shards} {overrides}")


if __name__ == "__main__":
    sys.exit(main())
