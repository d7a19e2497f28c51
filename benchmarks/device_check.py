"""Every CUDA path of vit_cli in one prepared command: a table of pass/fail and figures.

For the first minutes on a GPU, which leave no time to edit anything there: one command, at
most 8 minutes on one GPU. The checks, in the order they run (the compiled ones last, as
they take longest):

- host: the device, the versions, and the matmul peak (bf16 on CUDA, fp32 on the CPU).
- train/<family>/<precision>: a few optimizer steps of the ViT, the DeiT (distilled, with a
  torchvision teacher) and the Swin, in fp32, amp and bf16, through the trainer's own parts
  (`build_components`, `train_one_epoch`): the loss is finite, and in amp a step whose
  gradients are made inf is skipped by the GradScaler, which halves its scale and leaves
  the weights as they were.
- digits/*: `vit-train` on the built-in digits to its usual accuracy (best val top-1 at
  least 98.5%); then, on its best.pt, `vit-eval` (reproduces the top-1 logged in training),
  `vit-predict` (agrees with vit-eval on val images written as PNG files) and `vit-export`
  to a torch.export program and to TorchScript on the device (each compared by vit-export
  with the model itself). vit-train runs as a command; the others' `main(argv)` runs in
  this process, which spares a new interpreter's seconds of imports each.
- torchrun/1: `vit-train` under `torchrun --nproc_per_node=1`, which is one process: vit_cli
  starts a process group only for several. So dist/ddp sets up a process group of one
  (NCCL on CUDA, gloo on the CPU), all-reduces, and steps DistributedDataParallel against
  the bare model. torchrun/2 (NCCL between two GPUs) where the machine has two or more.
- decode/*: data.decode=device (nvjpeg on CUDA): the device's crops of JPEG files against
  the workers' decode of the same files, then a short `vit-train` on a generated folder.
- throughput/<model>/<precision>: throughput.py, ours against timm: ViT-B/16 and Swin-T at
  batch 128, in bf16 and fp16; MFU against the matmul peak measured in the autocast dtype,
  peak memory against timm's.
- train/<family>/<precision>+compile: the training steps with trainer.compile=true.
- throughput/<model>/bf16+compile: `throughput.py --compile --with-eager`, ours and timm's
  each eager and compiled, with the compile time (compiling them again in fp16 would not
  fit the 8 minutes).

`--device cpu` (the default without CUDA) runs the same checks small, so that the script
cannot rot before a GPU appears, in under a minute of two cores: tiny models, a 10-step
digits run under torchrun (in torchrun/1's place) whose accuracy is not checked, trainer.compile only for train/vit/fp32 (a
compile costs ~15 s of a CPU), amp as fp16 autocast with torch.amp.GradScaler("cpu")
(vit_cli's amp is bf16 or fp32 on a CPU), no TorchScript export, and the throughput of
vit_tiny alone, at 32 px, batch 4, fp32, eager.

Each check's name is printed as it starts. The table is written as JSON and Markdown after
every check, so that a run cut short leaves what it did: to `--out`, else `$OUT`, else
outputs/device_check/; with each command's output under logs/ and throughput.py's reports
under throughput/. At the end of `--budget-min` a running command is stopped and no check
starts: they are reported as skipped. Exits 1 if a check failed.

The CUDA branches have not yet run on a GPU: they are written from the CPU ones and torch's
documented API.

Examples:
    python benchmarks/device_check.py
    python benchmarks/device_check.py --device cpu --out /tmp/device_check
    python benchmarks/device_check.py --only 'train/*' --only 'decode/*'
    python benchmarks/device_check.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import fnmatch
import gc
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_sample_image
from torch.nn.parallel import DistributedDataParallel

from vit_cli import eval_cli, export_cli, predict_cli
from vit_cli.checkpoint import load_checkpoint
from vit_cli.components import build_components
from vit_cli.composition import compose_train_config
from vit_cli.config import AugmentConfig
from vit_cli.data import FileReader, ImageFiles, SkipCounter, build_data
from vit_cli.data._device_decode import BytesReader, DeviceDecoder, EncodedCollate
from vit_cli.loop import LoopExit, Training, train_one_epoch
from vit_cli.models import build_model
from vit_cli.precision import Precision
from vit_cli.runtime import Runtime
from vit_cli.sinks import Sinks
from vit_cli.train_state import TrainState

# benchmarks/timing.py, found as a sibling: Python puts a script's folder first on sys.path.
from timing import describe_host, host, make_console, matmul_flops_per_s, torchrun_command

# ----------------------------------------------------------------------------- settings

# Tiny models: the checks are of code paths, not of models.
FAMILIES = {
    "vit": ["model=vit", "model.embed_dim=32", "model.depth=1", "model.num_heads=2"],
    "deit": ["model=deit", "model.embed_dim=32", "model.depth=1", "model.num_heads=2"],
    # Two blocks in the first stage, the second shifted under a mask; one in the last.
    "swin": ["model=swin", "model.embed_dim=16", "model.depths=[2,1]", "model.num_heads=[1,2]"],
}
PRECISIONS = ("fp32", "amp", "bf16")
TRAIN_STEPS = 3  # before the injected overflow
# A short vit-train on digits: the CPU's digits run, torchrun's and the JPEG folder's.
SHORT_RUN = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "data.batch_size=32",
    "trainer.epochs=1",
    "trainer.max_steps=10",
    "scheduler.warmup_epochs=0",
    "trainer.images_every_n_epochs=null",
]
# The default digits run ends at 99.2-99.7% best val top-1 (docs/results.md, "Training on
# the built-in digits"); 98.5% is 4 images below the lowest seed's.
DIGITS_MIN_ACC1 = 98.5
PREDICT_EVERY = 9  # vit-predict takes every 9th of the 360 val digits: 40 PNG files
# vit-predict reads PNG files of round(255 x), vit-eval the stored x: probabilities move by
# a few hundredths, and the top-1 may differ only where the best two are that close.
PREDICT_PROB_TOLERANCE = 0.05
DECODE_SIZE = 64  # the crops compared on the device and on the workers
DECODE_MAX_MAE = 2.0  # mean |difference| in 0-255 levels, as tests/test_device_decode.py
EXIF_ORIENTATION = 0x0112
# (model, precision, compiled): ViT-B/16 and Swin-T on CUDA, compiled in bf16 only (compiling
# both again for fp16 would not fit the 8 minutes); vit_tiny at 32 px on the CPU.
THROUGHPUT_CUDA = [
    ("vit_base", "bf16", False),
    ("vit_base", "amp", False),
    ("swin_tiny", "bf16", False),
    ("swin_tiny", "amp", False),
    ("vit_base", "bf16", True),
    ("swin_tiny", "bf16", True),
]
THROUGHPUT_CPU = [("vit_tiny", "fp32", False)]
THROUGHPUT_ARGS_CUDA = ["data.batch_size=128", "--warmup=3", "--windows=5", "--steps-per-window=5"]
THROUGHPUT_ARGS_CPU = ["model.img_size=32", "data.batch_size=4", "--warmup=1", "--windows=2",
                       "--steps-per-window=1", "--matmul-size=256"]  # fmt: skip
COMMAND_TIMEOUT_S = 300  # a command that runs longer has hung


# ----------------------------------------------------------------------------- the runner


class CheckFailed(Exception):
    """A check's verdict: what was expected and what came instead."""


class OverBudget(Exception):
    """The check was stopped, or not started, at the end of --budget-min."""


@dataclass
class Context:
    device: torch.device
    work: Path  # scratch: runs, checkpoints, image files
    out: Path
    console: Console
    deadline: float  # time.monotonic() at the end of the budget
    made: dict[str, Path] = field(default_factory=dict)  # what a check leaves for later ones

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def needs(self, key: str, check: str) -> Path:
        if key not in self.made:
            raise CheckFailed(f"needs {check}, which failed or did not run")
        return self.made[key]


@dataclass
class Outcome:
    figures: dict[str, Any]
    note: str = ""


@dataclass
class Check:
    name: str
    run: Callable[[Context], Outcome]


@dataclass
class Result:
    name: str
    status: str  # pass, fail or skip
    seconds: float
    figures: dict[str, Any]
    note: str


def run_check(check: Check, ctx: Context) -> Result:
    """Run one check; whatever it raises fails it alone, and the next one starts clean."""
    ctx.console.print(f"[bold]{check.name}[/]")
    start = time.perf_counter()
    try:
        if time.monotonic() > ctx.deadline:
            raise OverBudget("not started: over the budget")
        outcome = check.run(ctx)
        status, figures, note = "pass", outcome.figures, outcome.note
    except CheckFailed as e:
        status, figures, note = "fail", {}, str(e)
    except OverBudget as e:
        status, figures, note = "skip", {}, str(e)
    except Exception as e:
        status, figures, note = "fail", {}, f"{type(e).__name__}: {e}"
        log_path(ctx, check.name).write_text(traceback.format_exc())
    finally:
        # Compiled graphs and cached blocks of one check must not weigh on the next.
        torch._dynamo.reset()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    result = Result(check.name, status, time.perf_counter() - start, figures, note)
    style = {"pass": "green", "fail": "red", "skip": "yellow"}[status]
    ctx.console.print(
        f"  [{style}]{status}[/] in {result.seconds:.1f} s  {format_figures(figures)}  {note}"
    )
    return result


def run_all(checks: list[Check], ctx: Context, meta: dict) -> list[Result]:
    """Every check in order, writing the reports after each."""
    start = time.monotonic()
    results: list[Result] = []
    for check in checks:
        results.append(run_check(check, ctx))
        meta["seconds"] = time.monotonic() - start
        write_reports(results, meta, ctx.out)
    return results


def log_path(ctx: Context, name: str) -> Path:
    path = ctx.out / "logs" / f"{name.replace('/', '_')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def command(ctx: Context, name: str, argv: list[str]) -> str:
    """Run `argv` in the scratch folder, its output saved to logs/<name>.log; returns its
    stdout. Past COMMAND_TIMEOUT_S (a hang) or the budget's end, its whole process group is
    killed (torchrun's workers too)."""
    env = {**os.environ, "COLUMNS": "200", "HYDRA_FULL_ERROR": "1"}
    start = time.monotonic()
    if start >= ctx.deadline:
        raise OverBudget("not started: over the budget")
    at_deadline = ctx.deadline - start < COMMAND_TIMEOUT_S
    proc = subprocess.Popen(
        argv, cwd=ctx.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=min(COMMAND_TIMEOUT_S, ctx.deadline - start))
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        killed = True
    log = log_path(ctx, name)
    log.write_text(f"$ {' '.join(argv)}\n\n{stdout}\n--- stderr ---\n{stderr}")
    seconds = time.monotonic() - start
    if killed and at_deadline:
        raise OverBudget(f"stopped at the end of the budget after {seconds:.0f} s")
    if killed:
        raise CheckFailed(f"still running after {seconds:.0f} s (logs/{log.name})")
    if proc.returncode != 0:
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
        raise CheckFailed(f"exit status {proc.returncode}: {last.strip()} (logs/{log.name})")
    return stdout


def vit_train() -> list[str]:
    """vit-train, run by this script's interpreter (its environment, its torch)."""
    return [sys.executable, "-m", "vit_cli.train"]


def in_process(ctx: Context, name: str, main: Callable[[list[str]], Any], argv: list[str]) -> str:
    """A vit_cli command's `main(argv)` in this process: its parsing and its code, without a
    new interpreter's seconds of imports. Returns what it printed, saved to logs/<name>.log."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(argv)
        status = 0
    except SystemExit as e:  # how the commands end on an error, and vit-predict always
        status = e.code or 0
    log = log_path(ctx, name)
    log.write_text(f"main({argv})\n\n{stdout.getvalue()}\n--- stderr ---\n{stderr.getvalue()}")
    if status != 0:
        last = next((line for line in reversed(stderr.getvalue().splitlines()) if line.strip()), "")
        raise CheckFailed(f"exit status {status}: {last.strip()} (logs/{log.name})")
    return stdout.getvalue()


# ----------------------------------------------------------------------------- host


def host_check(ctx: Context) -> Outcome:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    size = 8192 if ctx.cuda else 1024
    peak = matmul_flops_per_s(size, dtype, ctx.device)
    figures: dict[str, Any] = {f"{str(dtype).removeprefix('torch.')} matmul TFLOP/s": peak / 1e12}
    if ctx.cuda:
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability(ctx.device)))
        figures["CUDA"] = torch.version.cuda
        version = torch.cuda.nccl.version()  # a tuple in torch 2, an int before
        figures["NCCL"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
        figures["GPUs"] = torch.cuda.device_count()
    return Outcome(figures, describe_host(host(ctx.device)))


# ----------------------------------------------------------------------------- training steps


def train_checks(cuda: bool, compiled: bool) -> list[Check]:
    checks = []
    for family in FAMILIES:
        for precision in PRECISIONS:
            # A compile costs ~15 s of a CPU: there, one stands for all.
            if compiled and not cuda and (family, precision) != ("vit", "fp32"):
                continue
            name = f"train/{family}/{precision}" + ("+compile" if compiled else "")
            checks.append(Check(name, partial(train_steps, family, precision, compiled)))
    return checks


def train_steps(family: str, precision: str, compiled: bool, ctx: Context) -> Outcome:
    """TRAIN_STEPS optimizer steps on digits, as vit-train takes them; in amp, one more with
    inf gradients."""
    switch = "true" if compiled else "false"
    overrides = [*FAMILIES[family], f"precision={precision}", f"trainer.compile={switch}",
                 f"trainer.max_steps={TRAIN_STEPS + 1}", "data.batch_size=32",
                 "scheduler.warmup_epochs=0"]  # fmt: skip
    if family == "deit":
        weights = teacher_weights(ctx)
        overrides += ["distill.teacher.arch=resnet18", f"distill.teacher.weights={weights}"]
    cfg = compose_train_config(overrides)
    torch.manual_seed(cfg.seed)
    c = build_components(cfg, Runtime(ctx.device))
    training = c.training
    if precision == "amp" and not ctx.cuda:
        training = fp16_on_cpu(training)
    expected = {"fp32": "fp32", "amp": "fp16", "bf16": "bf16"}[precision]
    if training.precision.chosen != expected:
        raise CheckFailed(f"precision={precision} came to {training.precision.chosen}")
    state = TrainState()
    step_to(training, state, TRAIN_STEPS)
    figures: dict[str, Any] = {"loss": state.loss_sum / state.seen}
    if not math.isfinite(figures["loss"]):
        raise CheckFailed(f"the loss is {figures['loss']}")
    if family == "deit":
        if not c.distilling:
            raise CheckFailed("the DeiT student has no teacher")
        figures["loss_distill"] = state.part_sums["loss_distill"] / state.seen
    if training.updater.scaler.is_enabled():
        figures.update(injected_overflow(training, state))
    elif precision == "amp":
        raise CheckFailed("amp runs in fp16 without a GradScaler")
    note = "fp16 forced on the CPU" if precision == "amp" and not ctx.cuda else ""
    return Outcome(figures, note)


def teacher_weights(ctx: Context) -> Path:
    """A random resnet18's state_dict: the teacher's path is the check, not its accuracy."""
    path = ctx.work / "teacher_resnet18.pt"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def fp16_on_cpu(training: Training) -> Training:
    """amp as CUDA runs it, fp16 autocast and a GradScaler, which torch also has for the
    CPU: vit_cli's amp is bf16 or fp32 there, without a scaler."""
    fp16 = Precision("amp", "cpu", torch.float16)
    training.updater.scaler = fp16.grad_scaler()
    return dataclasses.replace(training, precision=fp16)


def step_to(training: Training, state: TrainState, step: int) -> None:
    """Train on until optimizer step `step`, through the loop vit-train runs."""

    def pause(s: TrainState) -> LoopExit | None:
        return LoopExit.MAX_STEPS if s.step >= step else None

    train_one_epoch(training, state, Sinks([]), pause)
    if state.step < step:
        raise CheckFailed(f"the epoch ended at step {state.step}, before step {step}")


def injected_overflow(training: Training, state: TrainState) -> dict[str, Any]:
    """One step whose gradients of one weight are inf: the scaler must skip it, halve its
    scale and leave the weights unchanged."""
    scaler = training.updater.scaler
    weight = next(p for p in training.updater.model.parameters() if p.requires_grad)
    kept, scale, skipped = weight.detach().clone(), scaler.get_scale(), state.skipped_steps
    hook = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    try:
        step_to(training, state, state.step + 1)
    finally:
        hook.remove()
    after = scaler.get_scale()
    if state.skipped_steps != skipped + 1:
        raise CheckFailed(f"the step with inf gradients was not skipped (scale {scale} -> {after})")
    if after != scale * scaler.get_backoff_factor():
        raise CheckFailed(f"the loss scale went from {scale} to {after}, not halved")
    if not torch.equal(weight.detach(), kept):
        raise CheckFailed("a skipped step changed the weights")
    return {"scale": scale, "after overflow": after}


# ----------------------------------------------------------------------------- digits, CLIs


def digits_checks(cuda: bool) -> list[Check]:
    checks = [
        Check("digits/vit-train", digits_train),
        Check("digits/vit-eval", digits_eval),
        Check("digits/vit-predict", digits_predict),
        Check("digits/vit-export-exported", partial(digits_export, "exported")),
    ]
    if cuda:  # TorchScript is deprecated; on a CPU it would add seconds for a dying path
        checks.append(Check("digits/vit-export-torchscript", partial(digits_export, "torchscript")))
    return checks


def digits_train(ctx: Context) -> Outcome:
    """The default digits run on CUDA; on the CPU a 10-step one, under torchrun (one
    process), where it stands for torchrun/1: a second short run would only cost its start."""
    run = ctx.work / "digits"
    if ctx.cuda:
        argv = [*vit_train(), f"device={ctx.device}", f"hydra.run.dir={run}"]
    else:
        launch = [*torchrun_command(), "--standalone", "--nproc_per_node=1", "-m", "vit_cli.train"]
        argv = [*launch, f"device={ctx.device}", *SHORT_RUN, f"hydra.run.dir={run}"]
    command(ctx, "digits/vit-train", argv)
    best = load_checkpoint(run / "best.pt")
    ctx.made["digits"] = run
    acc1 = best["metrics"]["val/acc1"]
    figures = {"best val top-1 %": acc1, "epoch": best["state"]["epoch"]}
    if ctx.cuda and acc1 < DIGITS_MIN_ACC1:
        raise CheckFailed(f"best val top-1 {acc1:.2f}% < {DIGITS_MIN_ACC1}%")
    return Outcome(figures, "" if ctx.cuda else "10 steps under torchrun: accuracy not checked")


def digits_eval(ctx: Context) -> Outcome:
    run = ctx.needs("digits", "digits/vit-train")
    out = run / "eval"
    argv = [str(run / "best.pt"), "--device", str(ctx.device), "--out", str(out)]
    in_process(ctx, "digits/vit-eval", eval_cli.main, argv)
    metrics = json.loads((out / "metrics.json").read_text())
    if metrics["acc1"] != metrics["logged_acc1"]:
        raise CheckFailed(f"top-1 {metrics['acc1']}% but {metrics['logged_acc1']}% logged")
    ctx.made["eval"] = out
    return Outcome({"top-1 %": metrics["acc1"], "img/s": metrics["throughput_img_per_s"]})


def digits_predict(ctx: Context) -> Outcome:
    """vit-predict on val digits written as PNG files, against vit-eval's predictions of
    the stored digits."""
    run = ctx.needs("digits", "digits/vit-train")
    evaluated = ctx.needs("eval", "digits/vit-eval")
    folder = ctx.work / "digits_png"
    cfg = compose_train_config([]).data
    images, _ = build_data(cfg, cfg.img_size, torch.Generator()).val_loader.dataset.tensors
    chosen = range(0, len(images), PREDICT_EVERY)
    for i in chosen:
        write_png(images[i], folder / f"{i:03d}.png")
    argv = [str(run / "best.pt"), str(folder), "--json", "--topk", "10", "--device",
            str(ctx.device)]  # fmt: skip
    printed = in_process(ctx, "digits/vit-predict", predict_cli.main, argv)
    lines = [json.loads(line) for line in printed.splitlines()]
    predicted = {Path(line["path"]).stem: line["predictions"] for line in lines}
    with (evaluated / "predictions.csv").open() as f:
        stored = list(csv.DictReader(f))
    if len(predicted) != len(chosen):
        raise CheckFailed(f"{len(predicted)} of {len(chosen)} files classified")
    worst, same_top1 = 0.0, 0
    for i in chosen:
        top = predicted[f"{i:03d}"]
        probs = {p["label"]: p["prob"] for p in top}
        worst = max(worst, abs(probs[stored[i]["predicted"]] - float(stored[i]["prob"])))
        same_top1 += top[0]["label"] == stored[i]["predicted"]
        if top[0]["prob"] - top[1]["prob"] > PREDICT_PROB_TOLERANCE and (
            top[0]["label"] != stored[i]["predicted"]
        ):
            raise CheckFailed(
                f"val image {i}: {top[0]['label']}, vit-eval: {stored[i]['predicted']}"
            )
    if worst > PREDICT_PROB_TOLERANCE:
        raise CheckFailed(f"a probability differs from vit-eval's by {worst:.3f}")
    return Outcome({"images": len(chosen), "same top-1": same_top1, "max |prob diff|": worst})


def write_png(image: torch.Tensor, path: Path) -> None:
    """A (1, H, W) image in [0, 1] as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(path)


def digits_export(format: str, ctx: Context) -> Outcome:
    """vit-export compares the program it wrote with the model, on the device, itself."""
    run = ctx.needs("digits", "digits/vit-train")
    output = run / "export" / ("model.pt2" if format == "exported" else "model.torchscript.pt")
    argv = [str(run / "best.pt"), "--format", format, "--device", str(ctx.device), "--output",
            str(output)]  # fmt: skip
    stdout = in_process(ctx, f"digits/vit-export-{format}", export_cli.main, argv)
    found = re.search(r"max \|difference\| (\S+) \(tolerance (\S+)\)", stdout)
    if found is None:
        raise CheckFailed("vit-export printed no comparison with the model")
    return Outcome({"max |diff|": float(found[1]), "tolerance": float(found[2])})


# ----------------------------------------------------------------------------- processes


def distributed_checks(cuda: bool) -> list[Check]:
    checks = [Check("dist/ddp", ddp_one_process)]
    if cuda:  # on the CPU, digits/vit-train runs under torchrun
        checks.insert(0, Check("torchrun/1", partial(torchrun_train, 1)))
    if cuda and torch.cuda.device_count() >= 2:
        checks.append(Check("torchrun/2", partial(torchrun_train, 2)))
    return checks


def torchrun_train(nproc: int, ctx: Context) -> Outcome:
    run = ctx.work / f"torchrun{nproc}"
    launch = [*torchrun_command(), "--standalone", f"--nproc_per_node={nproc}", "-m"]
    argv = [
        *launch,
        "vit_cli.train",
        f"device={ctx.device.type}",
        *SHORT_RUN,
        f"hydra.run.dir={run}",
    ]
    command(ctx, f"torchrun/{nproc}", argv)
    steps = load_checkpoint(run / "last.pt")["state"]["step"]
    joined = f"x {nproc} process(es)" in (run / "train.log").read_text()
    if not joined:
        raise CheckFailed(f"train.log names no job of {nproc} processes")
    backend = "NCCL" if ctx.cuda else "gloo"
    note = "one process: no process group" if nproc == 1 else f"{backend} between {nproc}"
    return Outcome({"steps": steps}, note)


def ddp_one_process(ctx: Context) -> Outcome:
    """A process group of one on the device's backend: an all-reduce, and one training step
    of DistributedDataParallel whose gradients must be the bare model's."""
    backend = "nccl" if ctx.cuda else "gloo"
    device = ctx.device
    if ctx.cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    store = ctx.work / "process_group_store"
    dist.init_process_group(backend, init_method=store.as_uri(), rank=0, world_size=1)
    try:
        total = torch.ones(4, device=device)
        dist.all_reduce(total)
        torch.manual_seed(0)
        model = build_model(compose_train_config(FAMILIES["vit"]).model, 16, 1, 10).to(device)
        bare = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if ctx.cuda else None)
        images = torch.randn(8, 1, 16, 16, device=device)
        labels = torch.randint(10, (8,), device=device)
        for net in (ddp, bare):
            F.cross_entropy(net(images), labels).backward()
        pairs = zip(model.parameters(), bare.parameters(), strict=True)
        worst = max(float((a.grad - b.grad).abs().max()) for a, b in pairs)
    finally:
        dist.destroy_process_group()
    if not torch.equal(total.cpu(), torch.ones(4)):
        raise CheckFailed(f"all-reduce over one process gave {total.tolist()}")
    if worst > 1e-6:
        raise CheckFailed(f"DDP's gradients differ from the bare model's by {worst:.2g}")
    figures: dict[str, Any] = {"backend": backend, "max |grad diff|": worst}
    return Outcome(figures, "torch's DDP; vit-train uses it from two processes on")


# ----------------------------------------------------------------------------- decoding


def decode_checks() -> list[Check]:
    return [Check("decode/parity", decode_parity), Check("decode/vit-train", decode_train)]


def jpeg_folder(ctx: Context) -> Path:
    """train/ and val/ with classes a and b: crops of a photograph as JPEG files, and in
    train/a the files the device path treats apart: grey, turned by EXIF, CMYK, PNG."""
    root = ctx.work / "jpegs"
    if root.exists():
        return root
    # Upsampled as tests/test_image_files.py's photo(): crops of many pixels, as a camera's.
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((1280, 853), Image.BICUBIC)
    for split, count in (("train", 8), ("val", 4)):
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = photo.crop((48 * i, 24 * i, 48 * i + 640, 24 * i + 480))
                if label:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                image.save(folder / f"{i}.jpg", quality=90)
    special = root / "train" / "a"
    portrait = photo.crop((0, 0, 480, 640))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored on its side
    portrait.save(special / "turned.jpg", quality=90, exif=exif)
    portrait.convert("L").save(special / "grey.jpg", quality=90)
    portrait.convert("CMYK").save(special / "cmyk.jpg", quality=90)
    portrait.save(special / "lossless.png")
    return root


def decode_parity(ctx: Context) -> Outcome:
    """The device's decode and crop of every file in train/a against the workers' (PIL's,
    at full size), with the same crop boxes: eval's centre crop, and a training draw."""
    paths = sorted((jpeg_folder(ctx) / "train" / "a").iterdir())
    worst, on_device = 0.0, 0
    for train, aug in ((False, AugmentConfig(eval_crop_ratio=0.875)),
                       (True, AugmentConfig(crop_scale=[0.25, 1.0]))):  # fmt: skip
        skipped = SkipCounter()
        reader = BytesReader(DECODE_SIZE, 3, aug, train, 8192 * 8192)
        files = ImageFiles([(str(p), 0) for p in paths], reader, skipped)
        torch.manual_seed(0)  # both paths draw the same boxes, file by file
        batch = EncodedCollate()([files[i] for i in range(len(paths))])
        decoder = DeviceDecoder(DECODE_SIZE, 3, lambda images: images, ctx.device, skipped)
        images, _ = decoder(batch)
        torch.manual_seed(0)
        workers = FileReader(DECODE_SIZE, 3, aug, train, 8192 * 8192, dct_scaling=False)
        for got, path in zip(images, paths, strict=True):
            mae = (got.cpu().float() - workers(path).float()).abs().mean().item()
            worst = max(worst, mae)
        on_device = sum(f.pixels is None for f in batch[0])
        if skipped.take():
            raise CheckFailed("a readable file was skipped")
    if worst > DECODE_MAX_MAE:
        raise CheckFailed(f"a crop differs from the workers' by {worst:.2f} levels on average")
    return Outcome({"files": len(paths), "decoded on the device": on_device, "max MAE": worst})


def decode_train(ctx: Context) -> Outcome:
    run = ctx.work / "decode_run"
    short = [o for o in SHORT_RUN if not o.startswith("data.")]  # the folder's own batch
    overrides = ["data=imagefolder", f"data.root={jpeg_folder(ctx)}", "data.decode=device",
                 "data.img_size=32", "data.batch_size=8", "data.num_workers=2",
                 "model.patch_size=8", *short]  # fmt: skip
    argv = [*vit_train(), f"device={ctx.device}", *overrides, f"hydra.run.dir={run}"]
    command(ctx, "decode/vit-train", argv)
    best = load_checkpoint(run / "best.pt")
    skipped = best["metrics"].get("data/skipped_images", 0)
    if skipped:
        raise CheckFailed(f"{skipped} images skipped")
    return Outcome({"steps": best["state"]["step"], "val top-1 %": best["metrics"]["val/acc1"]})


# ----------------------------------------------------------------------------- throughput


def throughput_checks(cuda: bool, compiled: bool) -> list[Check]:
    checks = []
    for model, precision, with_compile in THROUGHPUT_CUDA if cuda else THROUGHPUT_CPU:
        if with_compile == compiled:
            name = f"throughput/{model}/{'fp16' if precision == 'amp' else precision}"
            name += "+compile" if compiled else ""
            checks.append(Check(name, partial(throughput, model, precision, compiled)))
    return checks


def throughput(model: str, precision: str, compiled: bool, ctx: Context) -> Outcome:
    """throughput.py's report, ours against timm; `compiled`: each eager and compiled.

    A command of its own, so that the budget can stop it in the middle of a compile.
    """
    name = f"{model}_{precision}" + ("_compile" if compiled else "")
    path = ctx.out / "throughput" / f"{name}.json"
    argv = [sys.executable, str(Path(__file__).with_name("throughput.py")), f"model={model}",
            f"precision={precision}", f"--device={ctx.device}", f"--json={path}",
            *(THROUGHPUT_ARGS_CUDA if ctx.cuda else THROUGHPUT_ARGS_CPU)]  # fmt: skip
    if compiled:
        argv += ["--compile", "--with-eager"]
    command(ctx, f"throughput/{name}", argv)
    report = json.loads(path.read_text())
    models = report["models"]
    for key, entry in models.items():
        if not math.isfinite(entry["train"]["last_loss"]):
            raise CheckFailed(f"{key}: the training loss is {entry['train']['last_loss']}")
    ours = models["ours"]["train"]
    figures: dict[str, Any] = {"train img/s": ours["img_per_s"], "MFU %": 100 * ours["mfu"]}
    if "timm" in models:
        figures["vs timm"] = models["ours"]["vs_timm"]["train"]["ratio_of_medians"]
        timm_mem = models["timm"]["train"]["peak_mem_mib"]
        figures["mem vs timm"] = ours["peak_mem_mib"] / timm_mem if timm_mem else math.nan
    if compiled:
        figures.update(compile_figures(report))
    peak = report["meta"]["matmul"]
    note = f"MFU of the {peak['dtype']} matmul peak, {peak['tflop_per_s']['train']:.1f} TFLOP/s"
    return Outcome(figures, note)


def compile_figures(report: dict) -> dict[str, Any]:
    """Ours compiled: img/s, MFU, against timm compiled and against ours eager, and the
    compile's cost in seconds and in training steps."""
    compiled = report["models"]["ours_compiled"]["train"]
    ours = report["compile"]["ours"]
    figures = {
        "compiled img/s": compiled["img_per_s"],
        "compiled MFU %": 100 * compiled["mfu"],
        "compiled vs eager": ours["train"]["compiled_vs_eager"]["ratio_of_medians"],
        "compile s": ours["train"]["compile_overhead_s"],
        "pays after steps": ours["train"]["pays_after_steps"] or "never",
    }
    versus = ours.get("compiled_vs_timm_compiled")
    if versus is not None:
        figures["compiled vs timm compiled"] = versus["train"]["ratio_of_medians"]
    return figures


# ----------------------------------------------------------------------------- reports


def plan(device: torch.device) -> list[Check]:
    """The checks in the order they run: the compiled ones last, as they take longest (a
    run cut short by the budget has the rest)."""
    cuda = device.type == "cuda"
    return [
        Check("host", host_check),
        *train_checks(cuda, compiled=False),
        *digits_checks(cuda),
        *distributed_checks(cuda),
        *decode_checks(),
        *throughput_checks(cuda, compiled=False),
        *train_checks(cuda, compiled=True),
        *throughput_checks(cuda, compiled=True),
    ]


def format_figures(figures: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{key} {value(v)}" for key, v in figures.items())


def write_reports(results: list[Result], meta: dict, out: Path) -> None:
    """device_check.json and device_check.md in `out`: every check so far."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    report = {"meta": {**meta, **counts}, "checks": [dataclasses.asdict(r) for r in results]}
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Device check on {meta['host']}: `{meta['command']}`, {meta['seconds']:.0f} s; "
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped.",
        "",
        "| check | status | seconds | figures | note |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.status} | {r.seconds:.1f} | {format_figures(r.figures)} | {r.note} |"
        )
    (out / "device_check.md").write_text("\n".join(lines) + "\n")


def print_table(console: Console, results: list[Result]) -> None:
    table = Table(title="device check")
    for column in ("check", "status", "s", "figures", "note"):
        table.add_column(column, justify="right" if column == "s" else "left")
    style = {"pass": "green", "fail": "red", "skip": "yellow"}
    for r in results:
        table.add_row(r.name, f"[{style[r.status]}]{r.status}[/]", f"{r.seconds:.1f}",
                      format_figures(r.figures), r.note)  # fmt: skip
    console.print(table)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), help="default: cuda where available, else cpu"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the reports (default: $OUT, else outputs/device_check)"
    )
    parser.add_argument(
        "--only", action="append", metavar="PATTERN",
        help="run only the checks whose name matches (fnmatch; repeatable): --only 'train/*'",
    )  # fmt: skip
    parser.add_argument(
        "--budget-min", type=float, default=8.0,
        help="minutes for all checks (8): a command still running then is stopped, and no "
        "check starts after it; each is reported as skipped",
    )  # fmt: skip
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    return parser.parse_args(argv)


def selected(checks: list[Check], patterns: list[str] | None) -> list[Check]:
    """The checks whose name matches one of `patterns` (fnmatch); all without patterns."""
    if not patterns:
        return checks
    return [c for c in checks if any(fnmatch.fnmatch(c.name, p) for p in patterns)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = make_console()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checks = selected(plan(device), args.only)
    if args.list:  # the CUDA plan too, to prepare a GPU's run on a machine without one
        console.print("\n".join(c.name for c in checks))
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/] --device cuda, but CUDA is not available here")
        return 2
    out = args.out or Path(os.environ.get("OUT") or "outputs/device_check")
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    ctx = Context(device, work, out, console, time.monotonic() + args.budget_min * 60)
    meta = {
        **host(device),
        "host": describe_host(host(device)),
        "command": " ".join(["python benchmarks/device_check.py", *argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_min": args.budget_min,
    }
    try:
        results = run_all(checks, ctx, meta)
    finally:
        if args.keep_work:
            console.print(f"kept the scratch folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(console, results)
    console.print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
