"""Optimizer with weight-decay exclusions and fine-tuning lr scales, and the per-step
learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from vit_cli.config import FREEZE_CHOICES, OptimizerConfig, SchedulerConfig
from vit_cli.errors import UserError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")


def is_head(name: str, model: nn.Module) -> bool:
    """Whether the parameter `name` belongs to a head the model names (`classifiers`: DeiT's
    distillation head too)."""
    return name.split(".")[0] in getattr(model, "classifiers", ())


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Every parameter's layer (0 = embeddings), and the layer L of the final norm and head,
    as the model numbers them (`layer_ids()`, beside each model family)."""
    if not hasattr(model, "layer_ids"):
        raise UserError(
            f"optimizer.layer_decay supports the vit, deit and swin models, not "
            f"{type(model).__name__}. Set optimizer.layer_decay=null."
        )
    ids = model.layer_ids()
    return ids, max(ids.values())


def lr_scales(
    model: nn.Module, layer_decay: float | None = None, head_lr_scale: float = 1.0
) -> dict[str, float]:
    """Each parameter's multiple of the base lr: layer_decay ** (L - layer), so that the
    head's layer has 1 and the embeddings layer_decay ** L, times head_lr_scale for the
    head(s)."""
    if layer_decay is None:
        scales = dict.fromkeys((name for name, _ in model.named_parameters()), 1.0)
    else:
        ids, last = layer_ids(model)
        scales = {name: layer_decay ** (last - layer) for name, layer in ids.items()}
    return {name: s * head_lr_scale if is_head(name, model) else s for name, s in scales.items()}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    layer_decay: float | None = None,
    head_lr_scale: float = 1.0,
) -> list[dict]:
    """Split the trainable parameters into groups by weight decay and lr scale.

    Biases and norm weights (every 1-D parameter) and the names a model lists in
    `no_weight_decay()` (position embeddings, class/distillation tokens, relative position
    bias tables) take no weight decay, following the ViT, DeiT and Swin training code.

    Each group's `lr` is lr times its scale (`lr_scales`): the scheduler (a LambdaLR)
    multiplies every group's initial lr by the schedule's factor, so the scales hold at
    every step. Frozen parameters (requires_grad False) are left out. Groups come with the
    unscaled ones first, which the loop logs as the lr, then by falling lr. Without layer
    decay and head scale these are the two groups (decayed, then not) that runs have always
    had, even when one is empty, so that earlier checkpoints load.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    scales = lr_scales(model, layer_decay, head_lr_scale)
    # Keyed by (lr scale, whether it decays).
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    if layer_decay is None and head_lr_scale == 1.0:
        groups = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or name.split(".")[-1] in skip)
        groups.setdefault((scales[name], decayed), []).append(param)

    def order(key: tuple[float, bool]) -> tuple:
        scale, decayed = key
        return scale != 1.0, -scale, not decayed

    return [
        {"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0, "lr": lr * key[0]}
        for key in sorted(groups, key=order)
    ]


def freeze(model: nn.Module, what: str | None) -> None:
    """Turn off the gradients of what trainer.freeze names; the optimizer then skips them.

    `backbone`: everything but the head(s), a linear probe. Call it before DDP wraps the
    model, which registers only the parameters that need gradients.
    """
    if what is None:
        return
    if what != "backbone":
        raise UserError(
            f"Unknown trainer.freeze={what!r}. Valid values: null, {', '.join(FREEZE_CHOICES)}."
        )
    if not any(is_head(name, model) for name, _ in model.named_parameters()):
        heads = ", ".join(f"{head}.*" for head in getattr(model, "classifiers", ()))
        raise UserError(
            f"trainer.freeze=backbone found no head parameters ({heads or 'no heads named'}) "
            f"in {type(model).__name__}; set trainer.freeze=null."
        )
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name, model))


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_decay, cfg.head_lr_scale)
    if cfg.name == "adamw":
        # One fused kernel for all parameters, instead of a dozen small ops per parameter
        # tensor; torch has it for CPU and CUDA.
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise UserError(f"Unknown optimizer.name={cfg.name!r}. Valid names: {', '.join(OPTIMIZERS)}.")


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, min_factor: float, cosine: bool
) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then cosine decay to `min_factor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: SchedulerConfig,
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A schedule stepped once per optimizer step (not per epoch).

    LambdaLR multiplies each group's initial lr by the one factor of `lr_factor`, so a group
    whose lr `param_groups` scaled keeps its scale throughout: it warms up to base_lr * scale
    and decays to min_lr * scale (as in BEiT's layer-decay fine-tuning), not to min_lr.
    """
    if cfg.name not in SCHEDULERS:
        raise UserError(
            f"Unknown scheduler.name={cfg.name!r}. Valid names: {', '.join(SCHEDULERS)}."
        )
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    if 0 < total_steps <= warmup_steps:
        log.warning(
            "scheduler.warmup_epochs=%g spans the whole run (%d steps): the lr rises until the "
            "end and never decays. For a short run, such as a fine-tune, lower "
            "scheduler.warmup_epochs (0 for none).", cfg.warmup_epochs, total_steps,
        )  # fmt: skip
    min_factor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    cosine = cfg.name == "cosine"
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_factor, cosine)
    )
