"""What a run reports: TensorBoard scalars and HParams, the progress bar and the summary table.

Only the main process (rank 0) writes; every other rank gets a logger that does nothing, so
the trainer never has to ask which process it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

console = Console()


def is_main_process() -> bool:
    """True on rank 0 of a torchrun job, and in a plain single-process run."""
    return int(os.environ.get("RANK", "0")) == 0


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = SummaryWriter(log_dir=str(run_dir)) if enabled else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(
        self, hparams: dict[str, float | int | str | bool], metrics: dict[str, float]
    ) -> None:
        """Record the run's hyperparameters and final metrics for TensorBoard's HParams tab."""
        if self.writer is None:
            return
        # Written into this run's own event file (not a sub-run) so sweep runs line up.
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summary(hparams, metrics):
            file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def epoch_progress(self, description: str, total: int) -> Progress:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
            TextColumn("{task.fields[extra]}"),
            TextColumn("lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.enabled,
            transient=not console.is_terminal,
        )
        progress.add_task(
            description, total=total, loss=float("nan"), acc=0.0, lr=0.0, ips=0.0, extra=""
        )
        return progress

    def summary(self, rows: dict[str, str]) -> None:
        if not self.enabled:
            return
        table = Table(title="vit-train summary", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows.items():
            table.add_row(key, value)
        console.print(table)
