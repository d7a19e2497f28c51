"""Inference from a vit-train checkpoint: the model, its eval transform, and top-k predictions.

The eval transform is the one the val split of image files goes through in training
(`data.FileReader` per file, then the batched `BatchAugment`), rebuilt from the
checkpoint, so a file classified here is seen exactly as `vit-eval` sees it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from vit_cli.augment import build_batch_augment, image_transform
from vit_cli.checkpoint import check_inference_fields, load_checkpoint
from vit_cli.config import AugmentConfig, DataConfig
from vit_cli.data import UNREADABLE, FileReader
from vit_cli.errors import UserError
from vit_cli.models.factory import model_from_checkpoint
from vit_cli.precision import Precision, resolve_precision
from vit_cli.runtime import resolve_device

ImageInput = Image.Image | torch.Tensor


class Prediction(NamedTuple):
    label: str
    index: int
    prob: float


class EvalTransform:
    """Images -> the normalised (B, C, img_size, img_size) batch the model expects.

    Per image: the model's channels (RGB, or grey for one channel), resize to
    img_size / eval_crop_ratio and centre-crop (uint8). Per batch: scale to [0, 1] and
    normalise with the training data's mean and std.
    """

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        eval_crop_ratio: float = 1.0,
        max_pixels: int = DataConfig.max_image_pixels,
        dct_scaling: bool = DataConfig.dct_scaling,
    ) -> None:
        aug = AugmentConfig(eval_crop_ratio=eval_crop_ratio)
        self.img_size, self.in_chans = img_size, in_chans
        self.mean, self.std = list(mean), list(std)
        # Larger image files are refused before decoding.
        self.file = FileReader(img_size, in_chans, aug, False, max_pixels, dct_scaling)
        self.image = image_transform(img_size, in_chans, aug, train=False)
        self.batch = build_batch_augment(aug, img_size, list(mean), list(std), shift=0, train=False)

    @property
    def max_pixels(self) -> int:
        return self.file.max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int) -> None:
        self.file.max_pixels = value

    def read(self, path: str | Path) -> torch.Tensor:
        """One image file as the val loader reads it (`data.FileReader`)."""
        return self.file(path)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """PIL images or tensors (C, H, W) or (B, C, H, W), uint8 or in [0, 1]."""
        if isinstance(images, Image.Image) or (
            isinstance(images, torch.Tensor) and images.ndim == 3
        ):
            images = [images]
        pixels = [self.image(im) for im in images]
        if len({p.dtype for p in pixels}) > 1:  # uint8 and float mixed: all in [0, 1]
            pixels = [p.float() / 255 if p.dtype == torch.uint8 else p for p in pixels]
        return self.batch(torch.stack(pixels))  # (B, C, img_size, img_size)


class LoadedModel(NamedTuple):
    model: nn.Module
    transform: EvalTransform
    class_names: list[str]


def eval_transform_of(ckpt: dict) -> EvalTransform:
    data = ckpt["data"]
    saved = ckpt["config"]["data"]
    return EvalTransform(
        data["img_size"],
        data["in_chans"],
        data["mean"],
        data["std"],
        saved.get("augment", {}).get("eval_crop_ratio", 1.0),
        saved.get("max_image_pixels", DataConfig.max_image_pixels),
        saved.get("dct_scaling", DataConfig.dct_scaling),
    )


def read_for_inference(path: str | Path) -> dict:
    """A vit-train checkpoint that holds what inference needs (else a UserError)."""
    ckpt = load_checkpoint(path)
    check_inference_fields(ckpt, str(path))
    return ckpt


def trained_precision(ckpt: dict, device: torch.device, name: str | None = None) -> Precision:
    """The training run's precision (or `name`), as resolved for `device`."""
    saved = ckpt["config"]["precision"]
    return resolve_precision(name or saved["name"], device, saved.get("allow_tf32", True))


def load_model(path: str | Path, ema: bool = False, device: str = "cpu") -> LoadedModel:
    """Load a vit-train checkpoint for inference: (model in eval mode, transform, class names).

    `ema=True` takes the checkpoint's weight average (trainer.ema) instead of its weights.
    """
    ckpt = read_for_inference(path)
    model = model_from_checkpoint(ckpt, str(path), ema).to(resolve_device(device))
    return LoadedModel(model, eval_transform_of(ckpt), list(ckpt["data"]["class_names"]))


@torch.inference_mode()
def top_predictions(
    model: nn.Module, images: torch.Tensor, class_names: list[str], topk: int, precision: Precision
) -> list[list[Prediction]]:
    """Softmax top-k of a normalised batch; a DeiT's two heads are averaged, as in eval."""
    with precision.autocast():
        logits = model(images).float()  # (B, K)
    probs, indices = logits.softmax(dim=1).topk(min(topk, logits.shape[1]), dim=1)  # (B, k)
    return [
        [Prediction(class_names[i], i, p) for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(probs.tolist(), indices.tolist(), strict=True)
    ]


def predict(
    model: nn.Module,
    images: ImageInput | Sequence[ImageInput],
    transform: EvalTransform,
    class_names: list[str],
    topk: int = 5,
    precision: str = "fp32",
    batch_size: int = 64,
) -> list[list[Prediction]]:
    """Top-k predictions (label, index, prob) for each of `images` (PIL images or tensors)."""
    model.eval()
    device = next(model.parameters()).device
    chosen = resolve_precision(precision, device)
    if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    results = []
    for start in range(0, len(images), batch_size):
        batch = transform(images[start : start + batch_size]).to(device)
        results += top_predictions(model, batch, class_names, topk, chosen)
    return results


# ----------------------------------------------------------------------------- files


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _glob(pattern: Path) -> list[Path]:
    """Files matching `pattern`, sorted; `**` matches folders at any depth without following
    symlinked folders, so a link back up the tree cannot make the search endless."""
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if _has_glob(part))
    anchor = Path(*parts[:first]) if first else Path(".")
    return sorted(p for p in anchor.glob(str(Path(*parts[first:]))) if p.is_file())


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named, image files under folders (recursively), and glob matches, in order.

    A named file or a glob match is taken whatever its extension (it may fail to read);
    a folder contributes the files with an image extension. Nothing found is an error.
    """
    paths: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
            )
            what = f"folder {path}"
        elif path.is_file():
            found = [path]
        elif _has_glob(text):
            found = _glob(path)
            what = f"glob {text!r}"
        else:
            raise UserError(f"{text} does not exist. Give image files, folders or a glob pattern.")
        if not found:
            raise UserError(
                f"The {what} holds no images (looked for {', '.join(IMG_EXTENSIONS)})."
                if path.is_dir()
                else f"The {what} matches no files."
            )
        paths += found
    return paths


class _ImageFiles(Dataset):
    """(index, pixels or None, error or None) per file; an unreadable file is no exception."""

    def __init__(self, paths: list[Path], transform: EvalTransform) -> None:
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform.read(self.paths[i]), None
        except UNREADABLE as e:
            return i, None, f"not a readable image ({type(e).__name__}: {e})"


class _Collate:
    """Normalise the readable images of a batch at once; pass the errors through."""

    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, samples: list) -> tuple[list[int], torch.Tensor | None, list[tuple]]:
        readable = [(i, pixels) for i, pixels, _ in samples if pixels is not None]
        errors = [(i, error) for i, _, error in samples if error is not None]
        if not readable:
            return [], None, errors
        indices = [i for i, _ in readable]
        return indices, self.transform.batch(torch.stack([p for _, p in readable])), errors


def attention_pictures(
    loaded: LoadedModel, paths: list[Path], batch_size: int = 32
) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, picture) for each readable image file: the image, captioned with the class it
    is predicted as, beside its attention maps (`inspection.attention_grid`)."""
    from vit_cli.attention import attention_maps
    from vit_cli.figures import denormalize
    from vit_cli.inspection import attention_grid

    model, transform, class_names = loaded
    for start in range(0, len(paths), batch_size):
        readable, pixels = [], []
        for path in paths[start : start + batch_size]:
            try:
                pixels.append(transform.read(path))
            except UNREADABLE:
                continue  # the predictions report it
            readable.append(path)
        if not readable:
            continue
        batch = transform.batch(torch.stack(pixels))
        maps = attention_maps(model, batch)
        shown = denormalize(batch, transform.mean, transform.std)
        for i, path in enumerate(readable):
            one = maps._replace(
                maps=maps.maps[i : i + 1],
                heads=None if maps.heads is None else maps.heads[i : i + 1],
                predicted=maps.predicted[i : i + 1],
            )
            yield path, attention_grid(one, shown[i : i + 1], class_names)


class FileResult(NamedTuple):
    path: Path
    predictions: list[Prediction] | None  # None when the file could not be read
    error: str | None


def predict_files(
    loaded: LoadedModel,
    paths: list[Path],
    topk: int = 5,
    precision: Precision | None = None,
    batch_size: int = 64,
    workers: int | None = None,
) -> Iterator[FileResult]:
    """Classify image files in batches, yielding one result per file in order.

    With `workers=0` each batch is read in this process before the model runs on it: where
    the model keeps every core busy, a reading process can only take a core from it
    (docs/results.md, "vit-predict against the bare model"). `workers` > 0 loader processes read the next
    batches while the model runs, which pays on a GPU, whose model leaves the cores free, and
    where reading waits on storage. None: 0 on the CPU, else up to 4. Never more processes
    than batches: the others would start only to find nothing to read.
    """
    model, transform, class_names = loaded
    device = next(model.parameters()).device
    if workers is None:
        workers = 0 if device.type == "cpu" else min(4, os.cpu_count() or 1)
    workers = min(workers, -(-len(paths) // batch_size))
    precision = precision or resolve_precision("fp32", device)
    loader = DataLoader(
        _ImageFiles(paths, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_Collate(transform),
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )
    model.eval()
    for indices, images, errors in loader:
        results = {i: FileResult(paths[i], None, error) for i, error in errors}
        if images is not None:
            top = top_predictions(model, images.to(device), class_names, topk, precision)
            results.update(
                {i: FileResult(paths[i], p, None) for i, p in zip(indices, top, strict=True)}
            )
        yield from (results[i] for i in sorted(results))
