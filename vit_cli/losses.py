"""Training losses: the base criterion, and DeiT's distillation through the dist head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit_cli.errors import UserError

DISTILL_TYPES = ("none", "soft", "hard")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (B, K), averaged over the batch.

    For Mixup/CutMix: the targets are already label-smoothed and mixed (`MixupCutmix`), so
    no smoothing happens here.
    """
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class SoftTargetCrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_target_cross_entropy(logits, targets)


def soft_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at temperature tau, times tau^2, per sample.

    The tau^2 factor keeps the gradient scale independent of the temperature (Hinton et
    al., 2015). The KL is averaged over the batch (DeiT's official code instead divides the
    summed KL by batch x classes, which makes the term smaller by the number of classes).
    """
    return (
        F.kl_div(
            F.log_softmax(student_logits / tau, dim=1),
            F.log_softmax(teacher_logits / tau, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * tau**2
    )


def hard_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy against the teacher's hard decision (its argmax), as in DeiT."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


# What a training loss returns: the loss, the logits the model predicts with (B, K), for
# the running train accuracy, and named parts of the loss to log.
LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class ClassificationLoss:
    """The loss of a single-head model: `base` on its logits (cross-entropy, or the soft
    target cross-entropy of Mixup/CutMix)."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
    ) -> LossOutput:
        return self.base(logits, targets), logits, {}


class DistillationLoss:
    """The loss of a DeiT student from both heads' logits (`set_both_heads`), in parts.

    `(1 - alpha) * base(class head, labels) + alpha * distillation(dist head)`, where the
    distillation target is the teacher's output on the same augmented batch. With no
    teacher, the distillation head is trained on the labels too (this is not distillation).

    With Mixup/CutMix, `targets` are the mixed soft targets (B, K) and `base` a
    SoftTargetCrossEntropy; the teacher sees the mixed images and hard distillation still
    uses its argmax, as in DeiT's training code.
    """

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module | None = None,
        kind: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
    ) -> None:
        if kind not in DISTILL_TYPES:
            raise UserError(
                f"Unknown distill.type={kind!r}. Valid types: {', '.join(DISTILL_TYPES)}."
            )
        self.base = base
        self.teacher = teacher if kind != "none" else None
        self.kind = kind
        self.alpha = alpha
        self.tau = tau

    def __call__(
        self,
        images: torch.Tensor,
        heads: tuple[torch.Tensor, torch.Tensor],
        targets: torch.Tensor,
    ) -> LossOutput:
        cls_logits, dist_logits = heads
        base_loss = self.base(cls_logits, targets)
        if self.teacher is None:
            distill_loss = self.base(dist_logits, targets)
        else:
            # Runs under the caller's autocast, so the teacher sees the student's precision.
            with torch.no_grad():
                teacher_logits = self.teacher(images).float()
            if self.kind == "soft":
                distill_loss = soft_distillation_loss(dist_logits.float(), teacher_logits, self.tau)
            else:
                distill_loss = hard_distillation_loss(dist_logits, teacher_logits)
        loss = (1 - self.alpha) * base_loss + self.alpha * distill_loss
        parts = {"loss_base": base_loss.detach(), "loss_distill": distill_loss.detach()}
        return loss, (cls_logits + dist_logits) / 2, parts
