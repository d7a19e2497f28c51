"""What a launcher told this process: its rank and the number of processes in its job.

torchrun gives every process it starts RANK, WORLD_SIZE and LOCAL_RANK; a plain `vit-train`
has none of them and is rank 0 of 1. A job that Hydra's submitit launcher started (on Slurm,
or `submitit_local`) describes its tasks in submitit's own terms, which
`adopt_submitit_tasks` turns into torchrun's. Read without torch, before Hydra composes
the config where possible, to keep Hydra's own files to the main process. `runtime.py`
builds on this.
"""

from __future__ import annotations

import logging.config
import os
from importlib import resources

from omegaconf import OmegaConf


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


def in_submitit_job() -> bool:
    """Whether this process is a task of a submitit job (Slurm, or submitit's local runner)."""
    return "SUBMITIT_EXECUTOR" in os.environ


def adopt_submitit_tasks() -> None:
    """In a submitit job of several tasks, set torchrun's variables from submitit's.

    submitit starts one process per task (Slurm's srun, or its local runner) and knows each
    one's rank and the first node's address; its `TorchDistributedEnvironment` exports them
    as torch.distributed expects. Every task keeps all the GPUs of its node and takes the
    one of its local rank, as under torchrun. Tasks other than the main one then log like
    torchrun's: warnings only, each line naming its rank, nothing in train.log (Hydra set up
    each task's logging before the run started, the same for all).
    """
    if not in_submitit_job() or "RANK" in os.environ:
        return
    import submitit  # an optional extra (.[slurm]): only its own jobs get here

    if submitit.JobEnvironment().num_tasks == 1:
        return
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    rank, _ = launched_processes()
    if rank != 0:
        worker = resources.files("vit_cli.configs") / "hydra" / "job_logging" / "worker.yaml"
        logging.config.dictConfig(
            OmegaConf.to_container(OmegaConf.create(worker.read_text()), resolve=True)
        )
