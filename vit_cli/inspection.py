"""What a run shows in TensorBoard besides its curves: pictures, the config, the model's size.

Pictures: the confusion matrix of val, the val images the model gets wrong, attention maps
of a fixed set of val images (`attention.attention_maps`), and the first training batch as
the model takes it. `ValSnapshot` collects what they need while val is scored, at no cost
to training; `Pictures` renders them (`figures`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vit_cli.attention import AttentionMaps, attention_maps
from vit_cli.evaluation import count_confusion
from vit_cli.figures import confusion_matrix_image, denormalize, heat_overlay, image_grid

# Beyond this many classes the counts are left out of the Text tab: too wide to read.
COUNTS_TABLE_MAX_CLASSES = 50


class ValSnapshot:
    """Fed each val batch by `evaluate`: the confusion counts of this process, its first
    images (the same ones every epoch: val is not shuffled) and the first it gets wrong."""

    def __init__(self, num_classes: int, keep_first: int, keep_wrong: int) -> None:
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.keep_first, self.keep = keep_first, keep_wrong
        self.first: list[torch.Tensor] = []  # normalised images (C, H, W)
        self.wrong: list[tuple[torch.Tensor, int, int, float]] = []  # image, true, pred, prob

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        probs, predicted = logits.softmax(dim=1).max(dim=1)
        count_confusion(self.confusion, targets.cpu(), predicted.cpu())
        if len(self.first) < self.keep_first:
            self.first += list(images[: self.keep_first - len(self.first)].cpu())
        if len(self.wrong) < self.keep:
            for i in (predicted != targets).nonzero().flatten().tolist():
                if len(self.wrong) == self.keep:
                    break
                image = images[i].cpu()
                self.wrong.append((image, int(targets[i]), int(predicted[i]), float(probs[i])))


class Pictures:
    """Renders a run's pictures for TensorBoard: images de-normalised to their colours."""

    def __init__(
        self,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        per_grid: int,
    ) -> None:
        self.class_names = list(class_names)
        self.mean, self.std = list(mean), list(std)
        self.per_grid = per_grid

    def snapshot(self) -> ValSnapshot:
        # Attention maps take a row per image: half as many images as the other grids.
        return ValSnapshot(len(self.class_names), max(1, self.per_grid // 2), self.per_grid)

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's first images, captioned with their label; a mixed image (Mixup,
        CutMix) with its dominant label and that label's weight."""
        images, targets = images[: self.per_grid], targets[: self.per_grid]
        if targets.ndim == 2:  # (B, K) label distributions
            weights, labels = targets.max(dim=1)
            captions = [
                f"{self.class_names[k]} ({w:.2f})"
                for k, w in zip(labels.tolist(), weights.tolist(), strict=True)
            ]
        else:
            captions = [self.class_names[k] for k in targets.tolist()]
        return image_grid(denormalize(images, self.mean, self.std), captions)

    def val(self, snapshot: ValSnapshot, confusion: torch.Tensor, model: nn.Module) -> dict:
        """TensorBoard tag -> picture (3, H, W) for val; `confusion` sums all processes'."""
        names = self.class_names
        pictures = {"val/confusion_matrix": confusion_matrix_image(confusion, names)}
        if snapshot.wrong:
            images = torch.stack([image for image, *_ in snapshot.wrong])
            captions = [f"{names[t]} → {names[p]} ({prob:.2f})" for _, t, p, prob in snapshot.wrong]
            pictures["val/misclassified"] = image_grid(
                denormalize(images, self.mean, self.std), captions
            )
        if snapshot.first:
            pictures["val/attention"] = self.attention(model, torch.stack(snapshot.first))
        return pictures

    def attention(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Attention maps of normalised `images`, a row per image (`attention_grid`)."""
        shown = denormalize(images, self.mean, self.std)
        return attention_grid(attention_maps(model, images), shown, self.class_names)


def attention_grid(
    maps: AttentionMaps, shown: torch.Tensor, class_names: Sequence[str]
) -> torch.Tensor:
    """A row per image of `shown` (B, 3, H, W): the image, captioned with its predicted
    class, its rollout or Grad-CAM map, and for ViT and DeiT the last block's class-token
    attention of each head."""
    columns = [shown, heat_overlay(shown, maps.maps)]
    titles = ["", maps.method]
    if maps.heads is not None:
        for h in range(maps.heads.shape[1]):
            columns.append(heat_overlay(shown, maps.heads[:, h]))
            titles.append(f"head {h + 1}")
    cells, captions = [], []
    for i, predicted in enumerate(maps.predicted.tolist()):
        for column, title in zip(columns, titles, strict=True):
            cells.append(column[i])
            captions.append(title or f"→ {class_names[predicted]}")
    return image_grid(torch.stack(cells), captions, columns=len(columns))


def confusion_table(confusion: torch.Tensor, class_names: Sequence[str]) -> str | None:
    """The counts as a fixed-width table (rows true, columns predicted), or None when there
    are too many classes to read it."""
    if len(class_names) > COUNTS_TABLE_MAX_CLASSES:
        return None
    names = [str(n) for n in class_names]
    width = max(5, *(len(n) for n in names), len(str(int(confusion.max()))))
    header = "true \\ pred".ljust(width + 2) + " ".join(n.rjust(width) for n in names)
    rows = [
        names[t].ljust(width + 2) + " ".join(str(int(c)).rjust(width) for c in confusion[t])
        for t in range(len(names))
    ]
    return "\n".join([header, *rows])


def model_summary(model: nn.Module, depth: int = 2) -> str:
    """Parameters per module, down to `depth` levels of nesting, and in total."""
    rows = [("(total)", type(model).__name__, sum(p.numel() for p in model.parameters()))]
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            count = sum(p.numel() for p in module.parameters())
            rows.append((name, type(module).__name__, count))
    width = max(len(name) for name, _, _ in rows)
    kind = max(len(kind) for _, kind, _ in rows)
    return "\n".join(
        f"{name.ljust(width)}  {kind_.ljust(kind)}  {count:>12,}" for name, kind_, count in rows
    )
