"""Teachers for distillation: a vit-train checkpoint, or a torchvision model with local weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vit_cli.checkpoint import (
    UnreadableFile,
    load_checkpoint,
    load_model_state,
    torch_load_weights,
)
from vit_cli.config import TeacherConfig
from vit_cli.errors import UserError
from vit_cli.models.factory import model_from_checkpoint

log = logging.getLogger(__name__)


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode without gradients, adapting the student's batch.

    The batch is resized to the teacher's resolution and grayscale is repeated to the
    teacher's channels, so a teacher trained at another size still sees the same images.
    """

    def __init__(self, model: nn.Module, img_size: int | None, in_chans: int) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.img_size = img_size
        self.in_chans = in_chans

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        if self.in_chans != C:
            images = images.expand(B, self.in_chans, H, W)  # grayscale -> (B, 3, H, W)
        if self.img_size is not None and (self.img_size, self.img_size) != (H, W):
            images = F.interpolate(
                images, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )
        return self.model(images)


def _from_checkpoint(path: str, num_classes: int, in_chans: int) -> FrozenTeacher:
    ckpt = load_checkpoint(path)
    teacher_classes = ckpt["data"]["num_classes"]
    if teacher_classes != num_classes:
        raise UserError(
            f"Teacher {path} predicts {teacher_classes} classes but the data has {num_classes}. "
            "Use a teacher trained on the same data."
        )
    if ckpt["data"]["in_chans"] != in_chans:
        raise UserError(
            f"Teacher {path} takes {ckpt['data']['in_chans']} channels but the data has {in_chans}."
        )
    model = model_from_checkpoint(ckpt, source=path)
    return FrozenTeacher(model, ckpt["data"]["img_size"], in_chans)


def _from_torchvision(
    arch: str, weights: str | None, num_classes: int, in_chans: int
) -> FrozenTeacher:
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = [name for name in available if name.startswith(arch[:3])][:8]
        raise UserError(
            f"distill.teacher.arch={arch!r} is not a torchvision classification model. "
            f"Similar names: {', '.join(close) or 'none'}; all: torchvision.models.list_models()."
        )
    if weights is None:
        raise UserError(
            f"distill.teacher.arch={arch} needs distill.teacher.weights=<state_dict file>: "
            "weights are never downloaded."
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"distill.teacher.weights={weights} does not exist.")
    try:
        state = torch_load_weights(path)
    except UnreadableFile as e:
        raise UserError(
            f"distill.teacher.weights={weights} is not a readable state_dict ({e.reason})."
        ) from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        load_model_state(model, state, source=weights)
    except UserError as e:
        raise UserError(f"Teacher {arch} with {num_classes} classes (the data's): {e}") from e
    # Convolutions in channels-last run faster in oneDNN and in cuDNN under autocast: a
    # ResNet-18 teacher at 28 px infers 1.7x as many images a second on one CPU thread.
    model = model.to(memory_format=torch.channels_last)
    # torchvision classifiers take RGB; grayscale batches are repeated to 3 channels.
    return FrozenTeacher(model, img_size=None, in_chans=max(3, in_chans))


def build_teacher(cfg: TeacherConfig, num_classes: int, in_chans: int) -> FrozenTeacher | None:
    """The configured teacher, or None when neither a checkpoint nor an arch is given."""
    if cfg.checkpoint and cfg.arch:
        raise UserError("Set distill.teacher.checkpoint or distill.teacher.arch, not both.")
    if cfg.checkpoint:
        return _from_checkpoint(cfg.checkpoint, num_classes, in_chans)
    if cfg.arch:
        return _from_torchvision(cfg.arch, cfg.weights, num_classes, in_chans)
    return None
