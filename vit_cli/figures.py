"""Pictures for TensorBoard and `vit-predict --attention`: image grids, heat-map overlays and
the confusion matrix, drawn with torch and Pillow (no matplotlib).

Every picture is a float tensor in [0, 1] on the CPU, (3, H, W) for one picture and
(B, 3, H, W) for a batch, the layout TensorBoard's `add_image` takes. Text is drawn with
Pillow's built-in scalable font (`ImageFont.load_default(size=...)`), so no font file has to
be installed. That font has no arrows, so `→` and `←` are drawn as small vector arrows, and
accented letters it lacks are written without their accents.

The size of a picture depends only on the sizes of its inputs, the number of classes and the
class names, never on the captions or counts: pictures of the same run stay the same size from
epoch to epoch.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Grids: the white gap between and around cells, the caption font and the widest grid.
GAP = 4
CAPTION_FONT_SIZE = 12
MAX_COLUMNS = 8

# Confusion matrices: counts are written up to this many classes, class names up to this many,
# and beyond it the matrix is a bare heat map of at most HEAT_MAP_MAX_SIDE px a side.
COUNTS_MAX_CLASSES = 20
LABELS_MAX_CLASSES = 50
HEAT_MAP_MAX_SIDE = 1000
LABEL_MAX_WIDTH = 110  # px; longer class names are cut with "…"
MARGIN = 8
TITLE_FONT_SIZE = 13
COLOUR_BAR_GAP = 10
COLOUR_BAR_WIDTH = 12

BLACK = (0, 0, 0)
DARK = (32, 32, 32)
LIGHT = (255, 255, 255)

# A colour map in the manner of viridis (dark purple → blue → teal → green → yellow), written
# for this module: nine points evenly spaced in t, each at OKLCH lightness 0.27 + 0.66 t, hue
# 305° - 200° t, chroma 0.13 + 0.05 t - 0.06 sin(πt), turned into sRGB. Lightness rising
# evenly makes the map read in order in grey too; the chroma dip keeps the middle in gamut.
COLORMAP_ANCHORS = torch.tensor(
    [
        (0.211, 0.025, 0.343),
        (0.196, 0.189, 0.455),
        (0.153, 0.321, 0.529),
        (0.111, 0.445, 0.578),
        (0.127, 0.566, 0.608),
        (0.232, 0.683, 0.610),
        (0.418, 0.792, 0.562),
        (0.675, 0.880, 0.447),
        (0.982, 0.932, 0.253),
    ]
)

# The glyphs drawn by hand, and their direction.
ARROWS = {"→": 1, "←": -1}
ARROW_SPLIT = re.compile(f"([{''.join(ARROWS)}])")


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
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    min_size: int = 96,
) -> torch.Tensor:
    """`images` (B, 3, H, W) in [0, 1], enlarged (`enlarge`) and laid out in rows on white,
    each with its caption under it when `captions` are given: (3, H', W').

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
    layout = grid_layout(images.shape[-2:], count, columns, captions is not None, min_size)

    canvas = torch.ones(3, layout.height, layout.width)
    for i, image in enumerate(enlarge(images.float(), min_size).clamp(0, 1)):
        left, top, right, bottom = layout.image_box(i)
        canvas[:, top:bottom, left:right] = image
    if captions is None:
        return canvas
    picture = _to_pil(canvas)
    font = _font(CAPTION_FONT_SIZE)
    for i, caption in enumerate(captions):
        _label(picture, layout.caption_box(i), str(caption), font, DARK)
    return _from_pil(picture)


@dataclass(frozen=True)
class GridLayout:
    """Where `image_grid` puts each image and caption: boxes are (left, top, right, bottom)
    in px, right and bottom exclusive."""

    columns: int
    rows: int
    cell_width: int  # the enlarged image's width
    image_height: int  # the enlarged image's height
    caption_height: int  # 0 without captions
    width: int
    height: int

    def image_box(self, i: int) -> tuple[int, int, int, int]:
        row, column = divmod(i, self.columns)
        left = GAP + column * (self.cell_width + GAP)
        top = GAP + row * (self.image_height + self.caption_height + GAP)
        return left, top, left + self.cell_width, top + self.image_height

    def caption_box(self, i: int) -> tuple[int, int, int, int]:
        left, _, right, bottom = self.image_box(i)
        return left, bottom, right, bottom + self.caption_height


def grid_layout(
    image_size: Sequence[int], count: int, columns: int, captioned: bool, min_size: int = 96
) -> GridLayout:
    """The layout of `count` images of `image_size` (H, W) in `columns` columns."""
    height, width = image_size
    factor = max(1, math.ceil(min_size / min(height, width)))
    ascent, descent = _font(CAPTION_FONT_SIZE).getmetrics()
    caption_height = ascent + descent + 4 if captioned else 0
    rows = math.ceil(count / columns)
    cell_width, image_height = width * factor, height * factor
    return GridLayout(
        columns=columns,
        rows=rows,
        cell_width=cell_width,
        image_height=image_height,
        caption_height=caption_height,
        width=GAP + columns * (cell_width + GAP),
        height=GAP + rows * (image_height + caption_height + GAP),
    )


# ---------------------------------------------------------------------------------------------
# Colour


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Colours (..., 3) in [0, 1] of `values` (...) in [0, 1], by linear interpolation between
    `COLORMAP_ANCHORS`: 0 is dark purple, 1 is yellow. Values outside [0, 1] are clamped, and
    NaN is taken as 0."""
    values = values.detach().cpu().float().nan_to_num(0.0).clamp(0, 1)
    position = values * (len(COLORMAP_ANCHORS) - 1)
    lower = position.floor().long().clamp(max=len(COLORMAP_ANCHORS) - 2)
    weight = (position - lower).unsqueeze(-1)
    return torch.lerp(COLORMAP_ANCHORS[lower], COLORMAP_ANCHORS[lower + 1], weight)


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


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    """WCAG relative luminance of sRGB colours (..., 3) in [0, 1]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return linear @ torch.tensor([0.2126, 0.7152, 0.0722])


def _text_colours(backgrounds: torch.Tensor, faint: torch.Tensor) -> torch.Tensor:
    """Colours (..., 3) for text on `backgrounds` (..., 3): black or white, whichever
    contrasts more (they contrast alike at luminance 0.179, where (L + 0.05) / 0.05 =
    1.05 / (L + 0.05)); where `faint` (...) is true, moved 45% of the way to the background,
    still readable but quieter (the zeros of a confusion matrix)."""
    dark = _luminance(backgrounds) > 0.179
    text = torch.where(dark, 0.0, 1.0).unsqueeze(-1).expand_as(backgrounds)
    return torch.where(faint.unsqueeze(-1), torch.lerp(text, backgrounds, 0.45), text)


# ---------------------------------------------------------------------------------------------
# Confusion matrix


@dataclass(frozen=True)
class ConfusionLayout:
    """Where `confusion_matrix_image` draws: the matrix's top-left corner, its cells' side
    (below 1 px beyond `HEAT_MAP_MAX_SIDE` classes, where cells are averaged together), and
    the picture's size. Boxes are (left, top, right, bottom) in px, right and bottom exclusive.
    """

    num_classes: int
    cell: float
    left: int
    top: int
    width: int
    height: int
    labelled: bool  # class names, axis titles and the colour bar
    counted: bool  # the count written in each cell
    column_labels_vertical: bool
    row_label_width: int
    column_label_height: int

    @property
    def side(self) -> int:
        """The matrix's side in px."""
        return round(self.num_classes * self.cell)

    def cell_box(self, true: int, predicted: int) -> tuple[int, int, int, int]:
        """The pixels of the cell of class `true` (row) taken for `predicted` (column)."""
        left, top = self.left + round(predicted * self.cell), self.top + round(true * self.cell)
        right = self.left + round((predicted + 1) * self.cell)
        bottom = self.top + round((true + 1) * self.cell)
        return left, top, max(right, left + 1), max(bottom, top + 1)


def confusion_layout(class_names: Sequence[str]) -> ConfusionLayout:
    """The layout of the confusion matrix of `class_names`: it depends on their number and
    widths only, so that a run's matrices keep one size."""
    k = len(class_names)
    if k > LABELS_MAX_CLASSES:
        # A bare heat map: a few px a cell, down to one, then cells averaged together.
        cell = max(1, HEAT_MAP_MAX_SIDE // k) if k <= HEAT_MAP_MAX_SIDE else HEAT_MAP_MAX_SIDE / k
        side = round(k * cell)
        return ConfusionLayout(
            num_classes=k,
            cell=cell,
            left=0,
            top=0,
            width=side,
            height=side,
            labelled=False,
            counted=False,
            column_labels_vertical=False,
            row_label_width=0,
            column_label_height=0,
        )

    counted = k <= COUNTS_MAX_CLASSES
    # Cells big enough for a count of 4 digits, or for a line of text; the matrix ~500 px.
    cell = max(28, min(48, 560 // k)) if counted else max(14, 560 // k)
    font = _font(_label_font_size(cell))
    names = [_fit(str(name), font, LABEL_MAX_WIDTH) for name in class_names]
    name_width = math.ceil(max(_text_width(name, font) for name in names))
    line_height = sum(font.getmetrics())
    vertical = name_width > cell - 4  # names written across the columns would collide
    column_label_height = name_width + 6 if vertical else line_height + 4
    left = MARGIN + _title_height() + name_width + 6
    top = MARGIN + _title_height() + column_label_height
    colour_bar = COLOUR_BAR_GAP + COLOUR_BAR_WIDTH + 4 + math.ceil(_text_width("100%", font))
    return ConfusionLayout(
        num_classes=k,
        cell=cell,
        left=left,
        top=top,
        width=left + k * cell + colour_bar + MARGIN,
        height=top + k * cell + MARGIN,
        labelled=True,
        counted=counted,
        column_labels_vertical=vertical,
        row_label_width=name_width + 6,
        column_label_height=column_label_height,
    )


def confusion_matrix_image(counts: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
    """The confusion matrix `counts` (K, K), rows the true class and columns the predicted
    one, as a picture (3, H, W): each cell coloured by its share of its row (`colormap`; an
    empty row stays white), its count written in it up to `COUNTS_MAX_CLASSES` classes, rows
    and columns named up to `LABELS_MAX_CLASSES` classes, and beyond that a bare heat map of
    at most `HEAT_MAP_MAX_SIDE` px a side. `confusion_layout` says where each cell is."""
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(
            f"confusion_matrix_image got counts {tuple(counts.shape)} for {k} class names"
        )
    counts = counts.detach().cpu().long()
    layout = confusion_layout(class_names)
    totals = counts.sum(dim=1, keepdim=True)
    colours = colormap(counts / totals.clamp(min=1))  # (K, K, 3)
    colours[totals.squeeze(1) == 0] = 1.0  # nothing to share: white

    matrix = colours.permute(2, 0, 1)  # (3, K, K)
    if layout.cell > 1:
        cell = int(layout.cell)
        matrix = matrix.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    elif layout.cell < 1:  # more classes than pixels: each pixel the cells' mean colour
        matrix = F.adaptive_avg_pool2d(matrix, layout.side)
    if not layout.labelled:
        return matrix.contiguous()

    canvas = torch.ones(3, layout.height, layout.width)
    side = layout.side
    canvas[:, layout.top : layout.top + side, layout.left : layout.left + side] = matrix
    bar_left = layout.left + side + COLOUR_BAR_GAP
    shares = torch.linspace(1, 0, side)  # 1 at the top
    bar = colormap(shares).T.unsqueeze(-1).expand(-1, -1, COLOUR_BAR_WIDTH)
    canvas[:, layout.top : layout.top + side, bar_left : bar_left + COLOUR_BAR_WIDTH] = bar

    picture = _to_pil(canvas)
    _confusion_text(picture, layout, counts, colours, class_names)
    return _from_pil(picture)


def _confusion_text(
    picture: Image.Image,
    layout: ConfusionLayout,
    counts: torch.Tensor,
    colours: torch.Tensor,
    class_names: Sequence[str],
) -> None:
    """Counts, class names, axis titles and colour-bar ticks, drawn on `picture`."""
    if layout.counted:
        _draw_counts(picture, layout, counts, colours)
    _draw_class_names(picture, layout, [str(name) for name in class_names])
    side, title = layout.side, _font(TITLE_FONT_SIZE)
    title_box = (layout.left, MARGIN, layout.left + side, MARGIN + _title_height())
    _label(picture, title_box, "predicted", title, BLACK)
    true_box = (MARGIN, layout.top, MARGIN + _title_height(), layout.top + side)
    _labels_upwards(picture, true_box, [(0, _title_height())], ["true"], title, BLACK)

    font = _font(_label_font_size(int(layout.cell)))
    line = sum(font.getmetrics())
    ticks_left = layout.left + side + COLOUR_BAR_GAP + COLOUR_BAR_WIDTH + 4
    for share, text in ((1.0, "100%"), (0.5, "50%"), (0.0, "0%")):
        middle = layout.top + round((1 - share) * (side - 1))
        top = min(max(middle - line // 2, layout.top), layout.top + side - line)  # inside the bar
        _label(picture, (ticks_left, top, layout.width, top + line), text, font, DARK, "left")


def _draw_counts(
    picture: Image.Image, layout: ConfusionLayout, counts: torch.Tensor, colours: torch.Tensor
) -> None:
    """Each cell's count, in black or white against its colour, zeros fainter."""
    font = _font(_count_font_size(int(layout.cell), int(counts.max())))
    ink = (_text_colours(colours, faint=counts == 0) * 255).round().to(torch.uint8).tolist()
    for t, row in enumerate(counts.tolist()):
        for p, count in enumerate(row):
            _label(picture, layout.cell_box(t, p), str(count), font, tuple(ink[t][p]))


def _draw_class_names(picture: Image.Image, layout: ConfusionLayout, names: list[str]) -> None:
    """The names left of the rows and above the columns: across the columns when they fit
    in a cell's width, else reading upwards from the matrix."""
    cell, font = int(layout.cell), _font(_label_font_size(int(layout.cell)))
    for i, name in enumerate(names):
        left, top, _, bottom = layout.cell_box(i, 0)
        row_box = (left - layout.row_label_width, top, left - 4, bottom)
        _label(picture, row_box, name, font, DARK, align="right", max_width=LABEL_MAX_WIDTH)
    top, bottom = layout.top - layout.column_label_height, layout.top - 2
    spans = [(i * cell, (i + 1) * cell) for i in range(layout.num_classes)]
    if layout.column_labels_vertical:
        box = (layout.left, top, layout.left + layout.side, bottom)
        _labels_upwards(picture, box, spans, names, font, DARK, align="left")
        return
    for (start, end), name in zip(spans, names, strict=True):
        _label(picture, (layout.left + start, top, layout.left + end, bottom), name, font, DARK)


def _title_height() -> int:
    """The height of a line of the axis titles."""
    return sum(_font(TITLE_FONT_SIZE).getmetrics()) + 4


def _label_font_size(cell: int) -> int:
    """Class names fit in rows of `cell` px."""
    return max(8, min(12, cell - 3))


def _count_font_size(cell: int, largest: int) -> int:
    """The largest font, up to 16 px, in which the count `largest` fits in a `cell` px cell."""
    for size in range(16, 6, -1):
        if _text_width(str(largest), _font(size)) <= cell - 4:
            return size
    return 7


# ---------------------------------------------------------------------------------------------
# Text


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Aileron) at `size` px."""
    return ImageFont.load_default(size=size)


@cache
def _cap_height(size: int) -> int:
    """The height of the digits and capitals above the baseline of the `size` px font."""
    return -_font(size).getbbox("0", anchor="ls")[1]


@lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    """Whether the font draws `char`, rather than the box it draws for a missing glyph."""

    def drawn(c: str) -> bytes:
        canvas = Image.new("L", (40, 40))
        ImageDraw.Draw(canvas).text((4, 4), c, font=_font(24), fill=255)
        return canvas.tobytes()

    return drawn(char) != drawn("\uffff")


@lru_cache(maxsize=4096)
def _drawable(text: str) -> str:
    """`text` with each letter the font lacks replaced by its unaccented form, where that
    helps (é → e); arrows (`ARROWS`) are kept, to be drawn by hand."""
    out = []
    for char in text:
        if char in ARROWS or _has_glyph(char):
            out.append(char)
            continue
        base = "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        out.append(base if base and all(_has_glyph(c) for c in base) else char)
    return "".join(out)


def _arrow_width(size: int) -> int:
    """The width in px of an arrow, spacing included, for a `size` px font: a square."""
    return size


@lru_cache(maxsize=4096)
def _text_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    """The width of `text` in px, arrows included (`font` is one of `_font`'s, kept)."""
    text = _drawable(text)
    arrows = sum(text.count(a) for a in ARROWS)
    plain = "".join(c for c in text if c not in ARROWS)
    return font.getlength(plain) + arrows * _arrow_width(font.size)


def _fit(text: str, font: ImageFont.FreeTypeFont, width: float) -> str:
    """`text`, or its longest beginning that fits in `width` px followed by "…"."""
    if _text_width(text, font) <= width:
        return text
    low, high = 0, len(text) - 1  # text[:low] + "…" fits (or low is 0); text[:high + 1] not
    while low < high:  # bisect: names can run to a hundred letters
        middle = (low + high + 1) // 2
        if _text_width(text[:middle].rstrip() + "…", font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…"


@lru_cache(maxsize=32)
def _arrow_mask(size: int, direction: int) -> Image.Image:
    """An arrow (an 'L' mask) `_arrow_width` wide for a `size` px font, as the font has no
    arrow glyphs: drawn four times larger and shrunk, for smooth edges."""
    scale = 4
    width, height = _arrow_width(size) * scale, round(0.7 * size) * scale
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    middle, stroke = height // 2, max(scale, round(size * scale / 11))
    start, tip = 2 * scale, width - scale - stroke // 2
    head = round(0.3 * size * scale)
    draw.line([(start, middle), (tip, middle)], fill=255, width=stroke)
    draw.line([(tip - head, middle - head), (tip, middle), (tip - head, middle + head)],
              fill=255, width=stroke, joint="curve")  # fmt: skip
    mask = mask.resize((width // scale, height // scale), Image.Resampling.BOX)
    return mask if direction > 0 else mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _draw_text(
    picture: Image.Image,
    x: float,
    baseline: float,
    text: str,
    font: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
) -> None:
    """`text` on `picture` from `x`, standing on `baseline`, with arrows drawn by hand."""
    draw = ImageDraw.Draw(picture)
    for piece in ARROW_SPLIT.split(_drawable(text)):  # text, arrow, text, ...
        if piece in ARROWS:
            mask = _arrow_mask(font.size, ARROWS[piece])
            top = round(baseline - _cap_height(font.size) / 2 - mask.height / 2)
            picture.paste(fill, (round(x), top), mask)
            x += mask.width
        elif piece:
            draw.text((x, baseline), piece, font=font, fill=fill, anchor="ls")
            x += font.getlength(piece)


def _label(
    picture: Image.Image,
    box: tuple[int, int, int, int],
    text: str,
    font: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    align: str = "center",
    max_width: float | None = None,
) -> None:
    """`text` in `box` (left, top, right, bottom): cut to its width (and `max_width`),
    aligned `align` ("left", "center" or "right"), its capitals centred vertically."""
    left, top, right, bottom = box
    text = _fit(text, font, min(right - left - 2, max_width or math.inf))
    width = _text_width(text, font)
    x = {"left": left, "center": (left + right - width) / 2, "right": right - width}[align]
    _draw_text(picture, x, (top + bottom + _cap_height(font.size)) / 2, text, font, fill)


def _labels_upwards(
    picture: Image.Image,
    box: tuple[int, int, int, int],
    spans: Sequence[tuple[int, int]],
    texts: Sequence[str],
    font: ImageFont.FreeTypeFont,
    fill: tuple[int, int, int],
    align: str = "center",
) -> None:
    """`texts` in `box`, turned a quarter left to read upwards, text i across the columns
    `spans[i]` (start, end) px from the box's left; "left" starts them at the box's bottom.
    Drawn on the box lying down, then rotated: one rotation for them all."""
    left, top, right, bottom = box
    lying = Image.new("RGB", (bottom - top, right - left), LIGHT)
    for (start, end), text in zip(spans, texts, strict=True):
        _label(lying, (0, start, lying.width, end), text, font, fill, align=align)
    picture.paste(lying.transpose(Image.Transpose.ROTATE_90), (left, top))


# ---------------------------------------------------------------------------------------------
# Pixels


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] as an 8-bit RGB image."""
    pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _from_pil(picture: Image.Image) -> torch.Tensor:
    """An RGB image as (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float().div(255)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write `image` (3, H, W) in [0, 1] to `path` as an 8-bit RGB PNG."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"save_png takes an image (3, H, W), not {tuple(image.shape)}")
    _to_pil(image).save(os.fspath(path), format="PNG")
