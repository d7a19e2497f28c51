"""data.decode=device: JPEG files decoded a batch at a time on the training device, with
nvjpeg on a GPU (`torchvision.io.decode_jpeg(..., device="cuda")`).

Loader workers read each file's header only: they sample its crop box (`CropGeometry`, on the
upright image, as the workers' own decode does) and pass the file's bytes on. The training
process decodes the batch on its device, cuts each box out and resizes it there
(antialiased bilinear), turns it upright and augments the batch. Files nvjpeg does not take
(formats other than JPEG, CMYK JPEGs) are decoded by the worker as with data.decode=workers.
A file that fails to decode is skipped and counted, as on the workers' path.

On a CPU device the same path runs with torchvision's CPU decoder: that is how the tests
exercise it. **It has not yet run on a GPU.**
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from vit_cli.augment import BatchAugment, CropGeometry
from vit_cli.config import AugmentConfig
from vit_cli.data._decode import check_pixels, crop_box, is_jpeg
from vit_cli.data._image_files import FileReader, SkipCounter


class EncodedImage(NamedTuple):
    """What a worker hands on for one file: its bytes and where to crop, or its pixels."""

    data: torch.Tensor  # the file's bytes, uint8 (N,); empty when `pixels` is set
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in the stored pixels
    orientation: int  # EXIF orientation, 1 to 8
    pixels: torch.Tensor | None  # (C, S, S) uint8, for a file the worker decoded itself
    path: str


class BytesReader:
    """Worker side of data.decode=device: image file -> EncodedImage (picklable)."""

    def __init__(
        self, img_size: int, in_chans: int, aug: AugmentConfig, train: bool, max_pixels: int
    ) -> None:
        self.geometry = CropGeometry(img_size, aug, train)
        self.max_pixels = max_pixels
        self.on_worker = FileReader(img_size, in_chans, aug, train, max_pixels)

    def __call__(self, path: str | Path) -> EncodedImage:
        with Image.open(path) as image:
            check_pixels(image, self.max_pixels)
            on_device = is_jpeg(image) and image.mode in ("L", "RGB")
            if on_device:
                box, orientation = crop_box(image, self.geometry)
        if not on_device:
            return EncodedImage(torch.empty(0, dtype=torch.uint8), (0, 0, 0, 0), 1,
                                self.on_worker(path), str(path))  # fmt: skip
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        return EncodedImage(data, box, orientation, None, str(path))


class EncodedCollate:
    """Worker side: the batch's EncodedImages as a list, and the labels; unreadable files
    (None) dropped."""

    def __call__(self, samples: list) -> tuple[list[EncodedImage], torch.Tensor]:
        samples = [s for s in samples if s is not None]
        labels = torch.as_tensor([int(label) for _, label in samples], dtype=torch.long)
        return [image for image, _ in samples], labels


def turn_upright(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) stored pixels -> as an image viewer shows them (`_decode.UPRIGHT`)."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-2, -1)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-2, -1)
    if orientation == 6:  # a quarter turn clockwise
        return pixels.rot90(-1, (-2, -1))
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # a quarter turn anticlockwise
        return pixels.rot90(1, (-2, -1))
    return pixels


class DeviceDecoder:
    """Training side: a batch of EncodedImages -> the augmented, normalised batch on `device`."""

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        augment: BatchAugment,
        device: torch.device,
        skipped: SkipCounter,
    ) -> None:
        self.size = img_size
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        self.augment = augment
        self.device = device
        self.skipped = skipped

    def decode(self, files: list[EncodedImage]) -> list[torch.Tensor | None]:
        """Each file's pixels (C, H, W) on the device; None for a file that fails."""
        if not files:
            return []
        data = [f.data for f in files]
        try:
            return list(decode_jpeg(data, mode=self.mode, device=self.device))
        except RuntimeError:  # one bad file fails the batch: find it, keep the others
            decoded = []
            for f in files:
                try:
                    decoded.append(decode_jpeg(f.data, mode=self.mode, device=self.device))
                except RuntimeError as e:
                    self.skipped.add(f.path, e)
                    decoded.append(None)
            return decoded

    def crop(self, pixels: torch.Tensor, image: EncodedImage) -> torch.Tensor:
        """The image's box of `pixels`, resized to size x size and turned upright (uint8)."""
        _, H, W = pixels.shape
        left, top, right, bottom = image.box
        x0, y0 = max(math.floor(left), 0), max(math.floor(top), 0)
        x1, y1 = min(math.ceil(right), W), min(math.ceil(bottom), H)
        box = pixels[None, :, y0:y1, x0:x1].float()  # (1, C, h, w)
        resized = F.interpolate(box, (self.size, self.size), mode="bilinear", antialias=True)
        return turn_upright(resized[0].round_().clamp_(0, 255).to(torch.uint8), image.orientation)

    def __call__(
        self, batch: tuple[list[EncodedImage], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        files, labels = batch
        on_device = iter(self.decode([f for f in files if f.pixels is None]))
        crops, kept = [], []
        for i, f in enumerate(files):
            pixels = f.pixels.to(self.device) if f.pixels is not None else next(on_device)
            if pixels is None:
                continue
            crops.append(pixels if f.pixels is not None else self.crop(pixels, f))
            kept.append(i)
        if not crops:
            C = 1 if self.mode == ImageReadMode.GRAY else 3
            images = torch.empty(0, C, self.size, self.size, device=self.device)
            return images, labels[:0].to(self.device)
        images = torch.stack(crops)  # (B, C, S, S) uint8
        return self.augment(images), labels[kept].to(self.device)


class DecodedLoader:
    """A DataLoader of EncodedImage batches that yields them decoded on the device; anything
    else (sampler, batch_size, dataset, ...) is the DataLoader's."""

    def __init__(self, loader: DataLoader, decoder: DeviceDecoder) -> None:
        self.loader = loader
        self.decoder = decoder

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.decoder(batch) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)
