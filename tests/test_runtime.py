"""The runtime: samplers that split an epoch between processes, and cross-process reductions.

The reductions run in real process groups (gloo, 2 processes on this machine), started
with torch.multiprocessing; the CLI end to end under torchrun is in test_distributed.py.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from tests.conftest import RUN_TIMEOUT_S
from vit_cli.launch import hydra_overrides_for_this_process
from vit_cli.runtime import EpochSampler, Runtime, ShardSampler, resolve_device


def test_one_process_epoch_order_is_torchs_random_sampler_order():
    """One process keeps the order vit-train always had (RandomSampler with the generator)."""
    data = list(range(50))
    ours_gen, theirs_gen = torch.Generator(), torch.Generator()
    ours = DataLoader(data, batch_size=5, sampler=EpochSampler(50, ours_gen), generator=ours_gen)
    theirs = DataLoader(data, batch_size=5, shuffle=True, generator=theirs_gen)
    for seed in (3, 4):
        ours_gen.manual_seed(seed)
        theirs_gen.manual_seed(seed)
        assert [b.tolist() for b in ours] == [b.tolist() for b in theirs]


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_share_an_epoch_so_that_their_batches_make_one_large_batch(world_size):
    n, batch = 50, 4
    single = list(EpochSampler(n, torch.Generator().manual_seed(1)))
    shards = [
        list(EpochSampler(n, torch.Generator().manual_seed(1), 1, rank, world_size))
        for rank in range(world_size)
    ]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world_size
    for k in range(len(shards[0]) // batch):
        together = sorted(i for s in shards for i in s[k * batch : (k + 1) * batch])
        big = single[k * batch * world_size : (k + 1) * batch * world_size]
        assert together == sorted(big)
    assert len({i for s in shards for i in s}) == n // world_size * world_size  # no repeats


def test_repeated_sampler_repeats_each_index_in_a_row_and_keeps_the_length():
    sampler = EpochSampler(10, torch.Generator().manual_seed(3), repeats=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 10
    assert order[0:3] == [order[0]] * 3 and order[3:6] == [order[3]] * 3
    assert len(set(order)) == 4  # ceil(10 / 3) indices drawn


def test_repeated_sampler_order_is_fixed_by_the_generator_seed():
    gen = torch.Generator()
    sampler = EpochSampler(100, gen, repeats=3)
    gen.manual_seed(7)
    first = list(sampler)
    gen.manual_seed(7)
    assert list(sampler) == first
    gen.manual_seed(8)
    assert list(sampler) != first


def test_repeated_copies_go_to_different_processes_as_in_deit():
    """With as many processes as repeats, each process sees each drawn image once."""
    shards = [
        list(EpochSampler(30, torch.Generator().manual_seed(0), 3, rank, 3)) for rank in range(3)
    ]
    assert all(len(set(s)) == len(s) == 10 for s in shards)
    assert shards[0] == shards[1] == shards[2]  # the copies of one image, augmented apart


@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (2, 4), (9, 1)])
def test_val_shards_hold_every_index_once_without_padding(n, world_size):
    shards = [list(ShardSampler(n, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world_size)) for r in range(world_size)] == [
        len(s) for s in shards
    ]


def test_only_rank_0_lets_hydra_write(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert hydra_overrides_for_this_process() == []
    monkeypatch.setenv("RANK", "1")
    overrides = hydra_overrides_for_this_process()
    assert "hydra.output_subdir=null" in overrides and "hydra/job_logging=worker" in overrides


def test_one_process_runtime_reduces_to_itself():
    runtime = Runtime(resolve_device("cpu"))
    values = torch.tensor([1.0, 2.0])
    assert runtime.sum(values) is values
    assert runtime.any([False, True]) == [False, True]
    assert runtime.gather("x") == ["x"] and runtime.broadcast(3) == 3
    model = torch.nn.Linear(2, 2)
    assert runtime.wrap(model) is model


def test_a_device_name_that_is_not_one_is_a_user_error():
    from vit_cli.errors import UserError

    with pytest.raises(UserError, match="not a device name"):
        resolve_device("gpu0")


# ----------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_two_processes(fn, tmp_path, timeout: float = RUN_TIMEOUT_S) -> list[object]:
    """Run fn(runtime) in 2 gloo processes; returns each one's result (or fails with its trace).
    Processes still running after `timeout` seconds (one waiting on a collective the other
    never joins) are killed, and the test fails."""
    port = _free_port()
    context = mp.start_processes(
        _worker, args=(fn, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            pytest.fail(f"{fn.__name__} in 2 processes was still running after {timeout:.0f} s")
    return [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(2)]


def _worker(rank: int, fn, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = fn(Runtime(torch.device("cpu"), rank, 2))
    except Exception:
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"result{rank}.pt"))


def _reductions(runtime: Runtime) -> dict:
    rank = runtime.rank
    return {
        "sum": runtime.sum(torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)).tolist(),
        "any": runtime.any([rank == 1, False]),
        "gather": runtime.gather({"rank": rank}),
        "broadcast": runtime.broadcast(f"folder of rank {rank}"),
    }


def test_two_processes_sum_agree_gather_and_take_rank_0s_value(tmp_path):
    results = _in_two_processes(_reductions, tmp_path)
    for result in results:
        assert result["sum"] == [3.0, 10.0]
        assert result["any"] == [True, False]  # true in one process is true in all
        assert result["gather"] == [{"rank": 0}, {"rank": 1}]
        assert result["broadcast"] == "folder of rank 0"


def _ddp_step_with_accumulation(runtime: Runtime) -> list[torch.Tensor]:
    """Two micro-batches per step, the first without gradient sync, through DDP."""
    torch.manual_seed(runtime.rank)  # different initial weights: DDP must give rank 0's
    model = torch.nn.Linear(4, 3)
    ddp = runtime.wrap(model)
    data = torch.arange(32, dtype=torch.float32).view(8, 4) / 10
    shard = data[runtime.rank :: 2]  # (4, 4): two micro-batches of 2
    for micro, batch in enumerate(shard.split(2)):
        with runtime.gradient_sync(ddp, enabled=micro == 1):
            (ddp(batch).pow(2).mean() / 2).backward()
    return [p.grad.clone() for p in model.parameters()] + [
        p.detach().clone() for p in model.parameters()
    ]


def test_ddp_with_accumulation_averages_the_gradients_of_one_large_batch(tmp_path):
    results = _in_two_processes(_ddp_step_with_accumulation, tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = torch.arange(32, dtype=torch.float32).view(8, 4) / 10
    # The global batch: micro-batch k of both processes, averaged over 2 micro-batches.
    for k in range(2):
        batch = torch.cat([data[r::2].split(2)[k] for r in range(2)])
        (model(batch).pow(2).mean() / 2).backward()
    expected = [p.grad for p in model.parameters()] + [p.detach() for p in model.parameters()]
    for result in results:
        for got, want in zip(result, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _nan_in_one_process(runtime: Runtime) -> dict:
    """Three epochs-worth of steps on digits where rank 1's loss is NaN on its 3rd batch."""
    from vit_cli.config import DataConfig
    from vit_cli.data import build_data
    from vit_cli.loop import LoopSettings, Training, Updater, train_one_epoch
    from vit_cli.losses import ClassificationLoss
    from vit_cli.models.vit import VisionTransformer
    from vit_cli.precision import resolve_precision
    from vit_cli.sinks import Sinks
    from vit_cli.train_state import TrainState

    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2
    )
    step_model = runtime.wrap(model)
    generator = torch.Generator().manual_seed(0)
    data = build_data(DataConfig(batch_size=64), 8, generator, runtime=runtime)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    precision = resolve_precision("fp32", runtime.device)
    calls = []

    class NanOnce(ClassificationLoss):
        def __call__(self, images, logits, targets):
            loss, logits, parts = super().__call__(images, logits, targets)
            calls.append(1)
            if runtime.rank == 1 and len(calls) == 3:
                loss = loss * float("nan")
            return loss, logits, parts

    state = TrainState()
    updater = Updater(model, optimizer, scheduler, precision.grad_scaler(), accumulate=2)
    settings = LoopSettings(epochs=1, seed=0, max_bad_steps=3, log_every_n_steps=1)
    loss_fn = NanOnce(torch.nn.CrossEntropyLoss())
    training = Training(step_model, data, loss_fn, updater, precision, runtime, settings)
    train_one_epoch(training, state, Sinks([]))
    metrics = state.train_figures(runtime)
    return {
        "state": state,
        "batches": len(data.train_loader),
        "metrics": metrics,
        "weights": [p.detach().clone() for p in model.parameters()],
    }


def test_a_nan_loss_in_one_process_skips_the_step_in_every_process(tmp_path):
    results = _in_two_processes(_nan_in_one_process, tmp_path)
    batches = results[0]["batches"]  # 1437 // 2 // 64 = 11 per process
    for result in results:
        state = result["state"]
        assert state.epoch_batches == batches
        # Batches 1-2 make step 1; batch 3 is NaN in one process, so every process drops it
        # and batch 4 starts a new group: 11 batches, less the dropped one, in steps of 2.
        assert state.step == (batches - 1) // 2
        assert state.bad_steps == 0  # reset by the good batches after it
    # The epoch's figures count every trained image of both processes, once.
    figures = [{k: r["metrics"][k] for k in ("loss", "acc")} for r in results]
    assert figures[0] == figures[1]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
