"""Our model and its timm peer measured side by side: the setup a script's overrides
describe, the peer with the same architecture, FLOPs and peak memory per step, and the
comparison table. The procedure is timing.py's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vit_cli.composition import compose_train_config
from vit_cli.config import TrainConfig
from vit_cli.errors import UserError
from vit_cli.host_memory import keep_freed_memory
from vit_cli.models import build_model
from vit_cli.models.deit import DeiTConfig
from vit_cli.models.swin import SwinConfig
from vit_cli.models.vit import ViTConfig
from vit_cli.optim import build_optimizer
from vit_cli.precision import Precision, resolve_precision
from vit_cli.runtime import resolve_device

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import (
    Timed,
    Timing,
    default_matmul_size,
    describe_host,
    host,
    make_infer_step,
    make_train_step,
    matmul_flops_per_s,
    measure,
    ratios,
    synchronize,
)

# ----------------------------------------------------------------------------- models


# timm names by architecture, for the default peer: (embed_dim, depth, num_heads) for ViT,
# (embed_dim, depths, num_heads) for Swin.
TIMM_VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base"}
TIMM_SWIN_SIZES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "tiny",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "small",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "base",
}
PHASES = ("train", "infer")


@dataclass
class Setup:
    """The composed config, the device and precision, and random batches for the model."""

    cfg: TrainConfig
    device: torch.device
    precision: Precision
    malloc: str  # "freed memory kept" or "defaults"
    img_size: int
    in_chans: int
    num_classes: int
    images: torch.Tensor  # a training batch, (data.batch_size, C, H, W)
    labels: torch.Tensor
    eval_images: torch.Tensor  # an eval batch, (data.eval_batch_size, C, H, W)

    def build_ours(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return build_model(self.cfg.model, self.img_size, self.in_chans, self.num_classes)

    def train_step(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        optimizer = build_optimizer(self.cfg.optimizer, model)
        return make_train_step(model, optimizer, self.precision, self.images, self.labels)

    def infer_step(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        return make_infer_step(model, self.precision, self.eval_images)


def make_setup(args: argparse.Namespace) -> Setup:
    """The config from `args.overrides`, and batches of random images and labels."""
    kept = False if args.malloc_defaults else keep_freed_memory()
    cfg = compose_train_config(args.overrides)
    device = resolve_device(args.device or cfg.device)
    img_size = cfg.model.img_size or cfg.data.img_size
    batch_size = cfg.data.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (args.in_chans, img_size, img_size)
    images = torch.randn(batch_size, *shape, generator=generator)
    labels = torch.randint(args.num_classes, (batch_size,), generator=generator)
    eval_images = torch.randn(cfg.data.eval_batch_size or batch_size, *shape, generator=generator)
    return Setup(
        cfg=cfg,
        device=device,
        precision=resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32),
        malloc="freed memory kept" if kept else "defaults",
        img_size=img_size,
        in_chans=args.in_chans,
        num_classes=args.num_classes,
        images=images.to(device),
        labels=labels.to(device),
        eval_images=eval_images.to(device),
    )


def timm_peer_name(cfg: ViTConfig | SwinConfig) -> str | None:
    """The timm model with the same architecture as `cfg`, when there is an obvious one."""
    if cfg.mlp_ratio != 4.0 or not cfg.qkv_bias:
        return None
    if isinstance(cfg, ViTConfig):  # DeiTConfig is a ViTConfig too
        size = TIMM_VIT_SIZES.get((cfg.embed_dim, cfg.depth, cfg.num_heads))
        if size is None:
            return None
        if isinstance(cfg, DeiTConfig):
            distilled = "_distilled" if cfg.distilled else ""
            return f"deit_{size}{distilled}_patch{cfg.patch_size}_224"
        return f"vit_{size}_patch{cfg.patch_size}_224"
    if isinstance(cfg, SwinConfig):
        size = TIMM_SWIN_SIZES.get((cfg.embed_dim, tuple(cfg.depths), tuple(cfg.num_heads)))
        if size is None:
            return None
        return f"swin_{size}_patch{cfg.patch_size}_window{cfg.window_size}_224"
    return None


def build_timm_peer(
    name: str, cfg: ViTConfig | SwinConfig, img_size: int, in_chans: int, num_classes: int
) -> nn.Module:
    """timm's `name`, untrained, at our image size, classes and dropout rates."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}; pass another --timm-model, or --no-timm.")
    return timm.create_model(
        name,
        pretrained=False,
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        drop_rate=cfg.drop_rate,
        proj_drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate,
        drop_path_rate=cfg.drop_path_rate,
    )


def timm_peer(
    setup: Setup, args: argparse.Namespace, console: Console
) -> tuple[str, nn.Module] | None:
    """The label and model of the timm peer that `--timm-model`/`--no-timm` ask for, or
    None, saying why, when there is none to build."""
    if args.no_timm:
        return None
    name = args.timm_model or timm_peer_name(setup.cfg.model)
    if name is None:
        console.print(
            "No timm model is known for this config: pass --timm-model NAME. Skipping the peer."
        )
        return None
    if importlib.util.find_spec("timm") is None:
        console.print(
            'timm is not installed (pip install -e ".[dev]", or pip install timm): '
            "skipping the peer."
        )
        return None
    torch.manual_seed(setup.cfg.seed)
    model = build_timm_peer(
        name, setup.cfg.model, setup.img_size, setup.in_chans, setup.num_classes
    )
    return f"timm {name}", model


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """q k^T and weights @ v: 2 * N_q * N_k * (d_qk + d_v) per batch and head."""
    *batch, n_q, d_qk = query_shape
    return 2 * math.prod(batch) * n_q * key_shape[-2] * (d_qk + value_shape[-1])


def forward_flops_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass per image, as counted by FlopCounterMode.

    FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel, which we
    count here the same way.
    """
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_flash: _cpu_flash_attention_flops})
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(images[:1])
    model.train(was_training)
    return float(counter.get_total_flops())


def step_peak_memory(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak memory one step allocates above what was allocated before it, in bytes.

    The allocator's own count, which is this model's alone: CUDA's max_memory_allocated;
    on the CPU, the running sum of the allocations and frees torch.profiler records in the
    step. Not the process's resident memory, which moves with what other models' steps
    left in the C heap.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    cpu = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[cpu], profile_memory=True) as profiler:
        step()
    allocated = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        allocated += event.self_cpu_memory_usage
        peak = max(peak, allocated)
    return peak


# ----------------------------------------------------------------------------- side by side


@dataclass
class PhaseResult:
    timing: Timing  # img/s of every window, and the output of the last step
    peak_memory: int  # bytes, of one extra untimed step


@dataclass
class Candidate:
    key: str  # its key in the report: "ours", "timm", ...
    label: str
    model: nn.Module
    params: int
    forward_flops: float  # per image
    phases: dict[str, PhaseResult] = field(default_factory=dict)


def measure_phase(
    phase: str,
    candidates: list[Candidate],
    steps: dict[str, Callable[[], torch.Tensor]],
    batch_size: int,
    args: argparse.Namespace,
    device: torch.device,
    matmul: tuple[int, torch.dtype],
) -> list[float]:
    """Warm every model up, then time rounds of one window each, rotating the order.

    Each round ends with a matmul peak sample; returns them, in FLOP/s.
    """
    for c in candidates:
        c.model.train(phase == "train")
    peak_samples = []
    timings = measure(
        {c.key: Timed(steps[c.key], batch_size, args.steps_per_window) for c in candidates},
        warmup=args.warmup,
        windows=args.windows,
        device=device,
        after_round=lambda *_: peak_samples.append(matmul_flops_per_s(*matmul, device)),
    )
    for c in candidates:
        peak_memory = step_peak_memory(steps[c.key], device)
        c.phases[phase] = PhaseResult(timings[c.key], peak_memory)
    return peak_samples


def compare(
    setup: Setup,
    models: list[tuple[str, str, nn.Module]],
    baseline: str,
    args: argparse.Namespace,
    console: Console,
) -> dict:
    """Time training, then inference, of `models` (key, label, model) side by side; print
    the table, with each model's img/s against the `baseline` key's; return the figures."""
    candidates = []
    for key, label, model in models:
        model.to(setup.device)
        candidate = Candidate(
            key=key,
            label=label,
            model=model,
            params=sum(p.numel() for p in model.parameters()),
            forward_flops=forward_flops_per_image(model, setup.images),
        )
        if args.compile:
            candidate.model = torch.compile(model, mode=args.compile_mode)
        candidates.append(candidate)

    device = setup.device
    dtype = setup.precision.autocast_dtype or torch.float32
    matmul = (args.matmul_size or default_matmul_size(device), dtype)
    batch_sizes = {"train": len(setup.images), "infer": len(setup.eval_images)}
    steps = {
        "train": {c.key: setup.train_step(c.model) for c in candidates},
        "infer": {c.key: setup.infer_step(c.model) for c in candidates},
    }
    # MFU divides by the peak measured in the same phase, under the same machine load.
    peak_samples = {
        phase: measure_phase(
            phase, candidates, steps[phase], batch_sizes[phase], args, device, matmul
        )
        for phase in PHASES
    }
    peak = {phase: statistics.median(samples) for phase, samples in peak_samples.items()}
    meta = {
        **host(device),
        "malloc": setup.malloc,
        "precision": setup.precision.label,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_sizes["train"],
        "eval_batch_size": batch_sizes["infer"],
        "img_size": setup.img_size,
        "in_chans": setup.in_chans,
        "num_classes": setup.num_classes,
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "warmup": args.warmup,
        "windows": args.windows,
        "steps_per_window": args.steps_per_window,
        "overrides": args.overrides,
        "matmul": {
            "size": matmul[0],
            "dtype": str(dtype).removeprefix("torch."),
            "tflop_per_s": {phase: flops / 1e12 for phase, flops in peak.items()},
            "samples_tflop_per_s": {
                phase: [s / 1e12 for s in samples] for phase, samples in peak_samples.items()
            },
        },
    }
    summary = summarize(candidates, peak, baseline)
    print_report(console, meta, summary, baseline)
    return {"meta": meta, "models": summary}


def summarize(
    candidates: list[Candidate], peak: dict[str, float], baseline: str
) -> dict[str, dict]:
    """Every figure per model: throughput, TFLOP/s, MFU, memory and ratios against the
    baseline (under `vs_<baseline>`)."""
    reference = next((c for c in candidates if c.key == baseline), None)
    summary = {}
    for c in candidates:
        entry: dict = {
            "label": c.label,
            "params": c.params,
            "forward_gflop_per_img": c.forward_flops / 1e9,
        }
        for phase, result in c.phases.items():
            flops = c.forward_flops * (3 if phase == "train" else 1)  # backward ~ 2x forward
            achieved = flops * result.timing.median
            entry[phase] = {
                "img_per_s": result.timing.median,
                "img_per_s_windows": result.timing.img_per_s,
                "tflop_per_s": achieved / 1e12,
                "mfu": achieved / peak[phase],
                "peak_mem_mib": result.peak_memory / 2**20,
            }
            if phase == "train":
                entry[phase]["last_loss"] = result.timing.last.item()
        if reference is not None and c is not reference:
            entry[f"vs_{baseline}"] = {
                phase: ratios(result.timing.img_per_s, reference.phases[phase].timing.img_per_s)
                for phase, result in c.phases.items()
            }
        summary[c.key] = entry
    return summary


def print_report(console: Console, meta: dict, summary: dict[str, dict], baseline: str) -> None:
    console.print(
        f"{describe_host(meta)}, malloc {meta['malloc']}, "
        f"precision {meta['precision']} ({meta['dtype']}), "
        f"batch {meta['batch_size']} (eval {meta['eval_batch_size']}), {meta['img_size']} px"
        + (f", torch.compile mode={meta['compile_mode']}" if meta["compile"] else "")
    )
    mm = meta["matmul"]
    console.print(
        f"matmul peak ({mm['size']}² {mm['dtype']}, median of the rounds): "
        f"{mm['tflop_per_s']['train']:.3f} TFLOP/s while training, "
        f"{mm['tflop_per_s']['infer']:.3f} while inferring; img/s: medians of "
        f"{meta['windows']} windows x {meta['steps_per_window']} steps "
        f"after {meta['warmup']} warm-up steps"
    )
    vs = f"vs_{baseline}"
    compared = any(vs in entry for entry in summary.values())
    caption = f"vs {baseline}: ratio of medians (median of paired ratios)"
    table = Table(caption=caption if compared else None)
    for column in (
        "model",
        "params",
        "train img/s",
        "infer img/s",
        "train TFLOP/s",
        "train MFU",
        "infer MFU",
        "train peak mem",
        f"train vs {baseline}",
        f"infer vs {baseline}",
    ):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for entry in summary.values():
        train, infer = entry["train"], entry["infer"]
        table.add_row(
            entry["label"],
            f"{entry['params'] / 1e6:.2f}M",
            f"{train['img_per_s']:.1f}",
            f"{infer['img_per_s']:.1f}",
            f"{train['tflop_per_s']:.3f}",
            f"{train['mfu']:.1%}",
            f"{infer['mfu']:.1%}",
            f"{train['peak_mem_mib']:.0f} MiB",
            *(_format_ratio(entry.get(vs, {}).get(phase)) for phase in PHASES),
        )
    console.print(table)
    console.print(
        "peak mem: what one training step allocates at its peak above what was allocated "
        "before it (the allocator's count: CUDA's, or torch.profiler's on the CPU)."
    )
    for entry in summary.values():
        loss = entry["train"]["last_loss"]
        if not math.isfinite(loss):
            console.print(f"[red]{entry['label']}: the training loss is {loss}[/]")


def _format_ratio(ratio: dict[str, float] | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio['ratio_of_medians']:.3f}x ({ratio['median_of_paired_ratios']:.3f}x)"
