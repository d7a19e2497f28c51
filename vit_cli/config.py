"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Composition merges the YAML files in `configs/` into these dataclasses, so a misspelt key
or a value of the wrong type fails before any work starts, naming the key.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from vit_cli.errors import UserError


@dataclass
class ViTConfig:
    name: str = "vit"
    # None: use the data's native image size; otherwise the data is resized to it.
    img_size: Optional[int] = None
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0


@dataclass
class DeiTConfig(ViTConfig):
    name: str = "deit"
    # False: a plain ViT trained with the DeiT recipe (no distillation token).
    distilled: bool = True


@dataclass
class SwinConfig:
    name: str = "swin"
    img_size: Optional[int] = None
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    ape: bool = False
    patch_norm: bool = True


@dataclass
class AugmentConfig:
    """Training-time augmentation; eval images get none (beyond `eval_crop_ratio`)."""

    # Random resized crop of the image files (imagefolder): the crop's share of the image
    # area and its aspect-ratio range. null: resize and centre-crop as in eval.
    crop_scale: Optional[list[float]] = None
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    # Probability of a horizontal flip per image.
    hflip: float = 0.0
    # none | randaugment | trivialaugment, per image on uint8 pixels (torchvision v2).
    auto_augment: str = "none"
    randaugment_ops: int = 2
    # On RandAugment's 0..30 scale; drawn per image from N(magnitude, magnitude_std).
    randaugment_magnitude: int = 9
    randaugment_magnitude_std: float = 0.0
    # Probability of erasing a random box (filled with Gaussian noise) per image.
    erase_prob: float = 0.0
    # Mixup / CutMix with Beta(alpha, alpha) mixing weights; 0 turns each off. With both
    # on, a batch uses CutMix with probability `mix_switch_prob`, else Mixup.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # Probability that a batch is mixed at all.
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # Repeated augmentation: each sampled image appears this many times per epoch, each copy
    # augmented differently; the epoch keeps its length (1 turns it off).
    repeats: int = 1
    # Eval of image files: resize to img_size / eval_crop_ratio, then centre-crop img_size.
    eval_crop_ratio: float = 1.0


@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None
    # cifar10/cifar100: fetch the archive into data.root when it is not there.
    download: bool = False
    # imagefolder without train/ and val/ subfolders: the share of each class held out for
    # val, drawn with `split_seed` (fixed apart from `seed`, so runs compare on one split).
    val_fraction: float = 0.0
    split_seed: int = 0
    img_size: int = 8
    in_chans: int = 1
    num_classes: int = 10
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    # Training-time random translation by up to this many pixels, zero padded (pad and
    # crop): the usual augmentation of small images such as digits and CIFAR (0: off).
    shift: int = 0
    # Sizes of the synthetic splits of data=fake.
    train_size: int = 1024
    val_size: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    # TF32 matmuls on Ampere and newer GPUs; no effect on CPU.
    allow_tf32: bool = True


@dataclass
class EMAConfig:
    # An exponential moving average of the weights, evaluated beside the model every epoch
    # (null: off). Its decay warms up as min(decay, (1 + n) / (10 + n)) after n updates.
    decay: Optional[float] = None
    warmup: bool = True


@dataclass
class TrainerConfig:
    epochs: int = 100
    # Stops early once this many optimizer steps are done (null: run all epochs).
    max_steps: Optional[int] = None
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    resume: Optional[str] = None
    log_every_n_steps: int = 10
    # Stop with an error after this many consecutive steps whose loss is NaN or inf.
    max_bad_steps: int = 5
    # Micro-batches per optimizer step: equivalent to an N x larger batch.
    accumulate: int = 1
    # torch.compile the model; compile_mode is passed on (default, reduce-overhead,
    # max-autotune).
    compile: bool = False
    compile_mode: str = "default"
    # Recompute each block's activations in the backward pass: less memory, more compute.
    activation_checkpointing: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)
    # With several processes (torchrun): how long a collective waits for the others before
    # the job stops with an error, e.g. when one process died or hangs.
    dist_timeout_s: float = 1800.0


@dataclass
class TeacherConfig:
    # (a) a checkpoint written by vit-train, of any model family ...
    checkpoint: Optional[str] = None
    # ... or (b) a torchvision classification architecture by name, e.g. resnet18,
    # with its weights (a state_dict) from a local file.
    arch: Optional[str] = None
    weights: Optional[str] = None


@dataclass
class DistillConfig:
    # none | soft | hard. Without a teacher, a distilled student trains both heads on the
    # labels instead: that is not distillation.
    type: str = "hard"
    # Weight of the distillation loss: (1 - alpha) * base + alpha * distillation.
    alpha: float = 0.5
    # Temperature of the soft (KL) loss.
    tau: float = 1.0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class TrainConfig:
    # Each model family has its own schema (ViTConfig, DeiTConfig, SwinConfig), chosen by
    # its YAML.
    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"


def validate(cfg: TrainConfig) -> None:
    """Check values that the schema's types cannot, naming the key and the fix."""
    checks = [
        ("trainer.epochs", cfg.trainer.epochs, cfg.trainer.epochs >= 1, "at least 1"),
        ("trainer.max_steps", cfg.trainer.max_steps,
         cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1, "null or at least 1"),
        ("trainer.max_bad_steps", cfg.trainer.max_bad_steps, cfg.trainer.max_bad_steps >= 1, "at least 1"),
        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps,
         cfg.trainer.log_every_n_steps >= 1, "at least 1"),
        ("trainer.label_smoothing", cfg.trainer.label_smoothing,
         0.0 <= cfg.trainer.label_smoothing < 1.0, "in [0, 1)"),
        ("trainer.accumulate", cfg.trainer.accumulate, cfg.trainer.accumulate >= 1, "at least 1"),
        ("trainer.dist_timeout_s", cfg.trainer.dist_timeout_s, cfg.trainer.dist_timeout_s > 0, "positive"),
        ("data.batch_size", cfg.data.batch_size, cfg.data.batch_size >= 1, "at least 1"),
        ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, "0 or more"),
        ("optimizer.lr", cfg.optimizer.lr, cfg.optimizer.lr > 0, "positive"),
        ("optimizer.weight_decay", cfg.optimizer.weight_decay, cfg.optimizer.weight_decay >= 0, "0 or more"),
        ("distill.alpha", cfg.distill.alpha, 0.0 <= cfg.distill.alpha <= 1.0, "in [0, 1]"),
        ("distill.tau", cfg.distill.tau, cfg.distill.tau > 0, "positive"),
        ("scheduler.warmup_epochs", cfg.scheduler.warmup_epochs, cfg.scheduler.warmup_epochs >= 0, "0 or more"),
    ]  # fmt: skip
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    checks.append(
        (
            "trainer.compile_mode",
            cfg.trainer.compile_mode,
            cfg.trainer.compile_mode in modes,
            f"one of {', '.join(modes)}",
        )
    )
    checks += _augment_checks(cfg.data)
    ema = cfg.trainer.ema.decay
    checks.append(("trainer.ema.decay", ema, ema is None or 0.0 <= ema < 1.0, "null or in [0, 1)"))
    for key, value, ok, expected in checks:
        if not ok:
            raise UserError(f"{key}={value} is invalid: it must be {expected}.")


AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


def _augment_checks(data: DataConfig) -> list[tuple[str, Any, bool, str]]:
    aug = data.augment
    probabilities = ("hflip", "erase_prob", "mix_prob", "mix_switch_prob")
    checks = [
        (f"data.augment.{key}", getattr(aug, key), 0.0 <= getattr(aug, key) <= 1.0, "in [0, 1]")
        for key in probabilities
    ]
    scale, ratio = aug.crop_scale, aug.crop_ratio
    checks += [
        ("data.shift", data.shift, data.shift >= 0, "0 or more"),
        ("data.val_fraction", data.val_fraction, 0.0 <= data.val_fraction < 1.0, "in [0, 1)"),
        ("data.augment.crop_scale", scale,
         scale is None or (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0),
         "null or [min, max] with 0 < min <= max <= 1"),
        ("data.augment.crop_ratio", ratio, len(ratio) == 2 and 0.0 < ratio[0] <= ratio[1],
         "[min, max] with 0 < min <= max"),
        ("data.augment.auto_augment", aug.auto_augment, aug.auto_augment in AUTO_AUGMENTS,
         f"one of {', '.join(AUTO_AUGMENTS)}"),
        ("data.augment.randaugment_magnitude", aug.randaugment_magnitude,
         0 <= aug.randaugment_magnitude <= 30, "in 0..30"),
        ("data.augment.mixup_alpha", aug.mixup_alpha, aug.mixup_alpha >= 0, "0 or more"),
        ("data.augment.cutmix_alpha", aug.cutmix_alpha, aug.cutmix_alpha >= 0, "0 or more"),
        ("data.augment.repeats", aug.repeats, aug.repeats >= 1, "at least 1"),
        ("data.augment.eval_crop_ratio", aug.eval_crop_ratio, 0.0 < aug.eval_crop_ratio <= 1.0,
         "in (0, 1]"),
    ]  # fmt: skip
    return checks


def register_configs() -> None:
    """Store the schemas that the YAML files in configs/ name in their defaults lists."""
    from vit_cli.models import FAMILIES  # the family registry imports the schemas above

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, family in FAMILIES.items():
        cs.store(group="schema/model", name=name, node=family.schema)


def compose_train_config(overrides: list[str]) -> TrainConfig:
    """vit-train's config with `overrides`, composed by Hydra outside a Hydra app.

    For the tools that take vit-train's overrides without training (vit-eval's `data=NAME`,
    the benchmarks), so that every config is composed one way: from `configs/` by Hydra.
    """
    register_configs()
    config_dir = str(importlib.resources.files("vit_cli.configs"))
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_object(cfg)
