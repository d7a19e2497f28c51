"""The parts of a training run, built from its config: `build_components`.

Read top to bottom, this is how a `TrainConfig` becomes a run: precision, data, the model
and the module that steps it (DDP, torch.compile), the loss, the optimizer side, the
weight average and the teacher. Nothing here trains: `loop.train_one_epoch` runs what
`Components.training` holds, and `trainer.fit` the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vit_cli.augment import MixupCutmix
from vit_cli.config import TrainConfig
from vit_cli.data import DataBundle, build_data, prepare_data
from vit_cli.ema import ModelEma
from vit_cli.errors import UserError
from vit_cli.loop import LoopSettings, Training, Updater
from vit_cli.losses import ClassificationLoss, DistillationLoss, SoftTargetCrossEntropy
from vit_cli.models import build_model
from vit_cli.optim import build_optimizer, build_scheduler, freeze
from vit_cli.precision import resolve_precision
from vit_cli.pretrained import LoadReport, load_pretrained
from vit_cli.runtime import Runtime
from vit_cli.teacher import FrozenTeacher, build_teacher


@dataclass
class Components:
    model: nn.Module  # the bare model: what checkpoints hold and the weight average follows
    # What the loop trains with: the stepped module is the model (a DeiT student with both
    # heads on), under DDP with several processes and compiled with trainer.compile.
    training: Training
    eval_model: nn.Module  # what val scores: the stepped module, without DDP
    data: DataBundle
    img_size: int
    num_params: int
    ema: ModelEma | None
    ema_eval_model: nn.Module | None  # the weight average, as `eval_model` views the model
    teacher: FrozenTeacher | None
    distilling: bool  # a teacher is set and distill.type is not none
    pretrained: LoadReport | None  # what model.pretrained's file gave the model


def build_components(
    cfg: TrainConfig, runtime: Runtime, with_pretrained: bool = True
) -> Components:
    """Every part of the run `cfg` describes, on this process's device and share of the data.

    `with_pretrained=False` leaves out model.pretrained's weights: a resumed run takes its
    weights from its checkpoint.
    """
    device = runtime.device
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)

    # The model decides the resolution when it names one; the data is resized to it.
    img_size = cfg.model.img_size or cfg.data.img_size
    generator = torch.Generator()
    with runtime.main_first():  # the main process extracts an archive before others read it
        prepare_data(cfg.data)
    data = build_data(
        cfg.data, img_size, generator, pin_memory=device.type == "cuda", runtime=runtime
    )
    model = build_model(cfg.model, img_size, data.in_chans, data.num_classes)
    pretrained = None
    if cfg.model.pretrained and with_pretrained:
        # Before anything copies the weights: the weight average, DDP's broadcast.
        pretrained = load_pretrained(model, cfg.model.pretrained, ema=cfg.model.pretrained_ema)
    model = model.to(device)
    model.set_grad_checkpointing(cfg.trainer.activation_checkpointing)
    # Before DDP wraps the model: it registers only the parameters that need gradients.
    freeze(model, cfg.trainer.freeze)
    # A DeiT student trains and is scored through both heads. Set on the model before DDP
    # and torch.compile wrap its forward, so that the forward they run returns both too.
    heads = hasattr(model, "set_both_heads")
    if heads:
        model.set_both_heads(True)
    # DDP gives every process rank 0's initial weights here, before anything copies them.
    step_model = runtime.wrap(model)

    accumulate = cfg.trainer.accumulate
    steps_per_epoch = len(data.train_loader) // accumulate
    if steps_per_epoch == 0:
        raise UserError(
            f"trainer.accumulate={accumulate} needs at least {accumulate} batches per epoch, "
            f"but the training data gives {len(data.train_loader)}. Lower it or data.batch_size."
        )
    total_steps = cfg.trainer.epochs * steps_per_epoch
    if cfg.trainer.max_steps is not None:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(
        cfg.scheduler, optimizer, cfg.optimizer.lr, steps_per_epoch, total_steps
    )
    scaler = precision.grad_scaler()

    teacher = build_teacher(cfg.distill.teacher, data.num_classes, data.in_chans)
    if teacher is not None:
        if not heads:
            raise UserError(
                f"A teacher is set but model={cfg.model.name} has no distillation head. "
                "Use model=deit (model.distilled=true) as the student."
            )
        teacher = teacher.to(device)
    aug = cfg.data.augment
    mixer = None
    if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
        # The mixer smooths the labels before mixing them, so the loss must not smooth again.
        mixer = MixupCutmix(
            data.num_classes, aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob,
            aug.mix_switch_prob, cfg.trainer.label_smoothing,
        )  # fmt: skip
    base = (
        SoftTargetCrossEntropy()
        if mixer
        else nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    )
    if heads:
        distill = cfg.distill
        loss_fn = DistillationLoss(base, teacher, distill.type, distill.alpha, distill.tau)
    else:
        loss_fn = ClassificationLoss(base)

    ema = None
    ema_eval_model = None
    if cfg.trainer.ema.decay is not None:
        ema = ModelEma(model, cfg.trainer.ema.decay, cfg.trainer.ema.warmup)
        ema_eval_model = ema.module  # a copy of the model: both heads on as well

    eval_model = model
    if cfg.trainer.compile:
        mode = cfg.trainer.compile_mode
        eval_model = torch.compile(model, mode=mode)
        # One process steps the module it scores; under DDP the wrapper is compiled, so that
        # the compiler splits the graph at DDP's gradient buckets and keeps their overlap.
        step_model = eval_model if step_model is model else torch.compile(step_model, mode=mode)

    training = Training(
        model=step_model,
        data=data,
        loss_fn=loss_fn,
        updater=Updater(
            model, optimizer, scheduler, scaler, accumulate, cfg.trainer.grad_clip, ema
        ),
        precision=precision,
        runtime=runtime,
        settings=LoopSettings(
            epochs=cfg.trainer.epochs,
            seed=cfg.seed,
            max_bad_steps=cfg.trainer.max_bad_steps,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
        ),
        mixer=mixer,
    )
    return Components(
        model=model,
        training=training,
        eval_model=eval_model,
        data=data,
        img_size=img_size,
        num_params=sum(p.numel() for p in model.parameters()),
        ema=ema,
        ema_eval_model=ema_eval_model,
        teacher=teacher,
        distilling=teacher is not None and cfg.distill.type != "none",
        pretrained=pretrained,
    )
