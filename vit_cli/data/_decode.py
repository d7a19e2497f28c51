"""Image files decoded at the scale they are used: PIL and libjpeg, no torch (vit-data
loads this module in each of its workers).

A camera photograph has 12 megapixels or more, and the model sees 224 x 224 of them. libjpeg
can decode a JPEG at 1/2, 1/4 or 1/8 of its size by scaling its DCT blocks (PIL's
`Image.draft`), which skips most of the inverse transform and the colour conversion; FFCV
and DALI build their speed on it. `read_crop` samples the crop box on the file's full size
first (`augment.CropGeometry`: the same boxes as a full decode would get), decodes at the
smallest scale at which the box still has the model's size in pixels, and cuts and resizes
the box in one step. Other formats are decoded whole.

The EXIF orientation tag is obeyed, as an image viewer does: the box is sampled on the
upright image, mapped to the stored pixels, and only the model-size crop is turned.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from vit_cli.augment import CropGeometry

# What PIL raises for an unreadable file: OSError when it is truncated or not an image,
# SyntaxError for a broken header, DecompressionBombError (a ValueError subclass in newer
# Pillow) for a huge one.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnsupportedImage(ValueError):
    """An image file vit_cli refuses to decode: too many pixels, or a pixel format it would
    get wrong. One of UNREADABLE, so it is skipped and counted like a corrupt file."""


ORIENTATION = 0x0112  # the EXIF tag
# How each EXIF orientation turns the stored pixels upright (as PIL's ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at, besides 1


def check_pixels(
    image: Image.Image,
    max_pixels: int,
    setting: str = "data.max_image_pixels; vit-predict --max-pixels",
) -> None:
    """Refuse an opened (not yet decoded) image of more than `max_pixels`."""
    width, height = image.size
    if width * height > max_pixels:
        raise UnsupportedImage(
            f"{width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} ({setting})"
        )


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image: 1 (as stored) to 8."""
    orientation = image.getexif().get(ORIENTATION, 1)
    return orientation if orientation in UPRIGHT else 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of the stored pixels -> of the image as a viewer shows it."""
    width, height = size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def is_jpeg(image: Image.Image) -> bool:
    # Phones write MPO: a JPEG with more pictures after it (depth, an HDR gain map).
    return image.format in ("JPEG", "MPO")


def _in_channels(image: Image.Image, in_chans: int) -> Image.Image:
    """The decoded image in the model's channels ("L" or "RGB").

    16-bit grayscale keeps its top 8 bits (PIL's own conversion clips it to white); 32-bit
    integer and floating point images are refused, since their range is unknown.
    """
    mode = "L" if in_chans == 1 else "RGB"  # augment.pil_mode
    if image.mode.startswith("I;16"):
        high_bytes = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high_bytes, "L").convert(mode)
    if image.mode in ("I", "F"):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        raise UnsupportedImage(
            f"{kind} pixels (PIL mode {image.mode}) have no fixed range; save the image "
            "with 8 or 16 bits per channel"
        )
    if image.mode == mode:
        image.load()  # decoded in place: convert() would copy the whole image
        return image
    return image.convert(mode)


def read_image(path: str | Path, in_chans: int, max_pixels: int) -> Image.Image:
    """Decode a whole image file, upright, in the model's channels; raises UNREADABLE.

    An image of more than `max_pixels` is refused before it is decoded (Pillow's own limit,
    about 179 million, would let a 12,000 x 12,000 PNG take 2.7 GB).
    """
    with Image.open(path) as image:
        check_pixels(image, max_pixels)
        orientation = exif_orientation(image)
        # Inside the `with`: the decoded image may be the opened one, which it closes.
        image = _in_channels(image, in_chans)
        return image.transpose(UPRIGHT[orientation]) if orientation != 1 else image.copy()


def stored_box(
    box: tuple[float, float, float, float], orientation: int, width: int, height: int
) -> tuple[float, float, float, float]:
    """A box on the upright image -> the same pixels' box on the stored image (width x height)."""
    left, top, right, bottom = box
    if orientation in (2, 3):  # mirrored left-right, or turned half a turn
        left, right = width - right, width - left
    if orientation in (3, 4):  # mirrored top-bottom, or turned half a turn
        top, bottom = height - bottom, height - top
    if orientation == 5:  # transposed: x and y swap
        return top, left, bottom, right
    if orientation == 6:  # stored turned a quarter anticlockwise
        return top, height - right, bottom, height - left
    if orientation == 7:
        return width - bottom, height - right, width - top, height - left
    if orientation == 8:  # stored turned a quarter clockwise
        return width - bottom, left, width - top, right
    return left, top, right, bottom


def crop_box(
    image: Image.Image, geometry: CropGeometry
) -> tuple[tuple[float, float, float, float], int]:
    """The box `geometry` draws on an opened image, upright, as a box of its stored pixels;
    and the image's EXIF orientation."""
    orientation = exif_orientation(image)
    upright_box = geometry.box(*upright_size(image.size, orientation))
    return stored_box(upright_box, orientation, *image.size), orientation


def _dct_scale(box: tuple[float, float, float, float], size: int) -> int:
    """The largest reduction at which the box still spans `size` pixels each way."""
    left, top, right, bottom = box
    for scale in DCT_SCALES:
        if min(right - left, bottom - top) / scale >= size:
            return scale
    return 1


def read_crop(
    path: str | Path, in_chans: int, geometry: CropGeometry, max_pixels: int, dct_scaling: bool
) -> Image.Image:
    """An image file -> the size x size crop `geometry` cuts from it; raises
    UNREADABLE. A JPEG is decoded at the smallest DCT scale that still gives the crop
    `geometry.size` pixels each way (`dct_scaling`; else at full size)."""
    with Image.open(path) as image:
        check_pixels(image, max_pixels)
        width, height = image.size
        box, orientation = crop_box(image, geometry)
        scale = _dct_scale(box, geometry.size) if dct_scaling and is_jpeg(image) else 1
        if scale > 1:
            image.draft(None, (width // scale, height // scale))
            # The scale libjpeg decodes at (its size rounded up): pixel k of the drafted
            # image stands for pixels k * scale to (k + 1) * scale of the stored one.
            scale = next((s for s in (*DCT_SCALES, 1) if -(-width // s) == image.width), 1)
        if scale != 1:
            box = tuple(edge / scale for edge in box)
        crop = geometry.crop(_in_channels(image, in_chans), box)
    return crop.transpose(UPRIGHT[orientation]) if orientation != 1 else crop
