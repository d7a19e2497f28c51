"""data=webdataset: shards written by webdataset's own ShardWriter, shared out exactly between
processes and loader workers, resumed mid-epoch without a sample twice, hostile shards."""

from __future__ import annotations

import io
import json
import shutil
import signal
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import TINY, _vit_train_command, finish, wait_for_checkpoint
from tests.test_distributed import env, run, torchrun
from vit_cli.config import AugmentConfig
from vit_cli.data._image_files import FileReader, SkipCounter
from vit_cli.data._shards import (
    SampleReader,
    ShardStream,
    batch_ranges,
    count_samples,
    shard_list,
    worker_blocks,
)
from vit_cli.data.digits import split_digits
from vit_cli.errors import UserError

SHARD_SIZE = 300  # 1,437 training digits: 5 shards, the last of 237


def png(pixels: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), "L").save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    """The digits split at 16 px as PNG shards, written by webdataset's ShardWriter."""
    out = tmp_path_factory.mktemp("shards")
    digits = split_digits()
    images = F.interpolate(
        digits["images"].float().unsqueeze(1) / 16, size=16, mode="bilinear", align_corners=False
    )
    pixels = (images[:, 0] * 255).round().to(torch.uint8)
    for split in ("train", "val"):
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=SHARD_SIZE, verbose=0) as w:
            for i in digits[split].tolist():
                label = str(int(digits["labels"][i]))
                w.write({"__key__": f"{split}{i:05d}", "png": png(pixels[i]), "cls": label})
    return out


TRAIN = "{000000..000004}"  # the brace range of the five training shards

DIGITS = [
    "data=webdataset", "data.num_classes=10", "data.img_size=16", "data.in_chans=1",
    "data.mean=[0.3053]", "data.std=[0.3760]", "data.augment.crop_scale=null",
    "data.augment.hflip=0", "data.augment.eval_crop_ratio=1.0",
]  # fmt: skip


def shards_args(folder: Path) -> list[str]:
    return [
        f"data.train_shards='{folder}/train-{TRAIN}.tar'",
        f"data.val_shards='{folder}/val-{{000000..000001}}.tar'",
    ]


def stream(spec: str, train: bool, skipped: SkipCounter | None = None) -> ShardStream:
    shards, _ = shard_list(spec, "data.train_shards")
    aug = AugmentConfig()
    reader = SampleReader(FileReader(16, 1, aug, train, 10_000), ["png"], "cls", 10)
    return ShardStream(shards, reader, skipped or SkipCounter(), train, shuffle_buffer=100)


def epoch_keys(data: ShardStream, workers: int, seed: int, skip_batches: int = 0) -> list[list]:
    """The keys of each batch of one pass of `data` through a DataLoader."""
    data.set_epoch(seed, skip_batches * data.batch_size)
    loader = DataLoader(
        data, batch_size=data.batch_size, num_workers=workers, collate_fn=lambda s: s
    )
    return [[s[2] for s in batch if s is not None] for batch in loader]


# ----------------------------------------------------------------------------- sharing out


@pytest.mark.parametrize("total", [1437, 64, 65, 10])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_process_runs_the_same_batches_and_no_sample_is_in_two(total, world_size):
    batch = 32
    shares = [batch_ranges(total, r, world_size, batch, train=True) for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # the same number of steps everywhere
    taken = [i for share in shares for b in share for i in b]
    assert len(taken) == len(set(taken)) and max(taken) < total
    assert total - len(taken) < world_size * batch or total < world_size  # the remainder only
    evals = [batch_ranges(total, r, world_size, batch, train=False) for r in range(world_size)]
    assert sorted(i for share in evals for b in share for i in b) == list(range(total))


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_workers_take_the_batches_a_round_robin_asks_of_them(workers):
    batches = batch_ranges(1437, 0, 1, 32, train=True)
    blocks = worker_blocks(batches, workers)
    assert [b.batches for b in blocks] == [len(range(w, 44, workers)) for w in range(workers)]
    assert blocks[0].start == 0 and max(b.stop for b in blocks) == 44 * 32
    assert sum(b.stop - b.start for b in blocks) == 44 * 32


def test_shards_are_counted_from_their_headers_as_webdataset_reads_them(digit_shards):
    counts = [count_samples(str(p)) for p in sorted(digit_shards.glob("train-*.tar"))]
    assert counts == [300, 300, 300, 300, 237]
    assert (
        sum(1 for _ in wds.WebDataset(str(digit_shards / "train-000004.tar"), shardshuffle=False))
        == 237
    )


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 2)])
def test_one_epoch_covers_every_sample_once_across_processes_and_workers(
    digit_shards, world_size, workers
):
    spec = f"{digit_shards}/train-{TRAIN}.tar"
    per_rank = []
    for rank in range(world_size):
        data = stream(spec, train=True)
        data.distribute(32, rank, world_size)
        per_rank.append(epoch_keys(data, workers, seed=7))
    assert len({len(batches) for batches in per_rank}) == 1
    keys = [k for batches in per_rank for b in batches for k in b]
    assert len(keys) == len(set(keys)) == len(per_rank[0]) * 32 * world_size
    assert 1437 - len(keys) < 32 * world_size

    again = stream(spec, train=True)
    again.distribute(32, 0, world_size)
    assert epoch_keys(again, workers, seed=7) == per_rank[0]  # the seed fixes the order
    assert epoch_keys(again, workers, seed=8) != per_rank[0]


@pytest.mark.parametrize("workers,done", [(0, 5), (1, 10), (2, 7)])
def test_a_resumed_epoch_gives_the_batches_that_were_left_in_the_same_order(
    digit_shards, workers, done
):
    data = stream(f"{digit_shards}/train-{TRAIN}.tar", train=True)
    data.distribute(32, 0, 1)
    whole = epoch_keys(data, workers, seed=3)
    assert epoch_keys(data, workers, seed=3, skip_batches=done) == whole[done:]


def test_eval_reads_every_sample_once_in_any_number_of_processes(digit_shards):
    spec = f"{digit_shards}/val-{{000000..000001}}.tar"
    keys = []
    for rank in range(3):
        data = stream(spec, train=False)
        data.distribute(50, rank, 3)
        keys += [k for b in epoch_keys(data, 2, seed=0) for k in b]
    assert sorted(keys) == sorted(f"val{i:05d}" for i in split_digits()["val"].tolist())


# ----------------------------------------------------------------------------- hostile shards


def test_a_manifest_that_claims_more_samples_than_its_shard_can_hold_is_refused(
    digit_shards, tmp_path
):
    shard = tmp_path / "val-000000.tar"
    shutil.copy(digit_shards / shard.name, shard)
    entry = {"file": shard.name, "samples": 10**12, "bytes": shard.stat().st_size}
    manifest = {"classes": list("0123456789"), "splits": {"val": {"shards": [entry]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"manifest.json is malformed .*10+ samples in"):
        shard_list(str(shard), "data.val_shards")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_hostile_samples_are_skipped_and_counted_and_the_rest_read(tmp_path, caplog):
    good = png(torch.full((16, 16), 200, dtype=torch.uint8))
    huge = png(torch.zeros((200, 200), dtype=torch.uint8))  # over the 10,000-pixel limit
    write_tar(tmp_path / "bad-000000.tar", [
        ("a.png", good), ("a.cls", b"1"),
        ("../escape.png", good), ("../escape.cls", b"1"),
        ("/etc/absolute.png", good), ("/etc/absolute.cls", b"1"),
        ("b.png", good), ("b.cls", b"11"),
        ("c.png", huge), ("c.cls", b"2"),
        ("d.png", b"not an image"), ("d.cls", b"3"),
        ("e.jpg", good), ("e.cls", b"4"),
        ("f.png", good), ("f.cls", b"5"),
    ])  # fmt: skip
    full = tmp_path / "bad-000000.tar"
    write_tar(tmp_path / "cut-000000.tar", [(f"{k}.{e}", good if e == "png" else b"1")
                                             for k in "ghij" for e in ("png", "cls")])  # fmt: skip
    cut = tmp_path / "cut-000001.tar"
    cut.write_bytes((tmp_path / "cut-000000.tar").read_bytes()[:2500])  # truncated in sample h

    skipped = SkipCounter()
    data = stream(f"{full}::{cut}", train=False, skipped=skipped)
    data.distribute(4, 0, 1)
    with caplog.at_level("WARNING"):
        samples = list(data)
    read = [s[2] for s in samples if s is not None]
    assert read == ["a", "f", "g"]  # e: a jpg member, looked for under png only
    assert len(samples) == data.total == 8 + count_samples(str(cut))
    assert skipped.take() == len(samples) - 3
    assert "../escape" in caplog.text and "points outside the shard" in caplog.text


def test_shards_that_cannot_be_read_are_named_before_training(digit_shards, tmp_path):
    with pytest.raises(UserError, match=r"none-0.tar does not exist"):
        shard_list(f"{tmp_path}/none-{{0..3}}.tar", "data.train_shards")
    (tmp_path / "text.tar").write_text("not a tar file")
    with pytest.raises(UserError, match=r"text.tar is not a readable tar file"):
        shard_list(str(tmp_path / "text.tar"), "data.train_shards")


@pytest.mark.slow
def test_shards_without_classes_exit_2_with_one_line(digit_shards, run_cli):
    result = run_cli(*TINY, *DIGITS, *shards_args(digit_shards), "data.num_classes=null")
    assert result.returncode == 2 and "needs data.num_classes" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- end to end


def key_lines(folder: Path) -> dict[int, list[str]]:
    """The key log's lines by rank: '<epoch>\\t<key>'."""
    return {
        int(p.stem.removeprefix("keys-rank")): p.read_text().splitlines()
        for p in sorted(folder.glob("keys-rank*.txt"))
    }


@pytest.mark.slow
def test_two_processes_under_torchrun_train_on_every_key_once(digit_shards, tmp_path):
    args = [*TINY, *DIGITS, *shards_args(digit_shards), "trainer.epochs=1",
            "data.num_workers=2", f"data.key_log={tmp_path / 'keys'}", "hydra.run.dir=run"]  # fmt: skip
    result = run(torchrun(2, *args), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = key_lines(tmp_path / "keys")
    per_rank = 1437 // 2 // 32 * 32
    assert sorted(lines) == [0, 1] and [len(v) for v in lines.values()] == [per_rank] * 2
    keys = [line for v in lines.values() for line in v]
    assert len(set(keys)) == len(keys)  # every key in exactly one process, once


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_trains_each_key_of_the_epoch_once(
    digit_shards, start, tmp_path
):
    command = [*_vit_train_command(), *TINY, *DIGITS, *shards_args(digit_shards),
               "trainer.epochs=1", "data.num_workers=2", "data.shift=1",
               f"data.key_log={tmp_path / 'keys'}", "hydra.run.dir=run",
               "trainer.resume=auto", "trainer.checkpoint_every_n_steps=5"]  # fmt: skip
    proc = start(command, tmp_path, env())
    wait_for_checkpoint(tmp_path / "run" / "last.pt", proc, step=5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    first = len(key_lines(tmp_path / "keys")[0])
    assert 5 * 32 <= first < 44 * 32

    again = run(command, tmp_path)
    assert again.returncode == 0, again.stderr
    keys = key_lines(tmp_path / "keys")[0]
    assert len(keys) == 44 * 32 and Counter(keys).most_common(1)[0][1] == 1
