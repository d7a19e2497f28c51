"""The pictures for TensorBoard and `vit-predict --attention`: grids, overlays, colour map,
confusion matrix and PNG files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from vit_cli.figures import (
    CAPTION_HEIGHT,
    GAP,
    HEAT_MAP_MAX_SIDE,
    colormap,
    confusion_layout,
    confusion_matrix_image,
    denormalize,
    enlarge,
    grid_cell_box,
    heat_overlay,
    image_grid,
    save_png,
)

DIGITS = [str(d) for d in range(10)]
QUANTUM = 1 / 255 + 1e-6  # pictures with text pass through 8-bit RGB
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 709 relative luminance of sRGB colours (..., 3)."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return linear @ torch.tensor([0.2126, 0.7152, 0.0722])


def _pixels(picture: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The pixels (3, h, w) of `box` (left, top, right, bottom) of `picture`."""
    left, top, right, bottom = box
    return picture[:, top:bottom, left:right]


def _caption(picture: torch.Tensor, image_box: tuple[int, int, int, int]) -> torch.Tensor:
    """The caption band (3, CAPTION_HEIGHT, w) under the image at `image_box`."""
    left, _, right, bottom = image_box
    return picture[:, bottom : bottom + CAPTION_HEIGHT, left:right]


def _corner(picture: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The colour (3,) just inside a cell's top-left corner, clear of the count at its centre."""
    left, top, _, _ = box
    return picture[:, top + 2, left + 2]


def _ink(picture: torch.Tensor) -> torch.Tensor:
    """How dark each pixel of `picture` (3, h, w) on white is: (h, w), 0 for white."""
    return 1 - picture.mean(dim=0)


# --- denormalize, enlarge --------------------------------------------------------------------


def test_denormalize_inverts_the_normalisation_and_clamps():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    normed = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(denormalize(normed, mean, std), images)
    overshoot = denormalize(torch.full((1, 3, 2, 2), 10.0), mean, std)
    assert overshoot.min() == overshoot.max() == 1.0


def test_denormalize_repeats_a_grey_channel_into_three():
    grey = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    shown = denormalize(grey, [0.5], [0.5])
    assert shown.shape == (1, 3, 4, 4)
    assert torch.equal(shown[:, 0], shown[:, 1]) and torch.equal(shown[:, 0], shown[:, 2])
    torch.testing.assert_close(shown[0, 0], (grey[0, 0] * 0.5 + 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_renderers_take_any_device_and_dtype_and_return_float_cpu_tensors(device):
    images = torch.rand(2, 1, 16, 16).to(device, torch.bfloat16)
    shown = denormalize(images, [0.5], [0.5])
    overlay = heat_overlay(shown.to(device), torch.rand(2, 4, 4, device=device))
    pictures = [
        shown,
        overlay,
        enlarge(shown.to(device)),
        colormap(torch.rand(5, device=device)),
        image_grid(overlay.to(device), ["a", "b"]),
        confusion_matrix_image(torch.eye(10, dtype=torch.long, device=device), DIGITS),
    ]
    for picture in pictures:
        assert picture.device.type == "cpu" and picture.dtype == torch.float32
        assert picture.min() >= 0 and picture.max() <= 1


def test_enlarge_repeats_pixels_by_a_whole_factor_and_leaves_large_images_alone():
    small = torch.rand(1, 3, 16, 16)
    big = enlarge(small, min_size=96)
    assert big.shape == (1, 3, 96, 96)
    assert torch.equal(big[..., ::6, ::6], small)  # nearest neighbour: each pixel a 6x6 block
    assert torch.equal(big[..., 5::6, 5::6], small)
    assert enlarge(torch.rand(1, 3, 20, 30), min_size=96).shape == (1, 3, 100, 150)  # x5
    large = torch.rand(1, 3, 224, 224)
    assert torch.equal(enlarge(large), large)


# --- image_grid ------------------------------------------------------------------------------


def test_image_grid_lays_images_out_in_rows_with_white_gaps():
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grid = image_grid(images, columns=3)
    cell = 96  # 16 px enlarged 6 times
    assert grid.shape == (3, GAP + 2 * (cell + GAP), GAP + 3 * (cell + GAP))
    enlarged = enlarge(images)
    for i in range(5):
        box = grid_cell_box((16, 16), 3, i, captioned=False)
        assert torch.equal(_pixels(grid, box), enlarged[i])
    assert (_pixels(grid, grid_cell_box((16, 16), 3, 5, captioned=False)) == 1).all()  # empty
    assert (grid[:, :GAP] == 1).all() and (grid[:, :, cell + GAP : cell + 2 * GAP] == 1).all()


def test_a_lone_image_keeps_the_gap_around_it():
    image = torch.zeros(1, 3, 16, 16)
    grid = image_grid(image, ["7"])
    assert grid.shape == (3, GAP + 96 + CAPTION_HEIGHT + GAP, GAP + 96 + GAP)
    assert torch.equal(
        _pixels(grid, grid_cell_box((16, 16), 1, 0, captioned=True)), enlarge(image)[0]
    )
    assert (grid[:, :GAP] == 1).all() and (grid[:, :, -GAP:] == 1).all()


@pytest.mark.parametrize(("count", "columns"), [(1, 1), (2, 2), (5, 3), (16, 4), (17, 5), (100, 8)])
def test_image_grid_defaults_to_about_square_root_columns_at_most_eight(count, columns):
    grid = image_grid(torch.zeros(count, 3, 16, 16))
    rows = -(-count // columns)
    assert grid.shape == (3, GAP + rows * (96 + GAP), GAP + columns * (96 + GAP))


def test_image_grid_never_has_more_columns_than_images():
    assert image_grid(torch.zeros(2, 3, 16, 16), columns=6).shape == (3, 104, 2 * 100 + GAP)


def test_captions_are_drawn_below_their_image_whatever_their_length():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    blank = image_grid(images, [""] * 4, columns=2)
    long = "a caption far too long for a picture ninety-six pixels wide"
    captioned = image_grid(images, ["3 → 8 (0.91)", "", long, ""], columns=2)
    uncaptioned = image_grid(images, columns=2)
    assert captioned.shape == blank.shape
    assert captioned.shape[1] == uncaptioned.shape[1] + 2 * CAPTION_HEIGHT
    boxes = [grid_cell_box((16, 16), 2, i, captioned=True) for i in range(4)]
    for box in boxes:  # the images themselves are untouched
        assert torch.equal(_pixels(captioned, box), _pixels(blank, box))
    assert (_caption(blank, boxes[0]) == 1).all()  # an empty caption leaves the band white
    assert (_caption(captioned, boxes[0]) < 0.5).any()  # text, in dark ink
    assert (_caption(captioned, boxes[2]) < 0.5).any()
    # The long caption is cut to its cell: its neighbour's band and the margin stay white.
    assert torch.equal(_caption(captioned, boxes[3]), _caption(blank, boxes[3]))
    assert (captioned[:, :, -GAP:] == 1).all()


def test_a_long_caption_is_cut_with_an_ellipsis_to_its_image_width():
    image = torch.zeros(1, 3, 16, 16)
    box = grid_cell_box((16, 16), 1, 0, captioned=True)
    long = _caption(image_grid(image, ["w" * 60]), box)
    ink = _ink(long).sum(dim=0) > 0.1  # (w,) columns with ink
    assert ink[:3].sum() <= 1 and ink[-3:].sum() <= 1  # stops short of the edges
    # "…" ends it: the last inked columns are dots, low in the band.
    last = int(ink.nonzero().max())
    rows = (_ink(long)[:, last - 1 : last + 1].sum(dim=1) > 0.1).nonzero().flatten()
    assert rows.min() > CAPTION_HEIGHT // 2


def test_arrows_and_accents_come_from_the_font_not_boxes():
    image = torch.zeros(1, 3, 16, 16)
    box = grid_cell_box((16, 16), 1, 0, captioned=True)

    def caption(text: str) -> torch.Tensor:
        return _ink(_caption(image_grid(image, [text]), box))

    missing = caption("\uffff")  # the box a font draws for a letter it lacks
    right, left = caption("→"), caption("←")
    assert right.sum() > 1 and not torch.equal(right, missing) and not torch.equal(left, missing)
    middle = right.shape[1] // 2
    # The head is the heavier end: right for "→", left for "←".
    assert right[:, middle:].sum() > right[:, :middle].sum()
    assert left[:, :middle].sum() > left[:, middle:].sum()
    for accented, plain in [("café", "cafe"), ("Ελλάδα", "\uffff" * 6), ("кошка", "\uffff" * 5)]:
        assert not torch.equal(caption(accented), caption(plain)), accented


def test_image_grid_refuses_an_empty_batch_and_miscounted_captions():
    with pytest.raises(ValueError, match="empty"):
        image_grid(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        image_grid(torch.zeros(3, 3, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match="at least one column"):
        image_grid(torch.zeros(3, 3, 16, 16), columns=-1)


# --- colormap, heat_overlay ------------------------------------------------------------------


def test_colormap_is_viridis_from_dark_to_light_with_rising_luminance():
    values = torch.linspace(0, 1, 256)
    colours = colormap(values)
    assert colours.shape == (256, 3)
    viridis = torch.tensor(colormaps["viridis"](values.numpy())[:, :3], dtype=torch.float32)
    assert torch.equal(colours, viridis)
    luminance = _luminance(colours)
    assert (luminance.diff() >= 0).all() and (luminance.diff() > 0).sum() > 250
    assert luminance[0] < 0.05 and luminance[-1] > 0.75
    assert colours.min() >= 0 and colours.max() <= 1


def test_colormap_keeps_the_input_shape_clamps_and_takes_nan_as_zero():
    assert colormap(torch.rand(2, 5, 7)).shape == (2, 5, 7, 3)
    outside = colormap(torch.tensor([-3.0, 4.0, float("nan")]))
    assert torch.equal(outside, colormap(torch.tensor([0.0, 1.0, 0.0])))


def test_heat_overlay_alpha_weighs_the_map_against_the_image():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = torch.full((2, 4, 4), 0.7)
    assert torch.equal(heat_overlay(images, maps, alpha=0.0), images)
    only_map = heat_overlay(images, maps, alpha=1.0)
    assert torch.allclose(only_map, colormap(torch.tensor(0.7)).view(1, 3, 1, 1).expand_as(images))
    half = heat_overlay(images, maps, alpha=0.5)
    assert torch.allclose(half, (images + only_map) / 2)


def test_heat_overlay_upsamples_a_patch_grid_to_the_image():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 3] = 1.0  # the top-right patch
    heat = heat_overlay(torch.zeros(1, 3, 16, 16), maps, alpha=1.0)[0]
    expected = colormap(F.interpolate(maps[None], size=(16, 16), mode="bilinear")[0, 0])
    assert torch.allclose(heat, expected.permute(2, 0, 1))
    assert torch.allclose(heat[:, 1, 14], colormap(torch.tensor(1.0)))  # hot inside the patch
    assert torch.allclose(heat[:, 15, 0], colormap(torch.tensor(0.0)))  # cold far from it


# --- confusion_matrix_image ------------------------------------------------------------------


def test_confusion_matrix_colours_each_cell_by_its_share_of_the_row():
    picture = confusion_matrix_image(torch.eye(10, dtype=torch.long) * 7, DIGITS)
    layout = confusion_layout(DIGITS)
    assert picture.shape == (3, layout.height, layout.width)
    one, zero = colormap(torch.tensor(1.0)), colormap(torch.tensor(0.0))
    for t in range(10):
        for p in range(10):
            colour = _corner(picture, layout.cell_box(t, p))
            assert torch.allclose(colour, one if t == p else zero, atol=QUANTUM), (t, p)


def test_confusion_matrix_rows_are_shares_and_an_empty_row_is_white():
    counts = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    picture = confusion_matrix_image(counts, ["a", "b", "c"])
    layout = confusion_layout(["a", "b", "c"])
    for (t, p), share in {(0, 0): 0.75, (0, 1): 0.25, (2, 2): 0.5, (2, 0): 0.25}.items():
        expected = colormap(torch.tensor(share))
        assert torch.allclose(_corner(picture, layout.cell_box(t, p)), expected, atol=QUANTUM)
    for p in range(3):
        assert (_corner(picture, layout.cell_box(1, p)) == 1).all()


def test_confusion_matrix_writes_each_count_in_its_cell():
    five = confusion_matrix_image(torch.eye(10, dtype=torch.long) * 5, DIGITS)
    seven = confusion_matrix_image(torch.eye(10, dtype=torch.long) * 7, DIGITS)
    layout = confusion_layout(DIGITS)
    # Same shares, same colours: the pictures differ in the diagonal's text, and only there.
    for t in range(10):
        for p in range(10):
            box = layout.cell_box(t, p)
            assert torch.equal(_pixels(five, box), _pixels(seven, box)) == (t != p), (t, p)
    diagonal = torch.zeros(five.shape[1:], dtype=torch.bool)
    for t in range(10):
        left, top, right, bottom = layout.cell_box(t, t)
        diagonal[top:bottom, left:right] = True
    assert torch.equal(five[:, ~diagonal], seven[:, ~diagonal])


def test_confusion_matrix_counts_contrast_with_their_cell():
    counts = torch.eye(10, dtype=torch.long) * 30
    counts[4, 5] = 2
    picture = confusion_matrix_image(counts, DIGITS)
    layout = confusion_layout(DIGITS)
    luminance = _luminance(picture.permute(1, 2, 0))  # (H, W)

    def contrast(t: int, p: int) -> float:
        """WCAG contrast ratio of the cell's most distinct pixel against its background."""
        left, top, right, bottom = layout.cell_box(t, p)
        cell, background = luminance[top:bottom, left:right], float(luminance[top + 2, left + 2])
        ink = float(cell.max() if background < 0.18 else cell.min())
        return (max(ink, background) + 0.05) / (min(ink, background) + 0.05)

    assert contrast(4, 4) > 7  # a light cell, dark text
    assert contrast(4, 5) > 7  # a dark cell, light text
    assert contrast(4, 6) > 4.5  # a zero: fainter, still readable


def test_confusion_matrix_size_depends_on_the_class_names_only():
    counts = torch.randint(0, 5000, (10, 10), generator=torch.Generator().manual_seed(4))
    zeros = confusion_matrix_image(torch.zeros(10, 10, dtype=torch.long), DIGITS)
    assert confusion_matrix_image(counts, DIGITS).shape == zeros.shape
    long_names = [f"{'x' * 200} {d}" for d in range(10)]
    longer_names = [f"{'x' * 400} {d}" for d in range(10)]
    long = confusion_matrix_image(counts, long_names)
    assert long.shape == confusion_matrix_image(counts, longer_names).shape  # names are cut
    assert long.shape[2] < 1000
    assert all(label.endswith("…") for label in confusion_layout(long_names).labels)


def test_confusion_matrix_names_its_rows_and_columns():
    counts = torch.eye(10, dtype=torch.long)
    digits = confusion_matrix_image(counts, DIGITS)
    reversed_digits = confusion_matrix_image(counts, DIGITS[::-1])
    layout = confusion_layout(DIGITS)
    assert digits.shape == reversed_digits.shape
    _, top, _, bottom = layout.cell_box(0, 0)
    row_labels = (0, top, layout.left, bottom)  # left of the first row
    assert not torch.equal(_pixels(digits, row_labels), _pixels(reversed_digits, row_labels))
    column_labels = (layout.left, 0, layout.left + layout.side, layout.top)
    assert not torch.equal(_pixels(digits, column_labels), _pixels(reversed_digits, column_labels))


def test_class_names_are_text_in_any_script_never_formulas_and_warn_of_nothing():
    names = ["x$^$y", "$5 bill", "Ελλάδα", "кошка", "猫", "café"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph (猫) is drawn as a box, quietly
        picture = confusion_matrix_image(torch.eye(6, dtype=torch.long), names)
    layout = confusion_layout(names)
    assert layout.labels == tuple(names)
    for t in range(6):  # each name is drawn left of its row
        _, top, _, bottom = layout.cell_box(t, 0)
        assert (_ink(_pixels(picture, (0, top, layout.left, bottom))) > 0.5).any(), names[t]


def test_a_run_s_matrices_share_one_frame_and_differ_in_cells_and_counts_only():
    first = confusion_matrix_image(torch.eye(10, dtype=torch.long) * 3, DIGITS)
    counts = torch.randint(0, 40, (10, 10), generator=torch.Generator().manual_seed(6))
    later = confusion_matrix_image(counts, DIGITS)
    layout = confusion_layout(DIGITS)
    matrix = torch.zeros(first.shape[1:], dtype=torch.bool)
    matrix[layout.top : layout.top + layout.side, layout.left : layout.left + layout.side] = True
    assert torch.equal(first[:, ~matrix], later[:, ~matrix])  # names, titles, colour bar
    assert not torch.equal(first[:, matrix], later[:, matrix])


def test_confusion_matrix_of_many_classes_leaves_the_counts_out():
    names = [f"class {i}" for i in range(30)]
    counts = torch.eye(30, dtype=torch.long) * 3 + 1
    picture = confusion_matrix_image(counts, names)
    layout = confusion_layout(names)
    assert layout.labels and not layout.counted
    cell = _pixels(picture, layout.cell_box(7, 7))
    assert torch.equal(cell, cell[:, :1, :1].expand_as(cell))  # one colour, no text


def test_a_hundred_class_names_are_written_down_both_sides_in_a_readable_font():
    names = [f"class {i}" for i in range(100)]
    counts = torch.eye(100, dtype=torch.long) * 9 + 1
    picture = confusion_matrix_image(counts, names)
    layout = confusion_layout(names)
    assert layout.labels == tuple(names) and layout.label_font >= 8 and layout.cell >= 10
    assert layout.side <= HEAT_MAP_MAX_SIDE and layout.column_labels_vertical
    for t in (0, 37, 99):
        _, top, _, bottom = layout.cell_box(t, 0)
        assert (_ink(_pixels(picture, (0, top, layout.left, bottom))) > 0.5).any()
        left, _, right, _ = layout.cell_box(0, t)
        assert (_ink(_pixels(picture, (left, 0, right, layout.top))) > 0.5).any()


def test_confusion_matrix_beyond_a_hundred_classes_numbers_its_axes():
    counts = torch.randint(0, 9, (150, 150), generator=torch.Generator().manual_seed(5))
    counts[3] = 0
    names = [str(i) for i in range(150)]
    picture = confusion_matrix_image(counts, names)
    layout = confusion_layout(names)
    assert layout.labels == () and layout.cell == 6 and layout.side == 900
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    colours = colormap(shares)
    colours[3] = 1.0
    expected = colours.repeat_interleave(6, dim=0).repeat_interleave(6, dim=1).permute(2, 0, 1)
    matrix = (layout.left, layout.top, layout.left + 900, layout.top + 900)
    torch.testing.assert_close(_pixels(picture, matrix), expected, atol=QUANTUM, rtol=0)
    left_of_rows = _pixels(picture, (0, layout.top, layout.left, layout.top + 900))
    assert (_ink(left_of_rows) > 0.5).any()  # the class numbers


def test_confusion_matrix_of_thousands_of_classes_stays_within_the_side_limit():
    names = [str(i) for i in range(1250)]  # cells below a pixel: averaged together
    picture = confusion_matrix_image(torch.eye(1250, dtype=torch.long), names)
    layout = confusion_layout(names)
    assert layout.side == HEAT_MAP_MAX_SIDE
    assert picture.shape == (3, layout.height, layout.width)


def test_confusion_matrix_refuses_counts_that_do_not_match_the_names():
    with pytest.raises(ValueError, match="counts \\(3, 3\\) for 10 class names"):
        confusion_matrix_image(torch.zeros(3, 3, dtype=torch.long), DIGITS)


# --- save_png --------------------------------------------------------------------------------


def test_save_png_writes_the_picture_as_8_bit_rgb(tmp_path):
    picture = image_grid(torch.rand(3, 3, 16, 16), ["1", "2 → 7", "3"])
    save_png(picture, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert (png.height, png.width) == tuple(picture.shape[1:])
        read = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 255
    assert torch.allclose(read, picture, atol=QUANTUM)


def test_save_png_refuses_a_batch(tmp_path):
    with pytest.raises(ValueError, match="\\(3, H, W\\)"):
        save_png(torch.zeros(2, 3, 8, 8), tmp_path / "x.png")
