"""What a launcher told this process: its rank and the number of processes in its job.

torchrun gives every process it starts RANK, WORLD_SIZE and LOCAL_RANK; a plain `vit-train`
has none of them and is rank 0 of 1. Read before Hydra composes the config (and without
torch), to keep Hydra's own files to the main process. `runtime.py` builds on this.
"""

from __future__ import annotations

import os


def launched_processes() -> tuple[int, int]:
    """(rank, world size) that the launcher gave this process; (0, 1) when there is none."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def process_title(tool: str) -> str:
    """`tool`, naming this process's rank when the job has several."""
    rank, world_size = launched_processes()
    return f"{tool} (rank {rank} of {world_size})" if world_size > 1 else tool


def hydra_overrides_for_this_process() -> list[str]:
    """Overrides that keep Hydra from writing anything in every process but the main one.

    Each torchrun process composes the config itself, and Hydra's `${now:}` run folder would
    differ between processes started a second apart. The main process (rank 0) keeps
    Hydra's run folder, its `.hydra/` record and `train.log`; the others write nowhere, log
    only warnings (prefixed with their rank), and learn the run folder from rank 0.
    """
    rank, world_size = launched_processes()
    if world_size == 1 or rank == 0:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=worker"]
