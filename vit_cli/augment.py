"""Augmentation: per-image pipelines for image files, batched ops for whole batches, and Mixup/CutMix.

Images reach the loader's collate step as uint8 (or float in [0, 1]) tensors of one size;
`BatchAugment` then augments and normalises the whole batch at once, so data held in memory
(digits, CIFAR) never goes through PIL. RandAugment is batched too (`BatchRandAugment`);
TrivialAugment runs torchvision's transform one image at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vit_cli.config import AugmentConfig

# ----------------------------------------------------------------------------- per image


class CropGeometry:
    """Which part of an image becomes the model's img_size x img_size input.

    Train with `aug.crop_scale`: a random resized crop (`random_resized_box`: area share
    in crop_scale, aspect ratio log-uniform in crop_ratio, as torchvision samples it). Eval
    (and train without it): resize the short side to img_size / eval_crop_ratio, then
    centre-crop img_size.

    `box` works from an image's size alone, so that a decoder can decode no more pixels
    than the box needs (`data._decode.read_crop`); `crop` cuts the box out and resizes it
    in one antialiased bilinear step, with sub-pixel box edges.
    """

    def __init__(self, img_size: int, aug: AugmentConfig, train: bool) -> None:
        self.size = img_size
        self.random = train and aug.crop_scale is not None
        self.scale, self.ratio = aug.crop_scale, aug.crop_ratio
        self.resize_to = round(img_size / (1.0 if train else aug.eval_crop_ratio))

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the crop in an image of width x height pixels."""
        if self.random:
            left, top, w, h = random_resized_box(width, height, self.scale, self.ratio)
            return float(left), float(top), float(left + w), float(top + h)
        # As v2.Resize(resize_to) then v2.CenterCrop(size) would cut it, in the image's pixels.
        short, long = sorted((width, height))
        resized_long = int(self.resize_to * long / short)
        new_w, new_h = (
            (self.resize_to, resized_long) if width <= height else (resized_long, self.resize_to)
        )
        left = int(round((new_w - self.size) / 2.0)) * width / new_w
        top = int(round((new_h - self.size) / 2.0)) * height / new_h
        return left, top, left + self.size * width / new_w, top + self.size * height / new_h

    def crop(self, image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)


def random_resized_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], attempts: int = 10
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random resized crop, drawn as torchvision's RandomResizedCrop
    draws it: an area share uniform in `scale` and an aspect ratio log-uniform in `ratio`,
    retried while the box does not fit, then the largest centred box of a ratio in range.

    The uniforms come from torch's global generator (seeded per loader worker) in one draw:
    torchvision's dozen small tensor ops per box cost a tenth of a small JPEG's decoding.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(4 * attempts).tolist()
    for u_area, u_ratio, u_top, u_left in zip(*[iter(draws)] * 4, strict=True):
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_low + u_ratio * (log_high - log_low))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return left, top, w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def image_transform(
    img_size: int, in_chans: int, aug: AugmentConfig, train: bool
) -> Callable[[Image.Image | torch.Tensor], torch.Tensor]:
    """An image in memory -> uint8 tensor (in_chans, img_size, img_size), before any batched
    op. PIL images are cropped as image files are (`CropGeometry`); tensors (C, H, W) by
    torchvision's v2 transforms with the same geometry."""
    geometry = CropGeometry(img_size, aug, train)
    to_channels = ToChannels(in_chans)
    if geometry.random:
        tensor_geometry = v2.RandomResizedCrop(
            img_size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio), antialias=True
        )
    else:
        tensor_geometry = v2.Compose(
            [v2.Resize(geometry.resize_to, antialias=True), v2.CenterCrop(img_size)]
        )

    def transform(image: Image.Image | torch.Tensor) -> torch.Tensor:
        image = to_channels(image)
        if isinstance(image, Image.Image):
            return TF.pil_to_tensor(geometry.crop(image, geometry.box(*image.size)))
        return tensor_geometry(v2.ToImage()(image))

    return transform


def pil_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


class ToChannels:
    """An image in the model's channels: PIL images by PIL's conversion, tensors by v2's.

    PIL rounds its grey level (ITU-R 601-2 luma); v2.Grayscale on a uint8 tensor truncates
    it, which made every grey pixel one level too dark. RGBA drops its alpha channel.
    """

    def __init__(self, in_chans: int) -> None:
        self.mode = pil_mode(in_chans)
        self.tensor_transform = v2.Grayscale(1) if in_chans == 1 else v2.RGB()

    def __call__(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(image, Image.Image):
            return image if image.mode == self.mode else image.convert(self.mode)
        return self.tensor_transform(image)


def _shear(axis: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """A shear whose tangent is the magnitude, about the top-left corner (as torchvision)."""

    def apply(images: torch.Tensor, magnitude: float) -> torch.Tensor:
        shear = [0.0, 0.0]
        shear[axis] = math.degrees(math.atan(magnitude))
        return TF.affine(
            images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0]
        )  # fmt: skip

    return apply


def _translate(axis: int) -> Callable[[torch.Tensor, float], torch.Tensor]:
    def apply(images: torch.Tensor, magnitude: float) -> torch.Tensor:
        shift = [0, 0]
        shift[axis] = int(magnitude)
        return TF.affine(images, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])

    return apply


def _no_magnitude(num_bins: int, height: int, width: int) -> None:
    return None


def _linear(top: float) -> Callable[[int, int, int], torch.Tensor]:
    return lambda num_bins, height, width: torch.linspace(0.0, top, num_bins)


# RandAugment's operations (Cubuk et al., 2020) as torchvision v2 defines them: the magnitude
# of each bin (num_bins, height, width), whether it takes a random sign, and the op itself.
RANDAUGMENT_OPS: dict[str, tuple[Callable, bool, Callable[[torch.Tensor, float], torch.Tensor]]] = {
    "Identity": (_no_magnitude, False, lambda x, m: x),
    "ShearX": (_linear(0.3), True, _shear(0)),
    "ShearY": (_linear(0.3), True, _shear(1)),
    "TranslateX": (lambda n, h, w: torch.linspace(0.0, 150 / 331 * w, n), True, _translate(0)),
    "TranslateY": (lambda n, h, w: torch.linspace(0.0, 150 / 331 * h, n), True, _translate(1)),
    "Rotate": (_linear(30.0), True, lambda x, m: TF.rotate(x, angle=m)),
    "Brightness": (_linear(0.9), True, lambda x, m: TF.adjust_brightness(x, 1.0 + m)),
    "Color": (_linear(0.9), True, lambda x, m: TF.adjust_saturation(x, 1.0 + m)),
    "Contrast": (_linear(0.9), True, lambda x, m: TF.adjust_contrast(x, 1.0 + m)),
    "Sharpness": (_linear(0.9), True, lambda x, m: TF.adjust_sharpness(x, 1.0 + m)),
    "Posterize": (
        lambda n, h, w: (8 - torch.arange(n) / ((n - 1) / 4)).round().int(),
        False,
        lambda x, m: TF.posterize(x, bits=int(m)),
    ),
    "Solarize": (
        lambda n, h, w: torch.linspace(1.0, 0.0, n),
        False,
        lambda x, m: TF.solarize(x, threshold=m * (255 if x.dtype == torch.uint8 else 1.0)),
    ),
    "AutoContrast": (_no_magnitude, False, lambda x, m: TF.autocontrast(x)),
    "Equalize": (_no_magnitude, False, lambda x, m: TF.equalize(x)),
}


class BatchRandAugment:
    """RandAugment of a uint8 batch, with every image drawing its own ops, signs and magnitudes.

    Each of the `num_ops` layers draws, per image, an op, a sign and (with `magnitude_std`) a
    magnitude from N(magnitude, std), as timm's `mstd` does; torchvision's RandAugment would
    give a batch one draw. Images that drew the same (op, magnitude, sign) then go through
    the op together, so a batch costs a few dozen calls instead of two per image, with the
    same distribution. `benchmarks/loader.py` times the loader against the training step.

    Magnitudes are on torchvision's 0..30 scale (31 bins): timm's and DeiT's
    `rand-m9-mstd0.5` is on a 0..10 scale, i.e. magnitude 27 with std 1.5 here.
    """

    num_bins = 31

    def __init__(self, num_ops: int, magnitude: int, magnitude_std: float = 0.0) -> None:
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.ops = list(RANDAUGMENT_OPS.values())
        # Draws that make no difference (the sign of an unsigned op, the magnitude of an
        # op without one) are zeroed, so that they do not split a group.
        self.signed = torch.tensor([signed for _, signed, _ in self.ops])
        self.has_magnitude = torch.tensor([m(2, 1, 1) is not None for m, _, _ in self.ops])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images.shape
        images = images.clone()
        for _ in range(self.num_ops):
            op = torch.randint(len(self.ops), (B,))
            level = torch.full((B,), float(self.magnitude))
            if self.magnitude_std > 0:
                level = (level + self.magnitude_std * torch.randn(B)).round()
            level = level.clamp(0, self.num_bins - 1).long() * self.has_magnitude[op]
            negative = (torch.rand(B) < 0.5) & self.signed[op]
            draws = torch.stack([op, level, negative.long()], dim=1)  # (B, 3)
            for op_i, level_i, negative_i in draws.unique(dim=0).tolist():
                members = (draws == torch.tensor([op_i, level_i, negative_i])).all(dim=1)
                magnitudes_fn, _, apply = self.ops[op_i]
                magnitudes = magnitudes_fn(self.num_bins, H, W)
                m = 0.0 if magnitudes is None else float(magnitudes[level_i])
                images[members] = apply(images[members], -m if negative_i else m)
        return images


class PerImage:
    """Apply a single-image transform to each image of a batch in turn."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


def auto_augment(aug: AugmentConfig) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The configured auto-augmentation, as an op on a uint8 batch (B, C, H, W)."""
    if aug.auto_augment == "randaugment":
        return BatchRandAugment(
            aug.randaugment_ops, aug.randaugment_magnitude, aug.randaugment_magnitude_std
        )
    if aug.auto_augment == "trivialaugment":
        # One op per image at a uniformly drawn magnitude: grouping would save little.
        return PerImage(v2.TrivialAugmentWide())
    return None


# ----------------------------------------------------------------------------- batched ops


def random_shift(images: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-shift, shift], zero padded.

    The same as padding by `shift` and taking a random crop of the original size.
    """
    B, C, H, W = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B)).to(images.device)
    rows = dy[:, None] + torch.arange(H, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(W, device=images.device)  # (B, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_hflip(images: torch.Tensor, p: float) -> torch.Tensor:
    # Drawn on the CPU's generator wherever the images are (data.decode=device).
    flip = (torch.rand(images.shape[0]) < p).to(images.device)
    W = images.shape[-1]
    out = torch.empty_like(images)
    # A piece at a time (`cache_pieces`); a flip over rows of W pixels runs 7x faster than
    # over the last axis of a 4-d tensor, and a piece of one image needs no select.
    for source, target, flips in zip(*cache_pieces(images, out, flip), strict=True):
        mirrored = source.reshape(-1, W).flip(-1).view(source.shape)
        if len(source) == 1:
            target.copy_(mirrored if bool(flips) else source)
        else:
            torch.where(flips[:, None, None, None], mirrored, source, out=target)
    return out


def random_erase(
    images: torch.Tensor,
    p: float,
    scale: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """Replace one random box per image (with probability p) by standard normal noise.

    Box area and aspect ratio are drawn as in Zhong et al. (2020); a box larger than the
    image is clipped to it instead of being redrawn. Expects normalised images.
    """
    B, C, H, W = images.shape
    area = H * W * torch.empty(B).uniform_(*scale)
    ratio = torch.exp(torch.empty(B).uniform_(*log_ratio))
    h = torch.sqrt(area * ratio).round().clamp(1, H).long()
    w = torch.sqrt(area / ratio).round().clamp(1, W).long()
    top = (torch.rand(B) * (H - h + 1)).long()
    left = (torch.rand(B) * (W - w + 1)).long()
    ys, xs = torch.arange(H), torch.arange(W)
    in_rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])  # (B, H)
    in_cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])  # (B, W)
    erase = torch.rand(B) < p
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    mask = mask.to(images.device)
    return torch.where(mask[:, None], torch.randn_like(images), images)


class BatchAugment:
    """uint8 (or [0, 1] float) batch -> normalised float batch, augmented when training.

    Order: shift, flip and auto-augment on the stored pixels; then scale to [0, 1], resize
    to `img_size`, normalise, and erase (noise is drawn in normalised units).
    """

    def __init__(
        self,
        img_size: int,
        mean: list[float],
        std: list[float],
        shift: int = 0,
        hflip: float = 0.0,
        auto: Callable[[torch.Tensor], torch.Tensor] | None = None,
        erase_prob: float = 0.0,
    ) -> None:
        self.img_size = img_size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.shift = shift
        self.hflip = hflip
        self.auto = auto
        self.erase_prob = erase_prob

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.shift > 0:
            images = random_shift(images, self.shift)
        if self.hflip > 0:
            images = random_hflip(images, self.hflip)
        if self.auto is not None:
            images = self.auto(images)
        # Pixels in [0, scale]; normalised as (x - scale * mean) / (scale * std), which is
        # (x / scale - mean) / std without a pass of its own.
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        if images.shape[-2:] != (self.img_size, self.img_size):
            images = F.interpolate(
                images.to(torch.float32, copy=True).div_(scale),
                (self.img_size, self.img_size),
                mode="bilinear",
                antialias=True,
            )
            scale = 1.0
        images = self.normalised(images, scale)
        if self.erase_prob > 0:
            images = random_erase(images, self.erase_prob)
        return images

    def normalised(self, images: torch.Tensor, scale: float) -> torch.Tensor:
        """A float32 copy of `images`, normalised; on the CPU a few images at a time, which
        keeps each piece in the core's cache through its three passes (convert, subtract,
        divide): 3x faster than whole-batch passes for a batch of 224-pixel images."""
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        mean = (self.mean * scale).to(images.device)
        std = (self.std * scale).to(images.device)
        for source, target in zip(*cache_pieces(images, out), strict=True):
            target.copy_(source).sub_(mean).div_(std)
        return out


# About half of a core's L2 cache (1-2 MiB on current x86 server cores).
CACHE_PIECE_BYTES = 512 * 1024


def cache_pieces(*batches: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each batch split along its first axis into pieces of as many images as fit in
    CACHE_PIECE_BYTES (at least one) as float32; on a GPU, one piece."""
    images = batches[0]
    per_piece = len(images) or 1
    if images.device.type == "cpu" and images[0:1].numel():
        per_piece = max(1, CACHE_PIECE_BYTES // (4 * images[0].numel()))
    return [batch.split(per_piece) for batch in batches]


def build_batch_augment(
    aug: AugmentConfig, img_size: int, mean: list[float], std: list[float], shift: int, train: bool
) -> BatchAugment:
    if not train:
        return BatchAugment(img_size, mean, std)
    return BatchAugment(img_size, mean, std, shift, aug.hflip, auto_augment(aug), aug.erase_prob)


# ----------------------------------------------------------------------------- mixing


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Labels (B,) -> target distributions (B, num_classes) with label smoothing."""
    off = smoothing / num_classes
    one_hot = F.one_hot(targets, num_classes).float()  # (B, K)
    return one_hot * (1.0 - smoothing) + off


def cutmix_box(H: int, W: int, lam: float) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) of about (1 - lam) of the image, centred uniformly, clipped."""
    cut = math.sqrt(1.0 - lam)
    h, w = round(H * cut), round(W * cut)
    cy, cx = int(torch.randint(0, H, ())), int(torch.randint(0, W, ()))
    y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, H)
    x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, W)
    return y0, y1, x0, x1


class MixupCutmix:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a whole batch, on any device.

    Returns soft targets (B, K): label-smoothed one-hot targets mixed with the same weight as
    the images. Each image is mixed with its mirror in the batch (`flip(0)`), so that
    repeated-augmentation copies, which sit next to each other, rarely mix with themselves.
    One mixing weight per batch; CutMix's weight is the uncovered share of the image.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        soft = smooth_one_hot(targets, self.num_classes, self.label_smoothing)
        if float(torch.rand(())) >= self.prob:
            return images, soft
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if use_cutmix:
            B, C, H, W = images.shape
            y0, y1, x0, x1 = cutmix_box(H, W, lam)
            mixed = images.clone()
            mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            mixed = images * lam + images.flip(0) * (1.0 - lam)
        return mixed, soft * lam + soft.flip(0) * (1.0 - lam)
