"""Two image folders of real photographs at real sizes, for the image-folder benchmarks.

No network is needed: the photographs are the two that ship with scikit-learn
(`sklearn.datasets.load_sample_images`: china.jpg and flower.jpg, 640x427), and, when
scikit-image is installed, its sample photographs too. Each image is a random crop of one of
them, rescaled and saved as a JPEG at a random quality from 75 to 95:

  OUT/imagenet_size/c0..c9/   --imagenet-count images (1,000), short side 333-500 (ImageNet's)
  OUT/camera/c0..c9/          --camera-count images (200), 4032x3024 (12 megapixels); one in
                              four is stored landscape with an EXIF orientation tag (6 or 8)
                              that turns it portrait, as phones write them

Class k is photograph k mod P with a colour cast of its own, so that a model can learn the
classes and a training run on a folder means something. The camera images get Gaussian noise
(sigma 5 grey levels, `--camera-noise`): an upscaled photograph without it compresses to a
fraction of a real camera file, and its entropy decoding (which a reduced-scale decode
still does in full) would cost too little. Hold out val with data.val_fraction=0.1.

    python benchmarks/photo_folders.py /tmp/photos
    vit-train data=imagefolder data.root=/tmp/photos/camera data.val_fraction=0.1 ...
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
CAMERA_SIZE = (4032, 3024)
ORIENTATION_TAG = 0x0112


def photographs() -> list[np.ndarray]:
    """The sample photographs at hand, as (H, W, 3) uint8 arrays."""
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    try:
        from skimage import data
    except ImportError:
        return photos
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        photo = getattr(data, name, None)
        if photo is not None:
            photos.append(np.asarray(photo())[..., :3])
    return photos


def class_gains(rng: np.random.Generator) -> np.ndarray:
    """A colour cast per class: RGB gains from 0.7 to 1.3."""
    return rng.uniform(0.7, 1.3, size=(CLASSES, 3))


def random_crop(photo: np.ndarray, rng: np.random.Generator, portrait: bool = False) -> Image.Image:
    """A crop of 40-100% of the photograph's height, landscape (or portrait) with its short
    side 0.6-0.9 of its long one."""
    height, width = photo.shape[:2]
    h = int(height * rng.uniform(0.4, 1.0))
    w = int(h * rng.uniform(0.6, 0.9)) if portrait else min(width, int(h / rng.uniform(0.6, 0.9)))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    return Image.fromarray(photo[top : top + h, left : left + w])


def tinted(image: Image.Image, gains: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(image, dtype=np.float32) * gains, 0, 255)


def imagenet_size_image(photo: np.ndarray, gains: np.ndarray, rng, portrait: bool) -> Image.Image:
    crop = random_crop(photo, rng)
    short = int(rng.integers(333, 501))
    scale = short / min(crop.size)
    size = (max(round(crop.width * scale), short), max(round(crop.height * scale), short))
    resized = crop.resize(size, Image.BICUBIC)
    return Image.fromarray(tinted(resized, gains).astype(np.uint8))


def camera_image(
    photo: np.ndarray, gains: np.ndarray, rng, portrait: bool, noise: float = 5.0
) -> Image.Image:
    size = CAMERA_SIZE[::-1] if portrait else CAMERA_SIZE
    resized = random_crop(photo, rng, portrait).resize(size, Image.BICUBIC)
    pixels = tinted(resized, gains)
    if noise > 0:
        pixels += rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(out: Path, count: int, make, rng, camera: bool) -> None:
    photos, gains = photographs(), class_gains(rng)
    for i in range(count):
        label = i % CLASSES
        portrait = camera and i % 4 == 3
        image = make(photos[label % len(photos)], gains[label], rng, portrait)
        exif = Image.Exif()
        if portrait:
            # Viewed portrait, stored landscape: orientation 6 asks the viewer to turn the
            # stored pixels 90 degrees clockwise, so they are the viewed image turned
            # anticlockwise (PIL's ROTATE_90); 8 the other way.
            orientation = int(rng.choice([6, 8]))
            turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
            image = image.transpose(turn)
            exif[ORIENTATION_TAG] = orientation
        folder = out / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        quality = int(rng.integers(75, 96))
        image.save(folder / f"{i:05d}.jpg", quality=quality, exif=exif)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder to write imagenet_size/ and camera/ into")
    parser.add_argument("--imagenet-count", type=int, default=1000)
    parser.add_argument("--camera-count", type=int, default=200)
    parser.add_argument(
        "--camera-noise", type=float, default=5.0, help="sigma of the camera images' noise"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("imagenet_size", "camera"):
        if (args.out / name).exists():
            parser.error(f"{args.out / name} exists: remove it or choose another folder")
    rng = np.random.default_rng(args.seed)
    write_folder(args.out / "imagenet_size", args.imagenet_count, imagenet_size_image, rng, False)
    camera = functools.partial(camera_image, noise=args.camera_noise)
    write_folder(args.out / "camera", args.camera_count, camera, rng, True)
    for name in ("imagenet_size", "camera"):
        files = list((args.out / name).rglob("*.jpg"))
        if not files:
            continue
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        print(f"{args.out / name}: {len(files)} JPEGs, {mb:.2f} MB each on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
