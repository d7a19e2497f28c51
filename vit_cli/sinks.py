"""Where a run's figures go: TensorBoard, the text log and the progress bar, one class each.

The trainer reports each event once, to a `Sinks` fan-out; a sink overrides the events it
shows and inherits a no-op for the rest, so a new destination is one more class. Only the
main process gets sinks (`build_sinks`); the others report into an empty fan-out.

The console (stdout) gets rich's progress bar and summary table on a terminal only. Off
one (a pipe, `nohup`, a CI or Slurm log) rich would fit them to 80 columns: there is no
progress bar (the log's line per epoch tells the progress), and the summary is printed as
plain `key: value` lines, each whole (vit_cli/console.py does the same for log records).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vit_cli.console import on_terminal

log = logging.getLogger(__name__)
console = Console()

Hparams = dict[str, float | int | str | bool]


@dataclass
class Running:
    """The epoch so far in this process, after an optimizer step: for the progress bar."""

    loss: float
    acc: float  # share of the batches' dominant labels predicted, 0..1
    lr: float
    images_per_s: float
    parts: dict[str, float] = field(default_factory=dict)  # e.g. loss_base, loss_distill


@dataclass
class EpochReport:
    epoch: int  # completed epochs
    epochs: int
    step: int
    train: dict[str, float]  # loss, acc (%), throughput (img/s) and the loss's parts
    val: dict[str, float]  # loss, acc1, acc5 (%), and acc1_cls, acc1_dist for DeiT
    val_ema: dict[str, float] | None  # the weight average's, when trainer.ema is on
    scalars: dict[str, float]  # every figure above, by TensorBoard tag
    is_best: bool


@dataclass
class RunReport:
    hparams: Hparams  # config leaves for TensorBoard's HParams tab, the leading ones first
    leading: list[str]  # the hparams its table shows first: the command line's keys
    results: dict[str, float]  # hparam/best_acc1, hparam/final_acc1, ...
    summary: dict[str, str]  # the summary table's rows


class Sink:
    """One destination of a run's figures; every event does nothing until overridden."""

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        """Epoch number `epoch` (1-based) of `epochs` begins, with `batches` loader batches."""

    def batch_done(self, running: Running | None) -> None:
        """A loader batch was consumed; `running` is set when it completed an optimizer step."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Figures of the run at optimizer step `step` (train loss, lr, teacher accuracy...)."""

    def text(self, tag: str, text: str, step: int) -> None:
        """A note about the run (its config, what its pretrained weights gave the model...)."""

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        """The run's first training batch, as the model takes it (normalised, mixed)."""

    def pictures(self, pictures: dict[str, torch.Tensor], step: int) -> None:
        """Rendered pictures (3, H, W) in [0, 1] by tag: confusion matrix, attention maps..."""

    def epoch_done(self, report: EpochReport) -> None:
        """An epoch was trained and scored."""

    def run_done(self, report: RunReport) -> None:
        """The last epoch is done."""

    def close(self) -> None:
        """The run ends, finished or not."""


class Sinks(Sink):
    """Every event, passed on to each sink in turn."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        for sink in self.sinks:
            sink.epoch_started(epoch, epochs, batches)

    def batch_done(self, running: Running | None) -> None:
        for sink in self.sinks:
            sink.batch_done(running)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.scalars(values, step)

    def text(self, tag: str, text: str, step: int) -> None:
        for sink in self.sinks:
            sink.text(tag, text, step)

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        for sink in self.sinks:
            sink.train_batch(images, targets, step)

    def pictures(self, pictures: dict[str, torch.Tensor], step: int) -> None:
        for sink in self.sinks:
            sink.pictures(pictures, step)

    def epoch_done(self, report: EpochReport) -> None:
        for sink in self.sinks:
            sink.epoch_done(report)

    def run_done(self, report: RunReport) -> None:
        for sink in self.sinks:
            sink.run_done(report)

    def close(self) -> None:
        """Close every sink, even after one fails to; then raise the first failure."""
        failures = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                failures.append(e)
        if failures:
            raise failures[0]

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
            # Else the error that ended the run is the one to report: a sink that then fails
            # to close (TensorBoard's events, on the disk that just filled) only follows it.


class TensorBoardSink(Sink):
    """Scalars, every epoch's figures, pictures, notes, and the run's HParams row, in the run
    folder. `batch_pictures` renders the first training batch (None: not shown)."""

    def __init__(
        self,
        run_dir: Path,
        purge_step: int | None = None,
        batch_pictures: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what earlier event files in the folder logged from
        # this step on (a run continued in its own folder after a stop).
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.batch_pictures = batch_pictures

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders Markdown: indented lines keep the text as it is.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        if self.batch_pictures is not None:
            self.writer.add_image("train/samples", self.batch_pictures(images, targets), step)

    def pictures(self, pictures: dict[str, torch.Tensor], step: int) -> None:
        for tag, picture in pictures.items():
            self.writer.add_image(tag, picture, step)

    def epoch_done(self, report: EpochReport) -> None:
        self.scalars({**report.scalars, "epoch": report.epoch}, report.step)

    def run_done(self, report: RunReport) -> None:
        # Written into this run's own event file (not a sub-run) so sweep runs line up.
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summaries(report.hparams, report.leading, report.results):
            file_writer.add_summary(summary)
        for tag, value in report.results.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        self.writer.close()


def hparams_summaries(hparams: Hparams, leading: list[str], results: dict[str, float]) -> list:
    """The HParams plugin's experiment, session-start and session-end summaries.

    TensorBoard orders the table's columns by whether an hparam "differs" between runs,
    then by name, and shows the first five with the rest a click away. Flagging the
    command line's keys as differing puts them first (the core follows by its name).
    """
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    experiment, start, end = hparams_summary(hparams, results)
    content = experiment.value[0].metadata.plugin_data
    data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in leading
    content.content = data.SerializeToString()
    return [experiment, start, end]


class TextLogSink(Sink):
    """One line per epoch in the log (the console and train.log), and the summary table."""

    def epoch_done(self, report: EpochReport) -> None:
        train, val = report.train, report.val
        heads = (
            f" (cls {val['acc1_cls']:.2f}%, dist {val['acc1_dist']:.2f}%)"
            if "acc1_cls" in val
            else ""
        )
        log.info(
            "epoch %d/%d step %d: train loss %.4f acc %.2f%% | val loss %.4f acc1 %.2f%%%s acc5 %.2f%%"
            " | %.0f img/s%s",
            report.epoch, report.epochs, report.step, train["loss"], train["acc"], val["loss"],
            val["acc1"], heads, val["acc5"], train["throughput"], " (best)" if report.is_best else "",
        )  # fmt: skip
        if report.val_ema is not None:
            ema = report.val_ema
            log.info("epoch %d: ema val loss %.4f acc1 %.2f%% acc5 %.2f%%",
                     report.epoch, ema["loss"], ema["acc1"], ema["acc5"])  # fmt: skip

    def run_done(self, report: RunReport) -> None:
        if not on_terminal(console.file):
            lines = [f"  {key}: {value}" for key, value in report.summary.items()]
            print("vit-train summary", *lines, sep="\n", file=console.file, flush=True)
            return
        table = Table(title="vit-train summary", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in report.summary.items():
            table.add_row(key, value)
        console.print(table)


class ProgressSink(Sink):
    """A progress bar per epoch on the console, with the running loss, accuracy and speed:
    for a terminal only (`build_sinks`)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None

    def epoch_started(self, epoch: int, epochs: int, batches: int) -> None:
        self.close()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
            TextColumn("{task.fields[extra]}"),
            TextColumn("lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            console=console,
        )
        self.progress.add_task(
            f"epoch {epoch}/{epochs}", total=batches, loss=float("nan"), acc=0.0, lr=0.0, ips=0.0,
            extra="",
        )  # fmt: skip
        self.progress.start()

    def batch_done(self, running: Running | None) -> None:
        if self.progress is None:
            return
        task = self.progress.task_ids[0]
        self.progress.update(task, advance=1)
        if running is not None:
            extra = "  ".join(
                f"{k.removeprefix('loss_')} {v:.3f}" for k, v in running.parts.items()
            )
            self.progress.update(
                task, loss=running.loss, acc=running.acc, lr=running.lr,
                ips=running.images_per_s, extra=extra,
            )  # fmt: skip

    def epoch_done(self, report: EpochReport) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def build_sinks(
    run_dir: Path,
    main: bool,
    purge_step: int | None = None,
    batch_pictures: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Sinks:
    """The sinks of the main process; the other processes of a job report into none."""
    if not main:
        return Sinks([])
    progress = [ProgressSink()] if on_terminal(console.file) else []
    tensorboard = TensorBoardSink(run_dir, purge_step, batch_pictures)
    return Sinks([*progress, tensorboard, TextLogSink()])
