"""Fuzzing with Hypothesis: hostile config values and damaged files get one clear message (or
a skipped, counted image), never a traceback, a hang or an allocation the file cannot justify.

Config values go through what each command runs before any work: Hydra's composition (whose
own errors Hydra prints as one message), the typed config and its validation (vit-train),
or the whole command on a tiny model (vit-eval, vit-predict). Files are valid ones with
bytes changed, cut, repeated or inserted, read by the reader that vit_cli uses for them.

The default suite draws a few hundred examples in all; the slow run 5,000 override cases
and 5,000 damaged files. A failure Hypothesis finds is kept below as an `@example`.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.resources
import io
import pickle
import resource
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets

from tests.test_export import write_checkpoint
from vit_cli import eval_cli, predict_cli
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.cli import to_train_config
from vit_cli.composition import register_configs
from vit_cli.config import validate
from vit_cli.data import UNREADABLE, read_image
from vit_cli.data.cifar import _read_cifar
from vit_cli.data.mnist import read_idx, read_split
from vit_cli.errors import UserError
from vit_cli.inference import load_model
from vit_cli.train import check_group_choices

CONFIG_DIR = str(importlib.resources.files("vit_cli.configs"))
MODELS = ["vit", "deit", "swin"]
DATA = ["digits", "fake", "cifar10", "fashion_mnist", "imagefolder"]

# Examples in the default suite and in the slow run, per test. Composing a config takes
# Hydra about 0.15 s and a vit-eval case 0.3 s, a vit-predict case 10 ms: the slow run's
# 5,000 override cases lean on vit-predict to stay within two minutes.
FEW = {"train": 80, "eval": 15, "predict": 25, "file": 60}
MANY = {"train": 400, "eval": 60, "predict": 4540, "file": 1000}

# A hang has no end: an example that runs this long has one. Far above any honest case on
# a loaded host, so that a slow machine does not fail here.
DEADLINE_MS = 60_000

cases: Counter[str] = Counter()


def fuzz_settings(n: int) -> settings:
    # The same examples on every run, so that CI's verdict does not depend on the draw; a
    # wider search: the same tests with derandomize off and more examples.
    return settings(
        max_examples=n,
        deadline=DEADLINE_MS,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )


# ----------------------------------------------------------------------------- config values

# Values across types and ranges, as a user could type them on the command line.
HOSTILE_VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, -(2**31), 10**12, 10**30]),
    st.integers(),
    st.floats(),  # NaN, inf and -inf included
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 1.5, -2.5]),
    st.text(max_size=12),  # empty, non-ASCII, control characters
    st.sampled_from(["", "é", "日本", "none", "null", "auto", "[1,2]", "a=b", "${oops}"]),
    st.lists(st.integers(-3, 300), max_size=5),
    st.lists(st.floats(), max_size=3),
    st.booleans(),
    st.none(),
)


def override_value(value: object) -> str:
    """`value` in Hydra's override grammar; strings quoted, so that the grammar's own
    characters reach the config (unquoted strings are tried too, for parse errors)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def _leaves(node: object, prefix: str) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


@cache
def schema_keys(model: str, data: str) -> list[str]:
    """Every key of the composed config for `model` and `data`, with the ones that are
    lists or nested (model.depths, data.mean, data.augment.*) as their leaves and whole."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data={data}"])
    container = OmegaConf.to_container(cfg, resolve=False)
    nested = [k for k, v in container.items() if isinstance(v, dict)]
    leaves = sorted(_leaves(container, ""))
    return leaves + [k for k in nested if k not in ("model", "data")]


@st.composite
def train_overrides(draw: st.DrawFn) -> list[str]:
    model, data = draw(st.sampled_from(MODELS)), draw(st.sampled_from(DATA))
    keys = draw(st.lists(st.sampled_from(schema_keys(model, data)), min_size=1, max_size=3))
    overrides = [f"model={model}", f"data={data}"]
    if draw(st.integers(0, 9)) == 0:  # now and then a group's choice of a wrong type
        overrides.append(
            f"{draw(st.sampled_from(['optimizer', 'precision']))}={draw(st.integers())}"
        )
    if data == "imagefolder":
        overrides.append("data.root=photos")
    for key in keys:
        raw = draw(HOSTILE_VALUES)
        quoted = draw(st.booleans()) or not isinstance(raw, str)
        overrides.append(f"{key}={override_value(raw) if quoted else raw}")
    return overrides


def check_train_overrides(overrides: list[str]) -> None:
    """What vit-train runs on `overrides` before training: either the config is valid, or
    the error is one Hydra prints as a message, or a UserError (exit 2)."""
    cases["train overrides"] += 1
    try:
        check_group_choices(overrides)  # as vit-train's main() does first
    except UserError:
        return
    try:
        cfg = compose("train", overrides=overrides)
    except CompactHydraException:
        return  # Hydra prints its message; vit-train exits 2 (train.main)
    with contextlib.suppress(UserError):
        validate(to_train_config(cfg))


def test_train_overrides(few=FEW):
    for model in MODELS:
        for data in DATA:
            schema_keys(model, data)  # composed before Hydra is set up for the examples
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        fuzz_settings(few["train"])(given(train_overrides())(check_train_overrides))()


@pytest.mark.slow
def test_train_overrides_thousands():
    test_train_overrides(MANY)
    assert cases["train overrides"] >= MANY["train"]
    print(f"vit-train: {cases['train overrides']} override cases")


# ----------------------------------------------------------------------------- vit-eval, vit-predict


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of a tiny ViT with digits' classes, which vit-eval scores on digits, and a
    16 px PNG to classify."""
    root = tmp_path_factory.mktemp("tiny_run")
    image = root / "seven.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), np.uint8)).save(image)
    checkpoint = write_checkpoint(root / "vit.pt", "vit")
    ckpt = load_checkpoint(checkpoint)
    ckpt["data"]["class_names"] = [str(digit) for digit in range(10)]
    save_checkpoint(ckpt, checkpoint)
    return {"checkpoint": checkpoint, "image": image}


def exit_status(main: Callable[[list[str]], None], argv: list[str]) -> int:
    """The status `main(argv)` exits with, as the console command would: a traceback (any
    other exception) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as e:
        assert "Traceback" not in err.getvalue()
        return e.code if isinstance(e.code, int) else 1
    return 0


EVAL_KEYS = st.deferred(
    lambda: st.sampled_from([k for k in schema_keys("vit", "digits") if k.startswith("data.")])
)


@st.composite
def eval_arguments(draw: st.DrawFn) -> list[str]:
    args = []
    for key in draw(st.lists(EVAL_KEYS, max_size=2)):
        args.append(f"{key}={override_value(draw(HOSTILE_VALUES))}")
    if draw(st.booleans()):
        args.append(f"data={draw(st.sampled_from([*DATA, 'nope', '']))}")
    if draw(st.booleans()):
        args += ["--batch-size", str(draw(st.sampled_from([0, -1, 1, 7, 10**9, 2**63])))]
    if draw(st.booleans()):
        args += ["--precision", draw(st.sampled_from(["fp32", "bf16", "amp", "fp8", ""]))]
    if draw(st.booleans()):
        args += ["--device", draw(st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "tpu", ""]))]
    return args


def test_eval_arguments(tiny_run, tmp_path, few=FEW):
    @given(eval_arguments())
    def check(args: list[str]) -> None:
        cases["vit-eval arguments"] += 1
        argv = [str(tiny_run["checkpoint"]), *args, "--out", str(tmp_path / "eval")]
        assert exit_status(eval_cli.main, argv) in (0, 2)

    fuzz_settings(few["eval"])(check)()


@pytest.mark.slow
def test_eval_arguments_thousands(tiny_run, tmp_path):
    test_eval_arguments(tiny_run, tmp_path, MANY)
    print(f"vit-eval: {cases['vit-eval arguments']} argument cases")


NUMBERS = st.sampled_from(["0", "-1", "1", "3", "10000", str(2**63), "nan", "1e3", "", "x"])


@st.composite
def predict_arguments(draw: st.DrawFn) -> list[str]:
    args = []
    for option in draw(st.lists(st.sampled_from(
        ["--topk", "--batch-size", "--workers", "--max-pixels"]), max_size=4, unique=True)
    ):  # fmt: skip
        args += [option, draw(NUMBERS)]
    if draw(st.booleans()):
        args += ["--precision", draw(st.sampled_from(["fp32", "bf16", "amp", "fp16", ""]))]
    if draw(st.booleans()):
        args += ["--device", draw(st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "mps", ""]))]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--ema", "--json"])))
    return args


def test_predict_arguments(tiny_run, few=FEW):
    @given(predict_arguments())
    def check(args: list[str]) -> None:
        cases["vit-predict arguments"] += 1
        argv = [str(tiny_run["checkpoint"]), str(tiny_run["image"]), *args]
        # 1: the image was refused (--max-pixels), which its row of the output says
        assert exit_status(predict_cli.main, argv) in (0, 1, 2)

    fuzz_settings(few["predict"])(check)()


@pytest.mark.slow
def test_predict_arguments_thousands(tiny_run):
    test_predict_arguments(tiny_run, MANY)
    assert cases["vit-predict arguments"] >= MANY["predict"]
    total = cases["train overrides"] + cases["vit-eval arguments"] + cases["vit-predict arguments"]
    print(f"vit-predict: {cases['vit-predict arguments']} argument cases; {total} in all so far")


# ----------------------------------------------------------------------------- damaged files


@st.composite
def damaged(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with a few bytes changed, a part cut, repeated or inserted, or cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "repeat", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


@contextlib.contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    """No allocation of more than `extra_bytes` beyond what this process has mapped now: a
    reader that trusts a damaged size field fails (MemoryError) instead of succeeding."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + extra_bytes
    resource.setrlimit(
        resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
    )
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 10, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (12, 10, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


IDX_IMAGES = idx_bytes(np.random.default_rng(2).integers(0, 256, (3, 28, 28)))
IDX_LABELS = idx_bytes(np.array([1, 9, 0]))


def cifar_batch_bytes() -> bytes:
    rng = np.random.default_rng(3)
    entry = {b"data": rng.integers(0, 256, (4, 3072), np.uint8), b"labels": [0, 3, 9, 1]}
    return pickle.dumps(entry, protocol=2)


def read_png_or_jpeg(path: Path) -> None:
    with contextlib.suppress(*UNREADABLE):  # skipped and counted by the loader
        read_image(path, 3, 10_000)


def read_idx_images(path: Path) -> None:
    """A damaged images file, raw with valid labels, and gzipped."""
    labels = path.with_suffix(".labels")
    labels.write_bytes(IDX_LABELS)
    with contextlib.suppress(UserError):
        read_split(path, labels, 10)
    gz = path.with_suffix(".gz")
    gz.write_bytes(gzip.compress(path.read_bytes()))
    with contextlib.suppress(UserError):
        read_idx(gz, 3)


def read_cifar_test_batch(path: Path) -> None:
    folder = path.parent / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    path.replace(folder / "test_batch")
    with contextlib.suppress(UserError):
        _read_cifar(folder, datasets.CIFAR10, False, 10)


def read_checkpoint(path: Path) -> None:
    with contextlib.suppress(UserError):
        load_model(path)


@cache
def checkpoint_bytes(folder: Path) -> bytes:
    return write_checkpoint(folder / "valid.pt", "vit").read_bytes()


FILES: dict[str, tuple[Callable[[Path], bytes], Callable[[Path], None]]] = {
    "png": (lambda _: png_bytes(), read_png_or_jpeg),
    "jpeg": (lambda _: jpeg_bytes(), read_png_or_jpeg),
    "idx": (lambda _: IDX_IMAGES, read_idx_images),
    "cifar": (lambda _: cifar_batch_bytes(), read_cifar_test_batch),
    "checkpoint": (checkpoint_bytes, read_checkpoint),
}


@pytest.mark.parametrize("kind", FILES)
def test_damaged_files(kind, tmp_path_factory, few=FEW):
    folder = tmp_path_factory.mktemp(f"valid_{kind}")
    valid_bytes, reader = FILES[kind]
    valid = valid_bytes(folder)
    reader_of_valid = folder / "as_written"
    reader_of_valid.write_bytes(valid)
    reader(reader_of_valid)  # the valid file reads

    work = tmp_path_factory.mktemp(kind)

    @given(damaged(valid))
    def check(data: bytes) -> None:
        cases[f"damaged {kind} files"] += 1
        shutil.rmtree(work)
        work.mkdir()
        (work / "file").write_bytes(data)
        with memory_cap(1 << 30), torch.no_grad():
            reader(work / "file")

    fuzz_settings(few["file"])(check)()


@pytest.mark.slow
@pytest.mark.parametrize("kind", FILES)
def test_damaged_files_thousands(kind, tmp_path_factory):
    test_damaged_files(kind, tmp_path_factory, MANY)
    print(f"{cases[f'damaged {kind} files']} damaged {kind} files")
