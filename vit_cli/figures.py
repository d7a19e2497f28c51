"""Pictures for TensorBoard and `vit-predict --attention`: image grids, heat-map overlays and
the confusion matrix.

Every picture is a float tensor in [0, 1] on the CPU, (3, H, W) for one picture and
(B, 3, H, W) for a batch, the layout TensorBoard's `add_image` takes. Grids are laid out by
torchvision's `make_grid`; heat maps take matplotlib's viridis; matplotlib draws the
confusion matrix's axes, class names and colour bar on its Agg backend (no display). Text is
in the DejaVu Sans that matplotlib ships, which has arrows and accented letters, so no font has
to be installed.

The size of a picture depends only on the sizes of its inputs, the number of classes and the
class names, never on the captions or counts: pictures of the same run stay the same size from
epoch to epoch, and TensorBoard's step slider moves through them without the picture jumping.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.colors import Colormap
    from matplotlib.font_manager import FontProperties

# Grids: the white gap between and around cells, the captions' font and band, the widest grid.
GAP = 4
CAPTION_FONT = 12  # px
CAPTION_HEIGHT = 18  # px
MAX_COLUMNS = 8

# Confusion matrices: counts are written up to this many classes, class names up to this many
# (beyond, the axes number the classes), and the matrix is at most HEAT_MAP_MAX_SIDE px a side.
COUNTS_MAX_CLASSES = 20
LABELS_MAX_CLASSES = 100
HEAT_MAP_MAX_SIDE = 1000
LABEL_MAX_WIDTH = 110  # px; longer class names are cut with "…"
TITLE_FONT = 13  # px
MARGIN = 8
TICK_PAD = 6  # px between the matrix and its labels
COLOUR_BAR_GAP = 10
COLOUR_BAR_WIDTH = 12

COLORMAP = "viridis"
FONT = "DejaVu Sans"
INK = 32  # the captions' grey
# A power of two, so that a size in px divided by it and multiplied back is exact: Agg cuts
# its canvas to whole pixels, and 29 / 100 * 100 would lose a row.
DPI = 64

# Pillow draws the text that changes every epoch, the captions and counts: 0.04 ms a line
# against matplotlib's 0.6 to 1.8 ms, which for the ~160 lines of a digits epoch would add
# about a tenth to the epoch's time on two CPU cores. matplotlib draws what stays, the
# confusion matrix's frame, once a run.


# ---------------------------------------------------------------------------------------------
# Images


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo `(x - mean) / std` of `images` (B, C, H, W), C 1 or 3, into colours in [0, 1]:
    (B, 3, H, W) on the CPU, a grey image repeated into three channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"denormalize takes images (B, 1 or 3, H, W), not {tuple(images.shape)}")
    images = images.detach().cpu().float()
    mean_ = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_ = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    shown = (images * std_ + mean_).clamp(0, 1)
    return shown.expand(-1, 3, -1, -1).contiguous()


def enlarge(images: torch.Tensor, min_size: int = 96) -> torch.Tensor:
    """Scale `images` (B, 3, H, W) up by the smallest whole factor that makes the shorter side
    at least `min_size` px, repeating pixels (nearest neighbour) so that 16 px digits stay
    sharp; images that are large enough come back unchanged."""
    images = images.detach().cpu()
    factor = max(1, math.ceil(min_size / min(images.shape[-2:])))
    if factor == 1:
        return images
    return F.interpolate(images, scale_factor=factor, mode="nearest")


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    min_size: int = 96,
) -> torch.Tensor:
    """`images` (B, 3, H, W) in [0, 1], enlarged (`enlarge`) and laid out in rows on white,
    `GAP` px apart, each with its caption in a band under it when `captions` are given:
    (3, H', W'). `grid_cell_box` says where each image is.

    `columns` defaults to about √B, at most `MAX_COLUMNS`, and is never more than B. A caption
    wider than its image is cut short with "…". An empty batch is a ValueError: there is
    nothing to show, and a blank picture in TensorBoard would look like a rendering fault.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid takes images (B, 3, H, W), not {tuple(images.shape)}")
    count = images.shape[0]
    if count == 0:
        raise ValueError("image_grid needs at least one image; the batch is empty")
    if columns is not None and columns < 1:
        raise ValueError(f"image_grid needs at least one column, not {columns}")
    if captions is not None and len(captions) != count:
        raise ValueError(f"image_grid got {len(captions)} captions for {count} images")
    columns = min(count, columns or min(MAX_COLUMNS, math.ceil(math.sqrt(count))))

    cells = enlarge(images.float().clamp(0, 1), min_size)
    if captions is not None:
        cells = F.pad(cells, (0, 0, 0, CAPTION_HEIGHT), value=1.0)  # a white band under each
    if count == 1:  # make_grid hands a lone image back without the gap around it
        grid = F.pad(cells[0], (GAP, GAP, GAP, GAP), value=1.0)
    else:
        grid = make_grid(cells, nrow=columns, padding=GAP, pad_value=1.0)
    if captions is None:
        return grid

    # Each row's captions go on a greyscale strip of their own, not on the whole grid: the
    # strips are a tenth of its pixels, and a round trip of the grid through Pillow would
    # cost more than the text.
    font = _pil_font(CAPTION_FONT)
    for first in range(0, count, columns):
        strip = Image.new("L", (grid.shape[2], CAPTION_HEIGHT), 255)
        draw = ImageDraw.Draw(strip)
        for i in range(first, min(first + columns, count)):
            left, _, right, bottom = grid_cell_box(images.shape[-2:], columns, i, True, min_size)
            text = _fit(str(captions[i]), right - left - 2, font)
            draw.text(((left + right) / 2, CAPTION_HEIGHT / 2), text, font=font, fill=INK,
                      anchor="mm")  # fmt: skip
        grid[:, bottom : bottom + CAPTION_HEIGHT] = torch.from_numpy(np.array(strip)).div(255)
    return grid


def grid_cell_box(
    image_size: Sequence[int], columns: int, i: int, captioned: bool, min_size: int = 96
) -> tuple[int, int, int, int]:
    """Where `image_grid` puts image `i` of the size `image_size` (H, W) in `columns` columns:
    (left, top, right, bottom) in px, right and bottom exclusive. Its caption, if any, is in
    the `CAPTION_HEIGHT` px below."""
    height, width = image_size
    factor = max(1, math.ceil(min_size / min(height, width)))
    height, width = height * factor, width * factor
    row, column = divmod(i, columns)
    left = GAP + column * (width + GAP)
    top = GAP + row * (height + (CAPTION_HEIGHT if captioned else 0) + GAP)
    return left, top, left + width, top + height


# ---------------------------------------------------------------------------------------------
# Colour


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Colours (..., 3) in [0, 1] of `values` (...) in [0, 1] by matplotlib's viridis: 0 is
    dark purple, 1 is yellow. Values outside [0, 1] take the nearer end, and NaN is taken as 0.
    """
    values = values.detach().cpu().float().nan_to_num(0.0)
    rgba = np.asarray(_colormap()(values.numpy()))  # (..., 4); a tuple for a 0-d tensor
    return torch.from_numpy(rgba[..., :3]).float()


def heat_overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """`images` (B, 3, H, W) blended with `maps` (B, h, w) in [0, 1], each map upsampled
    bilinearly to its image (usually from the patch grid) and coloured by `colormap`;
    `alpha` is the map's weight. (B, 3, H, W) on the CPU."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"heat_overlay's alpha is the map's weight in [0, 1], not {alpha}")
    if maps.ndim != 3 or images.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"heat_overlay takes images (B, 3, H, W) and maps (B, h, w), "
            f"not {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    images = images.detach().cpu().float()
    maps = maps.detach().cpu().float().unsqueeze(1)  # (B, 1, h, w)
    size = images.shape[-2:]
    upsampled = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    heat = colormap(upsampled.squeeze(1)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return torch.lerp(images, heat, alpha)


def _text_colours(backgrounds: torch.Tensor, faint: torch.Tensor) -> torch.Tensor:
    """Colours (..., 3) for text on `backgrounds` (..., 3): black or white, whichever
    contrasts more (they contrast alike at WCAG luminance 0.179, where (L + 0.05) / 0.05 =
    1.05 / (L + 0.05)); where `faint` (...) is true, moved 45% of the way to the background,
    still readable but quieter (the zeros of a confusion matrix)."""
    linear = torch.where(
        backgrounds <= 0.04045, backgrounds / 12.92, ((backgrounds + 0.055) / 1.055) ** 2.4
    )
    dark = linear @ torch.tensor([0.2126, 0.7152, 0.0722]) > 0.179
    text = torch.where(dark, 0.0, 1.0).unsqueeze(-1).expand_as(backgrounds)
    return torch.where(faint.unsqueeze(-1), torch.lerp(text, backgrounds, 0.45), text)


# ---------------------------------------------------------------------------------------------
# Confusion matrix


@dataclass(frozen=True)
class ConfusionLayout:
    """Where `confusion_matrix_image` draws, in px: the matrix's top-left corner, its cells'
    side (below 1 beyond `HEAT_MAP_MAX_SIDE` classes, where cells are averaged together), the
    picture's size, and what the axes say."""

    num_classes: int
    cell: float
    left: int
    top: int
    width: int
    height: int
    labels: tuple[str, ...]  # the class names, cut to fit; () where the axes number classes
    counted: bool  # the count written in each cell
    label_font: int  # px, of the class names or numbers
    column_labels_vertical: bool

    @property
    def side(self) -> int:
        """The matrix's side in px."""
        return round(self.num_classes * self.cell)

    def cell_box(self, true: int, predicted: int) -> tuple[int, int, int, int]:
        """The pixels (left, top, right, bottom; right and bottom exclusive) of the cell of
        class `true` (row) taken for `predicted` (column)."""
        left, top = self.left + round(predicted * self.cell), self.top + round(true * self.cell)
        right = self.left + round((predicted + 1) * self.cell)
        bottom = self.top + round((true + 1) * self.cell)
        return left, top, max(right, left + 1), max(bottom, top + 1)


def confusion_layout(class_names: Sequence[str]) -> ConfusionLayout:
    """The layout of the confusion matrix of `class_names`: it depends on their number and
    widths only, so that a run's matrices keep one size."""
    return _confusion_layout(tuple(str(name) for name in class_names))


@lru_cache(maxsize=8)
def _confusion_layout(class_names: tuple[str, ...]) -> ConfusionLayout:
    """`confusion_layout`, measured once for each set of names."""
    k = len(class_names)
    named, counted = k <= LABELS_MAX_CLASSES, k <= COUNTS_MAX_CLASSES
    if counted:  # cells big enough for a count of 4 digits; the matrix ~500 px
        cell: float = max(28, min(48, 560 // k))
    elif k <= 50:  # a line of text a row
        cell = max(14, 560 // k)
    elif k <= HEAT_MAP_MAX_SIDE:  # 10 px a row at 100 classes, then down to 1 px
        cell = min(14, HEAT_MAP_MAX_SIDE // k)
    else:  # more classes than pixels: cells averaged together
        cell = HEAT_MAP_MAX_SIDE / k
    label_font = max(8, min(12, int(cell) - 3)) if named else 10
    with _style():
        font = _mpl_font(label_font)
        labels = tuple(_fit(name, LABEL_MAX_WIDTH, font) for name in class_names)
        widest = max(labels, key=lambda label: _mpl_width(label, font)) if named else str(k - 1)
        label_width = math.ceil(_mpl_width(widest, font))
        line, title = _mpl_line(font), _mpl_line(_mpl_font(TITLE_FONT)) + 4
        colour_bar = COLOUR_BAR_GAP + COLOUR_BAR_WIDTH + TICK_PAD + _mpl_width("100%", font)
    vertical = named and label_width > cell - 4  # names across the columns would collide
    left = MARGIN + title + label_width + TICK_PAD
    top = MARGIN + title + (label_width if vertical else line) + TICK_PAD
    return ConfusionLayout(
        num_classes=k,
        cell=cell,
        left=left,
        top=top,
        width=left + round(k * cell) + math.ceil(colour_bar) + MARGIN,
        height=top + round(k * cell) + MARGIN,
        labels=labels if named else (),
        counted=counted,
        label_font=label_font,
        column_labels_vertical=vertical,
    )


def confusion_matrix_image(counts: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """The confusion matrix `counts` (K, K), rows the true class and columns the predicted
    one, as a picture (3, H, W): each cell coloured by its share of its row (`colormap`; an
    empty row stays white), its count written in it up to `COUNTS_MAX_CLASSES` classes, rows
    and columns named up to `LABELS_MAX_CLASSES` classes and numbered beyond, the matrix at
    most `HEAT_MAP_MAX_SIDE` px a side, beside a colour bar. `confusion_layout` says where
    each cell is."""
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(
            f"confusion_matrix_image got counts {tuple(counts.shape)} for {k} class names"
        )
    counts = counts.detach().cpu().long()
    names = tuple(str(name) for name in class_names)
    layout = _confusion_layout(names)
    totals = counts.sum(dim=1, keepdim=True)
    colours = colormap(counts / totals.clamp(min=1))  # (K, K, 3)
    colours[totals.squeeze(1) == 0] = 1.0  # nothing to share: white

    matrix = colours.permute(2, 0, 1)  # (3, K, K)
    if layout.cell > 1:
        cell = int(layout.cell)
        matrix = matrix.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    elif layout.cell < 1:  # more classes than pixels: each pixel the cells' mean colour
        matrix = F.adaptive_avg_pool2d(matrix, layout.side)
    picture = _confusion_frame(names).copy()  # (H, W, 3) uint8
    top, left, side = layout.top, layout.left, layout.side
    picture[top : top + side, left : left + side] = _to_uint8(matrix)
    if layout.counted:
        canvas = Image.fromarray(picture)
        draw = ImageDraw.Draw(canvas)
        font = _pil_font(_count_font_size(layout.cell, int(counts.max())))
        ink = (_text_colours(colours, faint=counts == 0) * 255).round().to(torch.uint8).tolist()
        for (true, predicted), count in np.ndenumerate(counts.numpy()):
            left, top, right, bottom = layout.cell_box(true, predicted)
            middle = ((left + right) / 2, (top + bottom) / 2)
            draw.text(middle, str(count), font=font, fill=tuple(ink[true][predicted]), anchor="mm")
        picture = np.asarray(canvas)
    return _from_uint8(picture)


def _count_font_size(cell: float, largest: int) -> int:
    """The largest font, up to 16 px, in which the count `largest` fits in a `cell` px cell
    (digits are all as wide in DejaVu Sans)."""
    width_at_10 = _pil_font(10).getlength("0" * len(str(largest)))
    return max(6, min(16, int(10 * (cell - 4) / width_at_10)))


@lru_cache(maxsize=8)
def _confusion_frame(class_names: tuple[str, ...]) -> np.ndarray:
    """The confusion matrix's picture (H, W, 3) without its cells and counts: class names (or
    numbers), axis titles and the colour bar, drawn by matplotlib once for each set of names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    layout = _confusion_layout(class_names)
    width, height, side = layout.width, layout.height, layout.side

    def box(left: float, top: float, w: float, h: float) -> list[float]:
        """A rectangle in px from the top-left corner, as the figure fractions `add_axes`
        takes."""
        return [left / width, 1 - (top + h) / height, w / width, h / height]

    with _style():
        fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes(box(layout.left, layout.top, side, side))
        ax.set(xlim=(-0.5, layout.num_classes - 0.5), ylim=(layout.num_classes - 0.5, -0.5))
        ax.set_frame_on(False)  # the cells, filled in for each picture, are the frame
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.tick_params(length=2, pad=2, labelsize=_points(layout.label_font))
        if layout.labels:
            ticks = range(layout.num_classes)
            ax.set_xticks(ticks, layout.labels, rotation=90 if layout.column_labels_vertical else 0)
            ax.set_yticks(ticks, layout.labels)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("predicted", fontsize=_points(TITLE_FONT), labelpad=2)
        ax.set_ylabel("true", fontsize=_points(TITLE_FONT), labelpad=2)

        bar = fig.add_axes(
            box(layout.left + side + COLOUR_BAR_GAP, layout.top, COLOUR_BAR_WIDTH, side)
        )
        shares = ScalarMappable(Normalize(0, 1), _colormap())
        fig.colorbar(shares, cax=bar, ticks=[0, 0.5, 1], format=PercentFormatter(1, 0))
        bar.tick_params(length=2, pad=2, labelsize=_points(layout.label_font))
        bar.set_frame_on(False)
        fig.canvas.draw()
    frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    frame.flags.writeable = False  # shared by every picture with these names
    return frame


# ---------------------------------------------------------------------------------------------
# matplotlib and fonts


@cache
def _colormap() -> Colormap:
    # Imported on first use, here and below: a run with pictures off, and vit-predict without
    # --attention, do not pay matplotlib's import (about half a second).
    from matplotlib import colormaps

    return colormaps[COLORMAP]


@contextmanager
def _style() -> Iterator[None]:
    """matplotlib's default style, whatever the user's matplotlibrc says, with class names
    taken as text ("$5 bill" is no formula); and quiet about each letter DejaVu Sans lacks
    (Chinese, say), drawn as a box: a warning a letter would collect in a run's log."""
    from matplotlib import style

    with style.context(["default", {"text.parse_math": False}]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        yield


def _points(px: float) -> float:
    """A font size in px as the points matplotlib takes, at `DPI`."""
    return px * 72 / DPI


@cache
def _font_path() -> str:
    """DejaVu Sans, which matplotlib ships."""
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties(family=FONT))


@cache
def _pil_font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(), px)


@cache
def _mpl_font(px: int) -> FontProperties:
    from matplotlib.font_manager import FontProperties

    return FontProperties(family=FONT, size=_points(px))


@cache
def _measurer() -> RendererAgg:
    """An Agg renderer at `DPI`, to measure text as matplotlib will draw it."""
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, DPI)


def _mpl_width(text: str, font: FontProperties) -> float:
    """The width in px of `text` as matplotlib draws it in `font`."""
    return _measurer().get_text_width_height_descent(text, font, ismath=False)[0]


def _mpl_line(font: FontProperties) -> int:
    """The height in px of a line of `font`, ascenders to descenders."""
    _, height, _ = _measurer().get_text_width_height_descent("lp", font, ismath=False)
    return math.ceil(height)


def _fit(text: str, width: float, font: ImageFont.FreeTypeFont | FontProperties) -> str:
    """`text`, or its longest beginning that fits in `width` px in `font`, followed by "…"."""

    def measure(text: str) -> float:
        if isinstance(font, ImageFont.FreeTypeFont):
            return font.getlength(text)
        return _mpl_width(text, font)

    if measure(text) <= width:
        return text
    low, high = 0, len(text) - 1  # text[:low] + "…" fits (or low is 0); text[:high + 1] not
    while low < high:  # bisect: names can run to a hundred letters
        middle = (low + high + 1) // 2
        if measure(text[:middle].rstrip() + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…"


# ---------------------------------------------------------------------------------------------
# Pixels


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] as (H, W, 3) 8-bit RGB."""
    pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def _from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) 8-bit RGB as (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div(255)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write `image` (3, H, W) in [0, 1] to `path` as an 8-bit RGB PNG."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"save_png takes an image (3, H, W), not {tuple(image.shape)}")
    save_image(image.detach().cpu().float(), os.fspath(path), format="PNG")
