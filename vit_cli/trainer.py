"""The training loop: `train_one_epoch`, `evaluate` and `fit`, which wires the builders together."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from vit_cli.augment import MixupCutmix
from vit_cli.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from vit_cli.config import TrainConfig, validate
from vit_cli.data import build_data
from vit_cli.ema import ModelEma
from vit_cli.errors import UserError
from vit_cli.evaluation import evaluate, merged_logits
from vit_cli.losses import SoftTargetCrossEntropy, TrainingLoss
from vit_cli.models import build_model
from vit_cli.optim import build_optimizer, build_scheduler
from vit_cli.precision import Precision, resolve_precision
from vit_cli.run_log import RunLogger, is_main_process
from vit_cli.teacher import build_teacher

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    best_acc1: float = 0.0
    best_epoch: int = 0
    best_ema_acc1: float = 0.0  # best val top-1 of the weight average (trainer.ema)
    bad_steps: int = 0  # consecutive steps with a non-finite loss
    # Loader batches of the current epoch already consumed, trained on or not (a NaN loss,
    # a batch of unreadable files): a resumed epoch skips exactly these.
    epoch_batches: int = 0
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped for non-finite gradients


@dataclass
class FitResult:
    best_acc1: float
    best_epoch: int
    final_metrics: dict[str, float]
    num_params: int
    wall_time: float
    run_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(
            f"device={name!r} is not a device name. Use auto, cpu, cuda or cuda:N."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={name} but CUDA is not available here. Use device=cpu or device=auto."
        )
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    loss_fn: TrainingLoss,
    device: torch.device,
    state: TrainState,
    cfg: TrainConfig,
    logger: RunLogger,
    skip_batches: int = 0,
    mixer: MixupCutmix | None = None,
    ema: ModelEma | None = None,
) -> dict[str, float]:
    """One pass over `loader` (less `skip_batches` already done), updating `state` per step.

    Each optimizer step accumulates gradients over `trainer.accumulate` micro-batches; a
    trailing group too small for a full step is dropped, like a partial batch. `mixer`
    turns each batch into mixed images and soft targets; `ema` is updated after each step.
    """
    model.train()
    accumulate = cfg.trainer.accumulate
    max_steps = cfg.trainer.max_steps
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip else math.inf
    loss_sum, correct, seen, micro = 0.0, 0, 0, 0
    part_sums: dict[str, float] = {}
    window_loss, window_batches = 0.0, 0
    start = time.perf_counter()
    batches = itertools.islice(loader, skip_batches, None)
    description = f"epoch {state.epoch + 1}/{cfg.trainer.epochs}"
    optimizer.zero_grad(set_to_none=True)
    with logger.epoch_progress(description, len(loader) - skip_batches) as progress:
        for images, targets in batches:
            if max_steps is not None and state.step >= max_steps:
                break
            state.epoch_batches += 1
            if len(targets) == 0:
                continue  # every file of the batch was unreadable (counted by the data)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixer is not None:
                images, targets = mixer(images, targets)  # targets: (B, K) distributions
            with precision.autocast():
                outputs = model(images)
                loss, parts = loss_fn(images, outputs, targets)
            loss_value = float(loss.detach())
            progress.update(progress.task_ids[0], advance=1)
            if not math.isfinite(loss_value):
                _count_bad_step(state, loss_value, cfg.trainer.max_bad_steps)
                # The whole accumulation group is dropped: its gradients are incomplete.
                optimizer.zero_grad(set_to_none=True)
                micro = 0
                continue
            state.bad_steps = 0
            scaler.scale(loss / accumulate).backward()
            micro += 1

            batch = len(targets)
            loss_sum += loss_value * batch
            labels = targets.argmax(dim=1) if targets.ndim == 2 else targets  # mixed: dominant
            correct += int((merged_logits(outputs).argmax(dim=1) == labels).sum())
            seen += batch
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + float(value) * batch
            window_loss += loss_value
            window_batches += 1
            if micro < accumulate:
                continue
            micro = 0

            # Unscale first so that clipping sees the true gradient norm.
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            scale_before = scaler.get_scale()
            scaler.step(optimizer)  # skipped by the scaler when gradients are not finite
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() < scale_before:
                state.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            if ema is not None:
                ema.update(model)

            lr = optimizer.param_groups[0]["lr"]
            extra = "  ".join(
                f"{k.removeprefix('loss_')} {v / seen:.3f}" for k, v in part_sums.items()
            )
            progress.update(
                progress.task_ids[0],
                loss=loss_sum / seen,
                acc=correct / seen,
                lr=lr,
                ips=seen / (time.perf_counter() - start),
                extra=extra,
            )
            if state.step % cfg.trainer.log_every_n_steps == 0:
                scalars = {
                    "train/loss": window_loss / window_batches,
                    "lr": lr,
                    "grad_norm": grad_norm,
                }
                if scaler.is_enabled():
                    scalars.update(
                        {
                            "amp/loss_scale": scaler.get_scale(),
                            "amp/skipped_steps": state.skipped_steps,
                        }
                    )
                logger.scalars(scalars, state.step)
                window_loss, window_batches = 0.0, 0
    elapsed = time.perf_counter() - start
    if seen == 0:
        return {"loss": float("nan"), "acc": 0.0, "throughput": 0.0}
    parts_mean = {name: total / seen for name, total in part_sums.items()}
    return {
        "loss": loss_sum / seen,
        "acc": 100.0 * correct / seen,
        "throughput": seen / elapsed,
        **parts_mean,
    }


def _count_bad_step(state: TrainState, loss_value: float, max_bad_steps: int) -> None:
    """Skip a non-finite loss, and stop the run when too many come in a row."""
    state.bad_steps += 1
    if state.bad_steps >= max_bad_steps:
        raise UserError(
            f"Loss was {loss_value} for {state.bad_steps} consecutive steps (last at step "
            f"{state.step}). Lower optimizer.lr or trainer.grad_clip, or use precision=bf16 or "
            "fp32; the checkpoints already written are untouched."
        )
    log.warning("non-finite loss %s at step %d: step skipped", loss_value, state.step)


def _config_differences(saved: dict, current: dict, prefix: str) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def _restore(
    path: str,
    cfg_dict: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEma | None = None,
) -> TrainState:
    """Load a checkpoint for resuming, after checking it was trained with the same setup."""
    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    diffs = []
    for section in ("model", "data", "distill"):
        diffs += _config_differences(saved.get(section, {}), cfg_dict[section], f"{section}.")
    if saved.get("optimizer", {}).get("name") != cfg_dict["optimizer"]["name"]:
        diffs.append(
            f"optimizer.name: checkpoint {saved.get('optimizer', {}).get('name')!r}, "
            f"now {cfg_dict['optimizer']['name']!r}"
        )
    if diffs:
        raise UserError(
            f"trainer.resume={path} was trained with other settings: "
            + "; ".join(diffs[:6])
            + ". Resume with the same model, data and optimizer as the original run."
        )
    load_model_state(model, ckpt["model"], source=path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"], source=path)
    elif ema is not None:
        log.warning("%s holds no weight average: trainer.ema starts from its weights", path)
        ema.module.load_state_dict(unwrap_model(model).state_dict())
    set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["state"])


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    metrics: dict[str, float],
    cfg_dict: dict,
    data_info: dict,
    ema: ModelEma | None = None,
) -> dict:
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": asdict(state),
        "metrics": metrics,
        "rng": rng_state(),
        "config": cfg_dict,
        "data": data_info,
    }
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return ckpt


def fit(cfg: TrainConfig, run_dir: Path) -> FitResult:
    """Train `cfg` and write logs and checkpoints into `run_dir`."""
    validate(cfg)
    t0 = time.perf_counter()
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)

    # The model decides the resolution when it names one; the data is resized to it.
    img_size = cfg.model.img_size or cfg.data.img_size
    generator = torch.Generator()
    data = build_data(cfg.data, img_size, generator, pin_memory=device.type == "cuda")
    model = build_model(cfg.model, img_size, data.in_chans, data.num_classes).to(device)
    model.set_grad_checkpointing(cfg.trainer.activation_checkpointing)
    num_params = sum(p.numel() for p in model.parameters())

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
        if not hasattr(model, "forward_heads"):
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
    loss_fn = TrainingLoss(
        SoftTargetCrossEntropy()
        if mixer
        else nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing),
        teacher,
        cfg.distill.type,
        cfg.distill.alpha,
        cfg.distill.tau,
    )

    ema = None
    if cfg.trainer.ema.decay is not None:
        ema = ModelEma(model, cfg.trainer.ema.decay, cfg.trainer.ema.warmup)
    state = TrainState()
    if cfg.trainer.resume:
        state = _restore(cfg.trainer.resume, cfg_dict, model, optimizer, scheduler, scaler, ema)
        log.info(
            "resumed from %s at epoch %d, step %d", cfg.trainer.resume, state.epoch, state.step
        )

    # Checkpoints are saved from `model`; `train_model` may be its compiled wrapper.
    train_model = model
    if cfg.trainer.compile:
        train_model = torch.compile(model, mode=cfg.trainer.compile_mode)

    main = is_main_process()
    logger = RunLogger(run_dir, enabled=main)
    data_info = {
        "class_names": data.class_names,
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "img_size": img_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }
    log.info(
        "model %s: %.2fM parameters, img_size %d, %d classes; device %s, precision %s; run dir %s",
        cfg.model.name,
        num_params / 1e6,
        img_size,
        data.num_classes,
        device,
        precision.name,
        run_dir,
    )
    if hasattr(model, "forward_heads") and loss_fn.teacher is None:
        log.info(
            "no teacher (distill.type=%s): both heads train on the labels; this is not distillation",
            cfg.distill.type,
        )
    metrics: dict[str, float] = {}
    try:
        if loss_fn.teacher is not None:
            teacher_val = evaluate(teacher, data.val_loader, precision, device)
            logger.scalars({"teacher/val_acc1": teacher_val["acc1"]}, state.step)
            log.info(
                "teacher (%s distillation): val acc1 %.2f%%", cfg.distill.type, teacher_val["acc1"]
            )
        while state.epoch < cfg.trainer.epochs and (
            cfg.trainer.max_steps is None or state.step < cfg.trainer.max_steps
        ):
            # A per-epoch seed fixes the data order, so a resumed run sees the same batches.
            generator.manual_seed(cfg.seed + state.epoch)
            skip = state.epoch_batches
            train = train_one_epoch(
                train_model, data.train_loader, optimizer, scheduler, scaler, precision, loss_fn,
                device, state, cfg, logger, skip_batches=skip, mixer=mixer, ema=ema,
            )  # fmt: skip
            val = evaluate(train_model, data.val_loader, precision, device)
            if state.epoch_batches == len(data.train_loader):
                state.epoch, state.epoch_batches = state.epoch + 1, 0
            metrics = {f"val/{k}": v for k, v in val.items()}
            if ema is not None:
                val_ema = evaluate(ema.module, data.val_loader, precision, device)
                metrics.update({f"val_ema/{k}": v for k, v in val_ema.items()})
                state.best_ema_acc1 = max(state.best_ema_acc1, val_ema["acc1"])
            if data.skipped is not None:
                skipped = data.skipped.take()
                metrics["data/skipped_images"] = skipped
                if skipped:
                    log.warning("epoch %d: skipped %d unreadable images", state.epoch, skipped)
            metrics.update(
                {f"train/{k}": v for k, v in train.items() if k not in ("loss", "throughput")}
            )
            metrics["throughput"] = train["throughput"]
            logger.scalars({**metrics, "epoch": state.epoch}, state.step)
            is_best = val["acc1"] > state.best_acc1
            if is_best:
                state.best_acc1, state.best_epoch = val["acc1"], state.epoch
            heads = (
                f" (cls {val['acc1_cls']:.2f}%, dist {val['acc1_dist']:.2f}%)"
                if "acc1_cls" in val
                else ""
            )
            log.info(
                "epoch %d/%d step %d: train loss %.4f acc %.2f%% | val loss %.4f acc1 %.2f%%%s acc5 %.2f%%"
                " | %.0f img/s%s",
                state.epoch, cfg.trainer.epochs, state.step, train["loss"], train["acc"],
                val["loss"], val["acc1"], heads, val["acc5"], train["throughput"], " (best)" if is_best else "",
            )  # fmt: skip
            if ema is not None:
                log.info("epoch %d: ema val loss %.4f acc1 %.2f%% acc5 %.2f%%",
                         state.epoch, val_ema["loss"], val_ema["acc1"], val_ema["acc5"])  # fmt: skip
            if main:
                ckpt = _checkpoint(
                    model, optimizer, scheduler, scaler, state, metrics, cfg_dict, data_info, ema
                )
                save_checkpoint(ckpt, run_dir / "last.pt")
                if is_best:
                    save_checkpoint(ckpt, run_dir / "best.pt")
        wall = time.perf_counter() - t0
        logger.hparams(
            _flat_hparams(cfg_dict),
            {
                "hparam/best_acc1": state.best_acc1,
                "hparam/final_acc1": metrics.get("val/acc1", 0.0),
                **({"hparam/best_ema_acc1": state.best_ema_acc1} if ema else {}),
            },
        )
    finally:
        logger.close()
    logger.summary(
        {
            "model": f"{cfg.model.name} ({num_params / 1e6:.2f}M parameters)",
            "data": f"{cfg.data.name} ({img_size}x{img_size}, {data.num_classes} classes)",
            "best val top-1": f"{state.best_acc1:.2f}% (epoch {state.best_epoch})",
            "final val top-1": f"{metrics.get('val/acc1', float('nan')):.2f}%",
            **(
                {
                    "best val top-1 (EMA)": f"{state.best_ema_acc1:.2f}%",
                    "final val top-1 (EMA)": f"{metrics.get('val_ema/acc1', float('nan')):.2f}%",
                }
                if ema
                else {}
            ),
            "wall time": f"{wall:.1f} s",
            "output dir": str(run_dir),
        }
    )
    return FitResult(state.best_acc1, state.best_epoch, metrics, num_params, wall, run_dir)


def _flat_hparams(cfg_dict: dict) -> dict[str, float | int | str | bool]:
    """Config leaves as `section.key` entries in the types the HParams plugin accepts."""

    def leaves(prefix: str, node: dict) -> dict[str, float | int | str | bool]:
        flat = {}
        for key, value in node.items():
            if isinstance(value, dict):  # e.g. data.augment, trainer.ema
                flat.update(leaves(f"{prefix}{key}.", value))
            elif isinstance(value, (bool, int, float, str)):
                flat[f"{prefix}{key}"] = value
            elif isinstance(value, list):
                flat[f"{prefix}{key}"] = str(value)
        return flat

    flat = {}
    for section in ("model", "data", "optimizer", "scheduler", "precision", "trainer"):
        flat.update(leaves(f"{section}.", cfg_dict[section]))
    flat["seed"] = cfg_dict["seed"]
    return flat
