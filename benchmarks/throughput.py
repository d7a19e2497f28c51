"""Training and inference throughput of our models, side by side with timm's.

Takes the same Hydra overrides as `vit-train` (positional `key=value`), plus its own
`--flags`. Every model is measured with the same procedure in the same process
(benchmarks/timing.py): warm-up steps, then timed windows in which the models take turns
(the order rotates each round), so a change in machine load hits all of them alike.
Figures are medians over windows; against timm we also report the median of the per-round
(paired) ratios. Prints a table: params, train and infer img/s, TFLOP/s, MFU against the
host's matmul peak, peak memory, and the ratios against timm.

With `--runs "A" "B" ...` it times whole `vit-train` runs (the trainer's `fit`, with its
data, val and logging) of each quoted set of overrides, taking turns run by run, and prints
the training img/s that the trainer logs (the last epoch's), each run's wall time (val and
pictures included) and its final val top-1, with the paired ratios against the first set.
`--tensorboard-images` is `--runs` with the TensorBoard pictures every epoch and off.

With `--nproc N` it measures data parallelism instead: training img/s of N processes under
torchrun (DistributedDataParallel) against one process, at the same global batch
(`data.batch_size`, split between the N) and, on the CPU, the same total threads; the
setups alternate launch by launch and the ratio is printed.

Examples:
    python benchmarks/throughput.py model=vit_tiny data.batch_size=16
    python benchmarks/throughput.py model=vit_tiny data.batch_size=16 --nproc 2
    python benchmarks/throughput.py model=vit_tiny precision=bf16 data.batch_size=16 --naive-attention
    python benchmarks/throughput.py model=swin_tiny data.batch_size=16 --json outputs/benchmarks/swin.json
    python benchmarks/throughput.py model=vit_base --device cuda --compile --windows 10
    python benchmarks/throughput.py trainer.epochs=3 --tensorboard-images --rounds 5
    python benchmarks/throughput.py model=deit --runs precision=fp32 precision=amp --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vit_cli.composition import compose_train_config
from vit_cli.config import DeiTConfig, SwinConfig, TrainConfig, ViTConfig
from vit_cli.errors import UserError
from vit_cli.host_memory import keep_freed_memory
from vit_cli.models import build_model
from vit_cli.models.layers import Attention
from vit_cli.optim import build_optimizer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import resolve_device, start_runtime

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import (
    Timed,
    Timing,
    default_matmul_size,
    describe_host,
    device_name,
    host,
    make_console,
    make_infer_step,
    make_train_step,
    matmul_flops_per_s,
    measure,
    ratios,
    synchronize,
    take_turns,
)

# timm names by architecture, for the default peer: (embed_dim, depth, num_heads) for ViT,
# (embed_dim, depths, num_heads) for Swin.
TIMM_VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base"}
TIMM_SWIN_SIZES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "tiny",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "small",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "base",
}
PHASES = ("train", "infer")
PICTURES_ON_OFF = {
    "pictures on": ["trainer.images_every_n_epochs=1"],
    "pictures off": ["trainer.images_every_n_epochs=null"],
}


# ----------------------------------------------------------------------------- options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vit-train")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and phase")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per model and phase")
    parser.add_argument("--steps-per-window", type=int, default=5)
    parser.add_argument("--in-chans", type=int, default=3, help="input channels (3, as timm)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes (1000, as timm)")
    parser.add_argument("--timm-model", help="timm peer; default: derived from the config")
    parser.add_argument("--no-timm", action="store_true", help="measure without the timm peer")
    parser.add_argument(
        "--naive-attention",
        action="store_true",
        help="also measure our model with explicit softmax(q k^T / sqrt(d)) v attention",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--compile-mode", default="default", help="mode for torch.compile")
    parser.add_argument(
        "--matmul-size",
        type=int,
        help="side of the square peak matmul (default: 2048 CPU, 4096 CUDA)",
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc at its defaults instead of keeping freed memory, as the "
        "vit_cli commands do (vit_cli/host_memory.py)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="after timing, profile each model's train and infer steps (torch.profiler) and "
        "print its N ops of most self time",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        help="data-parallel mode: N processes (torchrun, DDP) against one, same global batch",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="with --nproc: threads per process of the N (default: CPU cores / N); the single "
        "process gets N times as many",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="with --nproc, --tensorboard-images or --runs: runs of each setup, alternating",
    )
    parser.add_argument(
        "--tensorboard-images",
        action="store_true",
        help="whole vit-train runs with the TensorBoard pictures on (every epoch) and off",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        metavar="OVERRIDES",
        help='whole vit-train runs of each quoted set of overrides ("" for none), taking '
        "turns, against the first",
    )
    # Internal: one measurement of --nproc mode, in the process (or torchrun job) it runs in.
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 0 or args.windows < 1 or args.steps_per_window < 1:
        parser.error("--windows and --steps-per-window must be positive, --warmup not negative")
    if (args.nproc is not None and args.nproc < 1) or args.rounds < 1:
        parser.error("--nproc and --rounds must be at least 1")
    return args


# ----------------------------------------------------------------------------- models


class NaiveAttention(nn.Module):
    """Attention as the seed guide writes it: softmax(q k^T / sqrt(d)) v, matmul by matmul.

    Shares the qkv and proj layers of the Attention it replaces, so the only difference
    from our model is the attention math (no fused kernel).
    """

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.qkv = attn.qkv
        self.attn_drop = nn.Dropout(attn.attn_drop)
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, N, N)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask
        x = self.attn_drop(scores.softmax(dim=-1)) @ v  # (B, nh, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def with_naive_attention(model: nn.Module) -> nn.Module | None:
    """A copy of `model` with every Attention swapped for NaiveAttention (None: it has none)."""
    naive = copy.deepcopy(model)
    swapped = 0
    for parent in naive.modules():
        for name, child in parent.named_children():
            if type(child) is Attention:
                setattr(parent, name, NaiveAttention(child))
                swapped += 1
    return naive if swapped else None


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


# ----------------------------------------------------------------------------- memory


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


# ----------------------------------------------------------------------------- measuring


@dataclass
class PhaseResult:
    timing: Timing  # img/s of every window, and the output of the last step
    peak_memory: int  # bytes, of one extra untimed step


@dataclass
class Candidate:
    key: str  # "ours", "timm" or "naive"
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


# ----------------------------------------------------------------------------- reporting


def summarize(candidates: list[Candidate], peak: dict[str, float]) -> dict[str, dict]:
    """Every figure per model: throughput, TFLOP/s, MFU, memory and ratios against timm."""
    peer = next((c for c in candidates if c.key == "timm"), None)
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
            memory = result.peak_memory
            entry[phase] = {
                "img_per_s": result.timing.median,
                "img_per_s_windows": result.timing.img_per_s,
                "tflop_per_s": achieved / 1e12,
                "mfu": achieved / peak[phase],
                "peak_mem_mib": memory / 2**20,
            }
            if phase == "train":
                entry[phase]["last_loss"] = result.timing.last.item()
        if peer is not None and c is not peer:
            entry["vs_timm"] = {
                phase: ratios(result.timing.img_per_s, peer.phases[phase].timing.img_per_s)
                for phase, result in c.phases.items()
            }
        summary[c.key] = entry
    return summary


def print_report(console: Console, meta: dict, summary: dict[str, dict]) -> None:
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
    has_peer = any("vs_timm" in entry for entry in summary.values())
    table = Table(
        caption="vs timm: ratio of medians (median of paired ratios)" if has_peer else None
    )
    for column in (
        "model",
        "params",
        "train img/s",
        "infer img/s",
        "train TFLOP/s",
        "train MFU",
        "infer MFU",
        "train peak mem",
        "train vs timm",
        "infer vs timm",
    ):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for entry in summary.values():
        train, infer, vs = entry["train"], entry["infer"], entry.get("vs_timm", {})
        table.add_row(
            entry["label"],
            f"{entry['params'] / 1e6:.2f}M",
            f"{train['img_per_s']:.1f}",
            f"{infer['img_per_s']:.1f}",
            f"{train['tflop_per_s']:.3f}",
            f"{train['mfu']:.1%}",
            f"{infer['mfu']:.1%}",
            f"{train['peak_mem_mib']:.0f} MiB",
            *(_format_ratio(vs.get(phase)) for phase in PHASES),
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


def print_profile(
    console: Console,
    title: str,
    step: Callable[[], torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """The `args.profile` ops of most self time over `--steps-per-window` steps of `step`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(args.steps_per_window):
            step()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events)
    table = Table(title=f"profile: {title}, self time per step")
    for column in ("op", "ms", "share", "calls"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for event in events[: args.profile]:
        self_us = getattr(event, attribute)
        table.add_row(
            event.key,
            f"{self_us / 1e3 / args.steps_per_window:.2f}",
            f"{self_us / total:.1%}",
            str(event.count // args.steps_per_window),
        )
    console.print(table)


def _format_ratio(ratio: dict[str, float] | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio['ratio_of_medians']:.3f}x ({ratio['median_of_paired_ratios']:.3f}x)"


# ----------------------------------------------------------------------------- main


def build_candidates(
    cfg: TrainConfig,
    args: argparse.Namespace,
    console: Console,
    img_size: int,
    sample: torch.Tensor,
) -> list[Candidate]:
    """Our model, the timm peer and the naive-attention variant, as asked for."""
    models: list[tuple[str, str, nn.Module]] = []
    torch.manual_seed(cfg.seed)
    ours = build_model(cfg.model, img_size, args.in_chans, args.num_classes)
    models.append(("ours", f"ours ({cfg.model.name})", ours))
    peer_name = None if args.no_timm else args.timm_model or timm_peer_name(cfg.model)
    if not args.no_timm and peer_name is None:
        console.print(
            "No timm model is known for this config: pass --timm-model NAME. Skipping the peer."
        )
    elif peer_name is not None and importlib.util.find_spec("timm") is None:
        console.print(
            'timm is not installed (pip install -e ".[dev]", or pip install timm): '
            "skipping the peer."
        )
    elif peer_name is not None:
        torch.manual_seed(cfg.seed)
        peer = build_timm_peer(peer_name, cfg.model, img_size, args.in_chans, args.num_classes)
        models.append(("timm", f"timm {peer_name}", peer))
    if args.naive_attention:
        naive = with_naive_attention(ours)
        if naive is None:
            console.print(
                f"{cfg.model.name} has no vit_cli Attention to swap: skipping naive attention."
            )
        else:
            models.append(("naive", "ours, naive attention", naive))

    candidates = []
    for key, label, model in models:
        model.to(sample.device)
        candidate = Candidate(
            key=key,
            label=label,
            model=model,
            params=sum(p.numel() for p in model.parameters()),
            forward_flops=forward_flops_per_image(model, sample),
        )
        if args.compile:
            candidate.model = torch.compile(model, mode=args.compile_mode)
        candidates.append(candidate)
    return candidates


def run(args: argparse.Namespace, console: Console) -> dict:
    kept = False if args.malloc_defaults else keep_freed_memory()
    cfg = compose_train_config(args.overrides)
    device = resolve_device(args.device or cfg.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)
    img_size = cfg.model.img_size or cfg.data.img_size
    batch_size = cfg.data.batch_size
    eval_batch_size = cfg.data.eval_batch_size or batch_size

    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (args.in_chans, img_size, img_size)
    images = torch.randn(batch_size, *shape, generator=generator).to(device)
    labels = torch.randint(args.num_classes, (batch_size,), generator=generator).to(device)
    eval_images = torch.randn(eval_batch_size, *shape, generator=generator).to(device)

    candidates = build_candidates(cfg, args, console, img_size, images)
    dtype = precision.autocast_dtype or torch.float32
    matmul = (args.matmul_size or default_matmul_size(device), dtype)
    train_steps = {
        c.key: make_train_step(
            c.model, build_optimizer(cfg.optimizer, c.model), precision, images, labels
        )
        for c in candidates
    }
    infer_steps = {c.key: make_infer_step(c.model, precision, eval_images) for c in candidates}
    # MFU divides by the peak measured in the same phase, under the same machine load.
    peak_samples = {
        "train": measure_phase("train", candidates, train_steps, batch_size, args, device, matmul),
        "infer": measure_phase(
            "infer", candidates, infer_steps, eval_batch_size, args, device, matmul
        ),
    }
    peak = {phase: statistics.median(samples) for phase, samples in peak_samples.items()}

    meta = {
        **host(device),
        "malloc": "freed memory kept" if kept else "defaults",
        "precision": precision.label,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "img_size": img_size,
        "in_chans": args.in_chans,
        "num_classes": args.num_classes,
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
    summary = summarize(candidates, peak)
    print_report(console, meta, summary)
    if args.profile:
        for phase, steps in (("train", train_steps), ("infer", infer_steps)):
            for c in candidates:
                c.model.train(phase == "train")
                print_profile(console, f"{c.label}, {phase}", steps[c.key], args, device)
    return {"meta": meta, "models": summary}


# ----------------------------------------------------------------------------- data parallel


def ddp_worker(args: argparse.Namespace) -> None:
    """Time training steps of this process, alone or as one of a torchrun job (DDP); the main
    process writes the img/s of every window, over all processes, to `args.ddp_worker`."""
    if not args.malloc_defaults:
        keep_freed_memory()
    cfg = compose_train_config(args.overrides)
    with start_runtime(args.device or cfg.device, cfg.trainer.dist_timeout_s) as runtime:
        device = runtime.device
        precision = resolve_precision(cfg.precision.name, device, cfg.precision.allow_tf32)
        img_size = cfg.model.img_size or cfg.data.img_size
        batch_size = cfg.data.batch_size
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, img_size, args.in_chans, args.num_classes).to(device)
        step_model = runtime.wrap(model)
        if args.compile:
            step_model = torch.compile(step_model, mode=args.compile_mode)
        generator = torch.Generator().manual_seed(cfg.seed + runtime.rank)
        images = torch.randn(batch_size, args.in_chans, img_size, img_size, generator=generator)
        labels = torch.randint(args.num_classes, (batch_size,), generator=generator)
        optimizer = build_optimizer(cfg.optimizer, model)
        step = make_train_step(
            step_model, optimizer, precision, images.to(device), labels.to(device)
        )
        global_batch = batch_size * runtime.world_size
        timed = Timed(step, global_batch, args.steps_per_window)
        timing = measure({"train": timed}, warmup=args.warmup, windows=args.windows, device=device)
        if runtime.is_main:
            report = {
                "img_per_s_windows": timing["train"].img_per_s,
                "processes": runtime.world_size,
                "threads_per_process": torch.get_num_threads(),
                "batch_size": batch_size,
                "device": device.type,
            }
            args.ddp_worker.write_text(json.dumps(report) + "\n")


def run_data_parallel(args: argparse.Namespace, console: Console) -> dict:
    """Launch one process and N processes in turn, `--rounds` times each, and compare."""
    cfg = compose_train_config(args.overrides)
    nproc, global_batch = args.nproc, cfg.data.batch_size
    if global_batch % nproc:
        raise UserError(
            f"data.batch_size={global_batch} (the global batch) is not divisible by --nproc {nproc}."
        )
    device = resolve_device(args.device or cfg.device)
    cuda = device.type == "cuda"
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    script = [str(Path(__file__).resolve()), *args.overrides, f"--warmup={args.warmup}",
              f"--windows={args.windows}", f"--steps-per-window={args.steps_per_window}",
              f"--in-chans={args.in_chans}", f"--num-classes={args.num_classes}"]  # fmt: skip
    if args.device:
        script.append(f"--device={args.device}")
    if args.compile:
        script += ["--compile", f"--compile-mode={args.compile_mode}"]
    if args.malloc_defaults:
        script.append("--malloc-defaults")
    setups = {
        "one": ([sys.executable, *script, f"data.batch_size={global_batch}"], threads * nproc),
        "ddp": (
            [*torchrun.split(), "--standalone", f"--nproc_per_node={nproc}", *script,
             f"data.batch_size={global_batch // nproc}"],
            threads,
        ),
    }  # fmt: skip
    # The host's speed, for figures quoted apart from their ratio: one process, all threads.
    torch.set_num_threads(threads * nproc)
    matmul_size = args.matmul_size or default_matmul_size(device)
    peak = matmul_flops_per_s(matmul_size, torch.float32, device)

    def launcher(name: str, tmp: Path) -> Callable[[int], dict]:
        def launch(round_: int) -> dict:
            command, omp_threads = setups[name]
            out = tmp / f"{name}{round_}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
            done = subprocess.run(
                [*command, f"--ddp-worker={out}"], env=env, capture_output=True, text=True
            )
            if done.returncode != 0 and not out.is_file():
                raise UserError(
                    f"the {name} setup failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            if done.returncode != 0:
                # The figures were written; a process failed as the job shut down.
                tail = (done.stdout + done.stderr).strip().splitlines()[-1:]
                console.print(
                    f"note: the {name} setup exited with status {done.returncode} after writing "
                    f"its figures: {' '.join(tail)}"
                )
            report = json.loads(out.read_text())
            img_per_s = statistics.median(report["img_per_s_windows"])
            console.print(f"round {round_ + 1}: {name} {img_per_s:.1f} img/s")
            return report

        return launch

    with tempfile.TemporaryDirectory() as tmp:
        launches = {name: launcher(name, Path(tmp)) for name in setups}
        results = take_turns(launches, args.rounds)
    medians = {
        name: [statistics.median(r["img_per_s_windows"]) for r in runs]
        for name, runs in results.items()
    }
    summary = {
        "setups": {
            name: {
                "processes": runs[0]["processes"],
                "threads_per_process": runs[0]["threads_per_process"],
                "batch_per_process": runs[0]["batch_size"],
                "img_per_s": statistics.median(medians[name]),
                "img_per_s_rounds": medians[name],
            }
            for name, runs in results.items()
        },
        **ratios(medians["ddp"], medians["one"]),
        "ideal_ratio": float(nproc) if cuda else 1.0,
        "matmul_tflop_per_s": peak / 1e12,
        "matmul_size": matmul_size,
        "global_batch": global_batch,
        "device": "cuda" if cuda else "cpu",
        "overrides": args.overrides,
    }
    table = Table(
        caption=f"global batch {global_batch}; img/s: median over {args.rounds} launches of the median of {args.windows} windows"
    )
    for column in ("setup", "processes x threads", "batch per process", "train img/s"):
        table.add_column(column, justify="left" if column == "setup" else "right")
    for name, label in (("one", "one process"), ("ddp", f"{nproc} processes (DDP)")):
        entry = summary["setups"][name]
        table.add_row(
            label,
            f"{entry['processes']} x {entry['threads_per_process']}",
            str(entry["batch_per_process"]),
            f"{entry['img_per_s']:.1f}",
        )
    console.print(table)
    console.print(
        f"{device_name(device)}; fp32 matmul {matmul_size}² with {threads * nproc} threads: "
        f"{peak / 1e9:.0f} GFLOP/s"
    )
    ideal = "ideal: N on N GPUs against one" if cuda else "ideal: 1.0 with the same cores"
    console.print(
        f"{nproc} processes / one process: {summary['ratio_of_medians']:.3f}x (paired {summary['median_of_paired_ratios']:.3f}x; {ideal})"
    )
    return summary


# ----------------------------------------------------------------------------- whole runs


def run_whole_runs(
    args: argparse.Namespace, console: Console, setups: dict[str, list[str]]
) -> dict:
    """Whole training runs (the trainer's `fit`) of each setup, the setups taking turns run
    by run: each setup's overrides come after the command line's."""
    from vit_cli.trainer import fit

    if not args.malloc_defaults:
        keep_freed_memory()

    def trainer(name: str, tmp: Path) -> Callable[[int], dict]:
        def train(round_: int) -> dict:
            cfg = compose_train_config([*args.overrides, *setups[name]])
            if args.device:
                cfg.device = args.device
            run_dir = tmp / f"setup{list(setups).index(name)}_round{round_}"
            result = fit(cfg, run_dir)
            metrics = result.final_metrics
            console.print(
                f"round {round_ + 1}, {name}: train {metrics['throughput']:.1f} img/s, "
                f"final val top-1 {metrics['val/acc1']:.2f}%, run {result.wall_time:.1f} s"
            )
            return {
                "train_img_per_s": metrics["throughput"],  # the last epoch's, as logged
                "final_acc1": metrics["val/acc1"],
                "wall_s": result.wall_time,
            }

        return train

    with tempfile.TemporaryDirectory() as tmp:
        runs = take_turns({name: trainer(name, Path(tmp)) for name in setups}, args.rounds)
    first, *others = setups
    summary = {
        key: {name: statistics.median(r[key] for r in runs[name]) for name in setups}
        for key in ("train_img_per_s", "final_acc1", "wall_s")
    }
    table = Table(
        caption=f"medians over {args.rounds} runs of each; ratio: median of paired ratios"
    )
    table.add_column("figure")
    for name in setups:
        table.add_column(name, justify="right")
    for name in others:
        table.add_column(f"{name} / {first}", justify="right")
    for key, label in (
        ("train_img_per_s", "train img/s (logged)"),
        ("wall_s", "run wall time (s)"),
        ("final_acc1", "final val top-1 (%)"),
    ):
        paired = [
            ratios([r[key] for r in runs[name]], [r[key] for r in runs[first]]) for name in others
        ]
        summary[key]["ratio"] = {
            name: ratio["median_of_paired_ratios"]
            for name, ratio in zip(others, paired, strict=True)
        }
        table.add_row(
            label,
            *(f"{summary[key][name]:.2f}" for name in setups),
            *(f"{ratio['median_of_paired_ratios']:.3f}" for ratio in paired),
        )
    console.print(table)
    return {"overrides": args.overrides, "setups": setups, "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ddp_worker is not None:
        ddp_worker(args)
        return 0
    console = make_console()
    try:
        if args.tensorboard_images:
            results = run_whole_runs(args, console, PICTURES_ON_OFF)
        elif args.runs:
            results = run_whole_runs(args, console, {s or "as given": s.split() for s in args.runs})
        elif args.nproc:
            results = run_data_parallel(args, console)
        else:
            results = run(args, console)
    except (UserError, HydraException, OmegaConfBaseException) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
