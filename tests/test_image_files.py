"""Image files decoded at the scale they are used (vit_cli/data/_decode.py): the same
crops as a full decode, EXIF orientation, and the JPEGs that take other paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image
from torchvision.transforms import RandomResizedCrop

from vit_cli.augment import CropGeometry, random_resized_box
from vit_cli.config import AugmentConfig
from vit_cli.data import UNREADABLE, FileReader, ImageFiles, SkipCounter, UnsupportedImage
from vit_cli.data._decode import ORIENTATION, UPRIGHT, _dct_scale

TRAIN = AugmentConfig(crop_scale=[0.25, 1.0])
EVAL = AugmentConfig(eval_crop_ratio=0.875)
SIZE = 64
MAX_PIXELS = 8192 * 8192
# Mean absolute difference allowed between a reduced-scale decode and a full one, in grey levels.
MAX_MAE = 2.0


def photo(width: int = 1280, height: int = 853) -> Image.Image:
    """A real photograph (scikit-learn's china.jpg), rescaled."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.BICUBIC)


def save_jpeg(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, format="JPEG", quality=90, **kw)
    return path


def read_twice(path: Path, aug: AugmentConfig, train: bool, seed: int, in_chans: int = 3):
    """The same file read with and without DCT scaling, each from the same random state
    (so that both draw the same crop box)."""
    out = []
    for dct_scaling in (True, False):
        torch.manual_seed(seed)
        out.append(FileReader(SIZE, in_chans, aug, train, MAX_PIXELS, dct_scaling)(path))
    return out


def mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_dct_scale_is_the_largest_reduction_that_keeps_the_crop_at_the_model_size():
    assert _dct_scale((0, 0, 1792, 1800), 224) == 8
    assert _dct_scale((0, 0, 1791, 1800), 224) == 4
    assert _dct_scale((10, 10, 458, 600), 224) == 2
    assert _dct_scale((0, 0, 447, 4000), 224) == 1  # one side too short decides


def test_random_resized_boxes_are_drawn_as_torchvisions_random_resized_crop():
    width, height, scale, ratio = 500, 375, [0.08, 1.0], [3 / 4, 4 / 3]
    torch.manual_seed(0)
    ours = np.array([random_resized_box(width, height, scale, ratio) for _ in range(4000)])
    torch.manual_seed(1)
    theirs = np.array(
        [RandomResizedCrop.get_params(torch.empty(0, height, width), scale, ratio)
         for _ in range(4000)]
    )[:, [1, 0, 3, 2]]  # (top, left, h, w) -> (left, top, w, h)  # fmt: skip
    for boxes in (ours, theirs):
        assert (boxes[:, 0] + boxes[:, 2] <= width).all()
        assert (boxes[:, 1] + boxes[:, 3] <= height).all()

    def summary(boxes):  # noqa: E306
        area = boxes[:, 2] * boxes[:, 3] / (width * height)
        log_ratio = np.log(boxes[:, 2] / boxes[:, 3])
        return [*np.quantile(area, [0.1, 0.5, 0.9]), log_ratio.mean(), log_ratio.std()]

    np.testing.assert_allclose(summary(ours), summary(theirs), atol=0.02)
    # No box of the ratios fits a strip: the largest centred one of a ratio in range.
    assert random_resized_box(10, 1000, [0.9, 1.0], ratio) == (0, 493, 10, 13)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_reduced_decoding_gives_the_crops_of_a_full_decode(tmp_path, train):
    path = save_jpeg(photo(), tmp_path / "china.jpg")
    aug = TRAIN if train else EVAL
    differs = 0
    for seed in range(8):
        reduced, full = read_twice(path, aug, train, seed)
        assert reduced.shape == full.shape == (3, SIZE, SIZE)
        assert reduced.dtype == full.dtype == torch.uint8
        assert mae(reduced, full) < MAX_MAE
        differs += not torch.equal(reduced, full)
    assert differs > 0  # the reduced decode did run: its pixels are not the full decode's


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_exif_orientation_is_obeyed_as_by_an_image_viewer(tmp_path, orientation):
    upright = photo(1100, 700)  # what a viewer shows
    # The stored pixels: the upright image turned back (each turn but the quarter turns
    # undoes itself).
    quarter = {Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
               Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90}  # fmt: skip
    turn = UPRIGHT.get(orientation)
    stored = upright if turn is None else upright.transpose(quarter.get(turn, turn))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = save_jpeg(stored, tmp_path / f"o{orientation}.jpg", exif=exif)
    with Image.open(path) as image:  # the file as a viewer shows it
        viewed = ImageOps.exif_transpose(image).convert("RGB")
    assert viewed.size == upright.size

    for train, aug in ((True, TRAIN), (False, EVAL)):
        geometry = CropGeometry(SIZE, aug, train)
        for seed in range(3):
            torch.manual_seed(seed)
            expected = np.asarray(geometry.crop(viewed, geometry.box(*viewed.size)))
            expected = torch.from_numpy(expected.transpose(2, 0, 1).copy())
            for got in read_twice(path, aug, train, seed):
                assert got.shape == expected.shape
                assert mae(got, expected) < MAX_MAE


def test_cmyk_and_progressive_jpegs_are_decoded_at_reduced_scale_too(tmp_path):
    cmyk = save_jpeg(photo().convert("CMYK"), tmp_path / "cmyk.jpg")
    progressive = save_jpeg(photo(), tmp_path / "progressive.jpg", progressive=True)
    for path in (cmyk, progressive):
        for seed in range(4):
            reduced, full = read_twice(path, TRAIN, True, seed)
            assert reduced.shape == (3, SIZE, SIZE) and mae(reduced, full) < MAX_MAE
    with Image.open(cmyk) as image:  # CMYK arrives as RGB, as PIL converts it
        rgb = image.convert("RGB")
    eval_crop = FileReader(SIZE, 3, EVAL, False, MAX_PIXELS)(cmyk)
    geometry = CropGeometry(SIZE, EVAL, False)
    expected = np.asarray(geometry.crop(rgb, geometry.box(*rgb.size))).transpose(2, 0, 1)
    assert mae(eval_crop, torch.from_numpy(expected.copy())) < MAX_MAE


def test_grey_jpegs_feed_rgb_models_and_colour_jpegs_grey_ones(tmp_path):
    grey = save_jpeg(photo().convert("L"), tmp_path / "grey.jpg")
    for seed in range(3):
        reduced, full = read_twice(grey, TRAIN, True, seed)
        assert reduced.shape == (3, SIZE, SIZE) and mae(reduced, full) < MAX_MAE
        assert torch.equal(reduced[0], reduced[1]) and torch.equal(reduced[1], reduced[2])
    colour = save_jpeg(photo(), tmp_path / "colour.jpg")
    reduced, full = read_twice(colour, TRAIN, True, 0, in_chans=1)
    assert reduced.shape == (1, SIZE, SIZE) and mae(reduced, full) < MAX_MAE


def test_other_formats_are_decoded_whole(tmp_path):
    png = tmp_path / "china.png"
    photo(640, 427).save(png)
    for seed in range(3):
        reduced, full = read_twice(png, TRAIN, True, seed)
        assert torch.equal(reduced, full)


def test_truncated_and_corrupt_jpegs_are_skipped_and_counted(tmp_path):
    whole = save_jpeg(photo(), tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (tmp_path / "text.jpg").write_text("not an image")
    names = ["whole.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg"]
    skipped = SkipCounter()
    files = ImageFiles(
        [(str(tmp_path / name), 0) for name in names],
        FileReader(SIZE, 3, TRAIN, True, MAX_PIXELS),
        skipped,
    )
    read = [files[i] for i in range(len(names))]
    assert read[0][0].shape == (3, SIZE, SIZE)
    assert read[1:] == [None, None, None]
    assert skipped.take() == 3
    assert files.read_paths() == [str(tmp_path / "whole.jpg")]


def test_the_pixel_limit_applies_to_the_full_size_before_decoding(tmp_path):
    path = save_jpeg(photo(1000, 800), tmp_path / "big.jpg")
    reader = FileReader(SIZE, 3, EVAL, False, max_pixels=1000 * 800 - 1)
    with pytest.raises(UnsupportedImage, match="1000x800 = 800,000 pixels"):
        reader(path)
    assert issubclass(UnsupportedImage, UNREADABLE)
