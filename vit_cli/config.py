"""Typed schemas for the config groups, and the checks of their values.

Composition merges the YAML files in `configs/` into these dataclasses, so a misspelt key
or a value of the wrong type fails before any work starts, naming the key. Each schema
checks its own values (`checks()`), and `validate` raises on the first invalid one. Each
model family's schema extends `ModelConfig` beside its model (`vit_cli/models/`), each data
source's extends `DataConfig` beside its reader (`vit_cli/data/`); composition.py registers
them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union

from omegaconf import MISSING

from vit_cli.errors import UserError

# (key, value, whether it is valid, what it must be); the helpers below make them.
Check = tuple[str, Any, bool, str]


def at_least(key: str, value: Any, low: int) -> Check:
    return key, value, value >= low, f"at least {low}"


def optional_at_least(key: str, value: Any, low: int) -> Check:
    return key, value, value is None or value >= low, f"null or at least {low}"


# A batch size, or another count of images or processes, reaches libraries as a C integer
# (itertools.islice, a tensor's shape, a DataLoader's workers).
MAX_COUNT = 2**31 - 1


def batch_size(key: str, value: Any, optional: bool = False) -> Check:
    ok = (optional and value is None) or (value is not None and 1 <= value <= MAX_COUNT)
    return key, value, ok, ("null or " if optional else "") + f"from 1 to {MAX_COUNT}"


def positive(key: str, value: Any) -> Check:
    return key, value, value > 0, "positive"


def not_negative(key: str, value: Any) -> Check:
    return key, value, value >= 0, "0 or more"


def share(key: str, value: Any, one_included: bool = False) -> Check:
    ok = 0.0 <= value <= 1.0 if one_included else 0.0 <= value < 1.0
    return key, value, ok, "in [0, 1]" if one_included else "in [0, 1)"


def one_of(key: str, value: Any, options: tuple[str, ...]) -> Check:
    return key, value, value in options, f"one of {', '.join(options)}"


class Checked(Protocol):
    def checks(self) -> list[Check]: ...


def validate(cfg: Checked) -> None:
    """Raise a UserError for the first invalid value of `cfg` (a TrainConfig, or a group's
    schema on its own), naming the key and what it must be."""
    for key, value, ok, expected in cfg.checks():
        if not ok:
            raise UserError(f"{key}={value} is invalid: it must be {expected}.")


@dataclass
class ModelConfig:
    """The keys every model family has; a family's schema (in its module under
    `vit_cli/models/`) adds the keys of its architecture and their checks."""

    # A local .pth/.pt/.bin/.safetensors file: timm, official DeiT/Swin, torchvision or a
    # vit-train checkpoint. Positions, windows, classes and channels are adapted to this model.
    pretrained: Optional[str] = None
    # Take the file's weight average (EMA) instead of its raw weights.
    pretrained_ema: bool = False
    name: str = MISSING  # the family, a module of vit_cli/models/
    # None: use the data's native image size; otherwise the data is resized to it.
    img_size: Optional[int] = None

    def checks(self) -> list[Check]:
        return [optional_at_least("model.img_size", self.img_size, 1)]


def transformer_checks(cfg: Any) -> list[Check]:
    """The checks of the keys that every family here adds alike (ViT, DeiT and Swin):
    patch size, width, MLP ratio and dropout rates."""
    return [
        at_least("model.patch_size", cfg.patch_size, 1),
        at_least("model.embed_dim", cfg.embed_dim, 1),
        positive("model.mlp_ratio", cfg.mlp_ratio),
        share("model.drop_rate", cfg.drop_rate),
        share("model.attn_drop_rate", cfg.attn_drop_rate),
        share("model.drop_path_rate", cfg.drop_path_rate),
    ]


AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


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

    def checks(self) -> list[Check]:
        scale, ratio = self.crop_scale, self.crop_ratio
        return [
            *(share(f"data.augment.{key}", getattr(self, key), one_included=True)
              for key in ("hflip", "erase_prob", "mix_prob", "mix_switch_prob")),
            ("data.augment.crop_scale", scale,
             scale is None or (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0),
             "null or [min, max] with 0 < min <= max <= 1"),
            ("data.augment.crop_ratio", ratio, len(ratio) == 2 and 0.0 < ratio[0] <= ratio[1],
             "[min, max] with 0 < min <= max"),
            one_of("data.augment.auto_augment", self.auto_augment, AUTO_AUGMENTS),
            not_negative("data.augment.randaugment_ops", self.randaugment_ops),
            ("data.augment.randaugment_magnitude", self.randaugment_magnitude,
             0 <= self.randaugment_magnitude <= 30, "in 0..30"),
            not_negative("data.augment.randaugment_magnitude_std", self.randaugment_magnitude_std),
            not_negative("data.augment.mixup_alpha", self.mixup_alpha),
            not_negative("data.augment.cutmix_alpha", self.cutmix_alpha),
            at_least("data.augment.repeats", self.repeats, 1),
            ("data.augment.eval_crop_ratio", self.eval_crop_ratio,
             0.0 < self.eval_crop_ratio <= 1.0, "in (0, 1]"),
        ]  # fmt: skip


@dataclass
class DataConfig:
    """The keys every data source has, and the schema of data=digits, which adds none.

    Each source's schema adds its own keys (`vit_cli/data/<source>.py`) and their checks.
    """

    name: str = "digits"
    img_size: int = 8
    in_chans: int = 1
    # The classes the data must have, checked when it is read (null: as many as it has).
    num_classes: Optional[int] = 10
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    # Loader processes, or "auto": the cores this process may use (its CPU affinity, shared
    # with the job's other processes on the machine unless each is bound to its own), less
    # one for the training process itself, and at least 1.
    num_workers: Union[int, str] = 0
    # torch threads while a batch is augmented in the loading process (null: 1 when the
    # device is the CPU, where the model's threads hold the cores; else torch's count).
    augment_threads: Optional[int] = None
    # Training-time random translation by up to this many pixels, zero padded (pad and
    # crop): the usual augmentation of small images such as digits and CIFAR (0: off).
    shift: int = 0
    # Image files with more pixels are skipped as unreadable, before they are decoded.
    max_image_pixels: int = 8192 * 8192
    # JPEG files are decoded at the smallest DCT scale (1, 1/2, 1/4 or 1/8 of their size)
    # that leaves the crop at least img_size pixels each way: about 3x faster on
    # 12-megapixel photos, the same crops (false: every file at full size).
    dct_scaling: bool = True
    # Where image files are decoded: "workers" (the loader processes, with PIL) or "device"
    # (JPEGs a batch at a time on the training device: nvjpeg on a GPU; the workers only
    # read the files).
    decode: str = "workers"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def checks(self) -> list[Check]:
        """Each value against its range; a source's schema adds the checks of its keys."""
        return [
            at_least("data.img_size", self.img_size, 1),
            at_least("data.in_chans", self.in_chans, 1),
            optional_at_least("data.num_classes", self.num_classes, 1),
            ("data.std", self.std, all(v > 0 for v in self.std), "a list of positive values"),
            batch_size("data.batch_size", self.batch_size),
            batch_size("data.eval_batch_size", self.eval_batch_size, optional=True),
            (
                "data.num_workers",
                self.num_workers,
                self.num_workers == "auto"
                or (isinstance(self.num_workers, int) and 0 <= self.num_workers <= MAX_WORKERS),
                f"auto, or from 0 to {MAX_WORKERS} (8 per CPU core here, and at least 64)",
            ),
            optional_at_least("data.augment_threads", self.augment_threads, 1),
            not_negative("data.shift", self.shift),
            at_least("data.max_image_pixels", self.max_image_pixels, 1),
            one_of("data.decode", self.decode, ("workers", "device")),
            *self.augment.checks(),
        ]


@dataclass
class HeldOutConfig(DataConfig):
    """The keys of a source that can hold out part of its training images as val (image
    folders, the MNIST family, Hugging Face datasets)."""

    # The share of each class held out, drawn with `split_seed` (fixed apart from `seed`, so
    # that runs compare on one split); 0: the source's own val split.
    val_fraction: float = 0.0
    split_seed: int = 0

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            share("data.val_fraction", self.val_fraction),
            not_negative("data.split_seed", self.split_seed),
        ]


# More loader processes than this is a slip of the keyboard, not a setting: each one is a
# process, and a DataLoader starts them all at once.
MAX_WORKERS = max(64, 8 * (os.cpu_count() or 1))


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    # Fine-tuning. Layer-wise lr decay: each layer's lr is lr * layer_decay ** (L - layer),
    # from lr for the head's layer L down to lr * layer_decay ** L for the embeddings
    # (layer 0); BEiT and MAE fine-tune with 0.65 to 0.75 (null: off).
    layer_decay: Optional[float] = None
    # A multiple of the lr for the head(s) (head, head_dist), e.g. for a new head.
    head_lr_scale: float = 1.0

    def checks(self) -> list[Check]:
        betas, decay = self.betas, self.layer_decay
        return [
            positive("optimizer.lr", self.lr),
            not_negative("optimizer.weight_decay", self.weight_decay),
            ("optimizer.betas", betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
             "[beta1, beta2], each in [0, 1)"),
            positive("optimizer.eps", self.eps),
            share("optimizer.momentum", self.momentum),
            ("optimizer.layer_decay", decay, decay is None or 0.0 < decay <= 1.0,
             "null or in (0, 1]"),
            positive("optimizer.head_lr_scale", self.head_lr_scale),
        ]  # fmt: skip


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_epochs: float = 5.0
    # The lr the schedule ends at: at most optimizer.lr (TrainConfig checks the two together).
    min_lr: float = 1e-6

    def checks(self) -> list[Check]:
        return [not_negative("scheduler.warmup_epochs", self.warmup_epochs)]


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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FREEZE_CHOICES = ("backbone",)


@dataclass
class TrainerConfig:
    epochs: int = 100
    # Stops early once this many optimizer steps are done (null: run all epochs).
    max_steps: Optional[int] = None
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    # A checkpoint to continue from, or "auto": the run folder's own last.pt when there is
    # one (else start fresh), so that the same command continues a stopped run.
    resume: Optional[str] = None
    # Also write last.pt every this many optimizer steps, in the middle of epochs (null: at
    # the end of each epoch only).
    checkpoint_every_n_steps: Optional[int] = None
    log_every_n_steps: int = 10
    # TensorBoard pictures (confusion matrix, misclassified val images, attention maps) every
    # this many epochs and after the last, and the first training batch (null: none).
    images_every_n_epochs: Optional[int] = 5
    # Images in the misclassified and training-batch grids; attention maps show half as many.
    images_per_grid: int = 16
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
    # backbone: train the head(s) alone, a linear probe; the rest keeps its weights and is
    # left out of the optimizer (null: train every parameter).
    freeze: Optional[str] = None
    ema: EMAConfig = field(default_factory=EMAConfig)
    # With several processes (torchrun): how long a collective waits for the others before
    # the job stops with an error, e.g. when one process died or hangs.
    dist_timeout_s: float = 1800.0
    # How long a run waits for another that still holds its run folder (a requeued job
    # whose predecessor still writes) before it stops with an error naming that run.
    lock_wait_s: float = 60.0

    def checks(self) -> list[Check]:
        ema, clip, freeze = self.ema.decay, self.grad_clip, self.freeze
        return [
            at_least("trainer.epochs", self.epochs, 1),
            optional_at_least("trainer.max_steps", self.max_steps, 1),
            optional_at_least("trainer.checkpoint_every_n_steps", self.checkpoint_every_n_steps, 1),
            ("trainer.grad_clip", clip, clip is None or clip >= 0,
             "null or 0 (no clipping), or a positive norm"),
            share("trainer.label_smoothing", self.label_smoothing),
            at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1),
            optional_at_least("trainer.images_every_n_epochs", self.images_every_n_epochs, 1),
            at_least("trainer.images_per_grid", self.images_per_grid, 1),
            at_least("trainer.max_bad_steps", self.max_bad_steps, 1),
            at_least("trainer.accumulate", self.accumulate, 1),
            one_of("trainer.compile_mode", self.compile_mode, COMPILE_MODES),
            ("trainer.freeze", freeze, freeze is None or freeze in FREEZE_CHOICES,
             f"null or one of {', '.join(FREEZE_CHOICES)}"),
            ("trainer.ema.decay", ema, ema is None or 0.0 <= ema < 1.0, "null or in [0, 1)"),
            positive("trainer.dist_timeout_s", self.dist_timeout_s),
            not_negative("trainer.lock_wait_s", self.lock_wait_s),
        ]  # fmt: skip


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

    def checks(self) -> list[Check]:
        return [
            share("distill.alpha", self.alpha, one_included=True),
            positive("distill.tau", self.tau),
        ]


@dataclass
class TrainConfig:
    # Each model family has its own schema (a ModelConfig: vit_cli/models/), and each data
    # source its own (a DataConfig: vit_cli/data/), chosen by its YAML.
    model: Any = MISSING
    data: Any = MISSING
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    # "auto" picks cuda when available, else cpu.
    device: str = "auto"
    # Keep memory that tensors free in the C heap, for the next step (glibc; docs/results.md,
    # "Host settings"). null: on when the device is the CPU, off on a GPU.
    keep_freed_memory: Optional[bool] = None

    def checks(self) -> list[Check]:
        lr, min_lr = self.optimizer.lr, self.scheduler.min_lr
        return [
            *self.model.checks(),
            *self.data.checks(),
            *self.optimizer.checks(),
            *self.scheduler.checks(),
            ("scheduler.min_lr", min_lr, 0.0 <= min_lr <= lr, f"in [0, optimizer.lr={lr:g}]"),
            *self.trainer.checks(),
            *self.distill.checks(),
            # NumPy takes seeds below 2**32; each epoch and process adds to it.
            ("seed", self.seed, 0 <= self.seed < 2**31, "in 0..2147483647"),
        ]
