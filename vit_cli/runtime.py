"""Where this process runs: its device, its rank among the processes of a job, and what joins them.

A job is one process (plain `vit-train`) or several started by torchrun, which gives each
one RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torch.distributed's `env://`;
`launch.py` reads the first two before Hydra runs).
Everything that depends on the rank lives here: the process group, the device of each
process, the DistributedDataParallel wrapper, the samplers that split the data between
processes, and the reductions across them. The rest of vit_cli asks a `Runtime` and never
reads those variables itself.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from vit_cli.errors import UserError
from vit_cli.launch import launched_processes

# Variables torchrun sets for each process it starts.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device named by `device=` ("auto", "cpu", "cuda", "cuda:N") for this process.

    `local_rank` is the process's index on its machine: with several processes, "auto" and
    "cuda" mean the GPU of that index.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(
            f"device={name!r} is not a device name. Use auto, cpu, cuda or cuda:N."
        ) from e
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: not what vit_cli runs on
        raise UserError(f"device={name} is not supported. Use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device={name} but CUDA is not available here. Use device=cpu or device=auto."
        )
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(
                f"This process has LOCAL_RANK={local_rank}, but the machine has {count} GPU(s): "
                f"start at most {count} processes per node (torchrun --nproc_per_node={count})."
            )
        device = torch.device("cuda", local_rank)
    return device


@dataclass(frozen=True)
class Runtime:
    """This process's device and its place in the job: `rank` of `world_size` processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    # The job's processes on this machine (torchrun's LOCAL_WORLD_SIZE).
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that decides the run folder and writes logs and checkpoints."""
        return self.rank == 0

    def loader_workers(self) -> int:
        """`data.num_workers=auto`: the cores this process may use, less one for itself.

        Processes that may all use the same cores (torchrun without binding) share them: a
        process bound to its own cores (srun --cpu-bind, taskset) has them to itself.
        """
        cpus = os.cpu_count() or 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
        if cores == cpus:  # not bound: the machine's cores, shared with the job's processes
            cores //= self.local_world_size
        return max(cores - 1, 1)

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}" if self.world_size > 1 else "one process"

    # ------------------------------------------------------------------ the model

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` under DistributedDataParallel when there are several processes.

        DDP averages the gradients of all processes during backward, bucket by bucket, so
        the communication overlaps the rest of the backward pass. Buffers are not
        broadcast at every step: ours are constants (position indices, window masks).
        """
        if self.world_size == 1:
            return module
        # A one-channel patch embedding's weight gradient comes back with another stride for
        # its size-1 channel axis; DDP then copies those few values instead of aliasing them.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **{_NO_BUFFER_SYNC: False},
        )

    def gradient_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """A context for one micro-batch's forward and backward: without `enabled`, DDP keeps
        the gradients local (accumulation), and the step's last micro-batch averages them."""
        ddp = _find_ddp(module)
        if enabled or ddp is None:
            return contextlib.nullcontext()
        return ddp.no_sync()

    # ------------------------------------------------------------------ data

    def train_sampler(self, n: int, generator: torch.Generator, repeats: int = 1) -> EpochSampler:
        return EpochSampler(n, generator, repeats, self.rank, self.world_size)

    def eval_sampler(self, n: int) -> ShardSampler:
        return ShardSampler(n, self.rank, self.world_size)

    # ------------------------------------------------------------------ reductions

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over all processes (on the CPU, as given)."""
        if self.world_size == 1:
            return values
        total = values.to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(values.device)

    def any(self, flags: list[bool]) -> list[bool]:
        """For each flag, whether it is true in any process."""
        if self.world_size == 1:
            return flags
        return [bool(v) for v in self.sum(torch.tensor(flags, dtype=torch.int32)).tolist()]

    def gather(self, value: Any) -> list[Any]:
        """`value` of every process, in rank order (a picklable object)."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, in every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block in the main process first, then in the others: for work that
        writes shared files (extracting an archive) before every process reads them."""
        if self.world_size == 1:
            yield
            return
        if not self.is_main:
            dist.barrier()
            yield
            return
        try:
            yield
        finally:  # on an error too: the others then meet it themselves, or are stopped
            dist.barrier()


# The DDP option that turns off the per-step buffer broadcast (renamed in torch 2.14).
_NO_BUFFER_SYNC = (
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)


def _find_ddp(module: nn.Module) -> DistributedDataParallel | None:
    while module is not None and not isinstance(module, DistributedDataParallel):
        module = getattr(module, "_orig_mod", None)  # under torch.compile
    return module


@contextlib.contextmanager
def start_runtime(device_name: str, timeout_s: float) -> Iterator[Runtime]:
    """The Runtime of this process; with torchrun's variables set, the process group too.

    NCCL joins processes on CUDA GPUs, gloo on the CPU. A collective that waits more than
    `timeout_s` (a process died or hangs) fails, and the failure becomes one message
    instead of a hang.
    """
    rank, world_size = launched_processes()
    if world_size == 1:
        yield Runtime(resolve_device(device_name))
        return
    missing = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not. Start "
            "several processes with torchrun (docs/distributed.md)."
        )
    if device_name.startswith("cuda:"):
        raise UserError(
            f"device={device_name} names one GPU, but torchrun gives each process its own "
            "(the one of its LOCAL_RANK). Use device=auto or device=cuda; choose the GPUs with "
            "CUDA_VISIBLE_DEVICES."
        )
    device = resolve_device(device_name, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    runtime = Runtime(device, dist.get_rank(), dist.get_world_size(), local_world_size)
    try:
        yield runtime
    except Exception as e:
        if _is_collective_failure(e):
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"Process {runtime.label} lost contact with the others ({reason}). Another "
                "process of the job stopped or hangs: its own output says why. Collectives "
                f"wait up to trainer.dist_timeout_s={timeout_s:g} seconds."
            ) from e
        raise
    else:
        # Every process reaches the end before any takes the group down: a process whose
        # peer has already closed its connections can abort in gloo's teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _is_collective_failure(error: Exception) -> bool:
    # NCCL raises DistError subclasses; gloo raises a RuntimeError from its transport.
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and "gloo" in str(error)
    )


# ----------------------------------------------------------------------------- samplers


class EpochSampler(Sampler[int]):
    """This process's share of a training epoch, in an order fixed by `generator`.

    Every process draws the same permutation (`set_epoch` re-seeds `generator` with
    seed + epoch in all of them). With `repeats` > 1 (repeated augmentation, Hoffer et al.
    2020, as DeiT trains), the first ceil(n / repeats) indices are each taken `repeats`
    times in a row, keeping the epoch's length n. Process `rank` then takes every
    `world_size`-th index from its rank on, n // world_size of them in each process (the
    rest of the epoch is left out), so that every process runs the same number of steps,
    batch k of all processes together is batch k of one process with a world_size times
    larger batch, and a repeated image's copies land in different processes, as in DeiT.
    """

    def __init__(
        self,
        n: int,
        generator: torch.Generator,
        repeats: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n = n
        self.generator = generator
        self.repeats = repeats
        self.rank = rank
        self.world_size = world_size
        self._start = 0  # where the next pass starts in this process's share

    def __len__(self) -> int:
        return self.n // self.world_size

    def set_epoch(self, seed: int, start: int = 0) -> None:
        """Fix the next pass's order by `seed`, and start it at index `start` of this
        process's share: a resumed epoch skips what it already trained on, without drawing
        those samples' augmentations from the random state it continues from. The
        generator is also the loader's, which draws its workers' seeds from it."""
        self.generator.manual_seed(seed)
        self._start = start

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0  # later passes start at the beginning
        # A generator function, so the permutation is drawn on the first index, as
        # torch's RandomSampler draws it: one process sees the order it always saw.
        order = torch.randperm(self.n, generator=self.generator)
        if self.repeats > 1:
            drawn = order[: math.ceil(self.n / self.repeats)]
            order = drawn.repeat_interleave(self.repeats)[: self.n]
        yield from order[self.rank :: self.world_size][start : len(self)].tolist()


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... of n, in order: every index in exactly one
    process, none padded or repeated, so that summed metrics count each image once."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.n = n
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))
