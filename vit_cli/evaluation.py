"""Scoring a model on a loader: the one eval loop that `vit-train` and `vit-eval` share."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vit_cli.errors import UserError
from vit_cli.precision import Precision

# Called with each batch's images (B, C, H, W), as the model took them, its merged logits
# (B, K) in fp32 and its targets (B,), on the device.
BatchObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def count_confusion(
    confusion: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor
) -> None:
    """Add one to `confusion[target, predicted]` (K, K) for each pair, in place."""
    confusion.index_put_((targets, predicted), confusion.new_ones(len(targets)), accumulate=True)


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """How many targets fall in the top-k predictions, for each k."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hits = top == targets.unsqueeze(1)  # (B, maxk)
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    precision: Precision,
    device: torch.device,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    observe: BatchObserver | None = None,
) -> dict[str, float]:
    """Val loss (plain cross-entropy), top-1 and top-5 accuracy in percent.

    `model` returns logits, or the two heads' logits of a DeiT student whose both heads are
    on (`set_both_heads`): then `acc1` is that of their average (its prediction), and
    `acc1_cls` and `acc1_dist` those of each head alone. With several processes, each
    scores its own share of the val set and `reduce` (`Runtime.sum`) adds up the counts of
    all of them, so every image counts once. `observe`, when given, sees every batch's
    images, logits and targets (vit-eval and the TensorBoard pictures build their confusion
    matrix from them).
    """
    model.eval()
    # Batches scored head by head are counted, and summed over the processes with the rest,
    # so that every process reports the heads' figures, one that saw no batch too.
    total_loss, count, two_head_batches = 0.0, 0, 0
    hits = {"acc1": 0, "acc5": 0, "acc1_cls": 0, "acc1_dist": 0}
    for images, targets in loader:
        if len(targets) == 0:
            continue  # every file of the batch was unreadable (counted by the data)
        images, targets = (
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        with precision.autocast():
            outputs = model(images)
        if isinstance(outputs, tuple):
            cls_logits, dist_logits = outputs
            two_head_batches += 1
            hits["acc1_cls"] += accuracy_counts(cls_logits, targets, (1,))[0]
            hits["acc1_dist"] += accuracy_counts(dist_logits, targets, (1,))[0]
            outputs = (cls_logits + dist_logits) / 2
        logits = outputs.float()
        total_loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        c1, c5 = accuracy_counts(logits, targets, (1, 5))
        hits["acc1"] += c1
        hits["acc5"] += c5
        if observe is not None:
            observe(images, logits, targets)
        count += len(targets)
    if reduce is not None:
        sums = [total_loss, count, two_head_batches, *hits.values()]
        totals = reduce(torch.tensor(sums, dtype=torch.float64))
        total_loss, count, two_head_batches = float(totals[0]), int(totals[1]), int(totals[2])
        hits = {k: int(v) for k, v in zip(hits, totals[3:].tolist(), strict=True)}
    if count == 0:
        raise UserError("The val data holds no readable images, so there is nothing to score.")
    if not two_head_batches:
        del hits["acc1_cls"], hits["acc1_dist"]
    return {"loss": total_loss / count, **{k: 100.0 * v / count for k, v in hits.items()}}
