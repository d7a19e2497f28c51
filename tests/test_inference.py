"""Inference: vit-eval reproduces training's val scores, vit-predict agrees with it, the API."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import vit_cli
from tests.conftest import TINY
from vit_cli import load_model, predict
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.config import DataConfig
from vit_cli.data import build_data
from vit_cli.errors import UserError
from vit_cli.eval_cli import main as eval_main
from vit_cli.inference import EvalTransform, expand_inputs
from vit_cli.trainer import fit

TINY_VIT = [a for a in TINY if a.startswith("model.")]
FAMILIES = {
    "vit": TINY_VIT,
    "deit": ["model=deit", *TINY_VIT],
    "swin": ["model=swin", "model.embed_dim=16", "model.depths=[1,1]", "model.num_heads=[1,2]"],
}
# Training settings of TINY, shortened to a few steps.
SHORT = [a for a in TINY if not a.startswith("model.")] + [
    "trainer.epochs=1",
    "trainer.max_steps=8",
]


def tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    exe = shutil.which(name)
    assert exe, f"{name} is not installed: pip install -e ."
    return subprocess.run(
        [exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def digits_val() -> tuple[torch.Tensor, torch.Tensor]:
    """The val images ([0, 1] floats at 16 px, as stored) and labels, in loader order."""
    data = build_data(DataConfig(mean=[0.3053], std=[0.3760]), 16, torch.Generator())
    return data.val_loader.dataset.tensors


def write_png(image: torch.Tensor, path: Path) -> None:
    """A (1, H, W) image in [0, 1] as an 8-bit grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image[0] * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(path)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A short vit-train run on digits (the real CLI), long enough for confident predictions."""
    root = tmp_path_factory.mktemp("digits_run")
    args = [a for a in TINY if not a.startswith("trainer.epochs")]
    result = tool("vit-train", *args, "trainer.epochs=6", "hydra.run.dir=run", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


@pytest.mark.slow
def test_vit_eval_reproduces_the_val_top1_logged_in_tensorboard(digits_run):
    result = tool("vit-eval", "best.pt", "--out", "eval", cwd=digits_run)
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "per-class" in result.stdout
    metrics = json.loads((digits_run / "eval" / "metrics.json").read_text())
    best = load_checkpoint(digits_run / "best.pt")
    events = EventAccumulator(str(digits_run)).Reload()
    (logged,) = [e.value for e in events.Scalars("val/acc1") if e.step == best["state"]["step"]]
    # TensorBoard stores float32: the same figure, to its last bit.
    assert np.float32(metrics["acc1"]) == np.float32(logged)
    assert metrics["acc1"] == best["metrics"]["val/acc1"] == metrics["logged_acc1"]
    assert metrics["loss"] == pytest.approx(best["metrics"]["val/loss"], rel=1e-9)
    assert metrics["images"] == 360 and sum(c["images"] for c in metrics["per_class"]) == 360
    confusion = np.array(metrics["confusion_matrix"])
    assert np.trace(confusion) == round(metrics["acc1"] * 360 / 100)
    with Image.open(digits_run / "eval" / "confusion.png") as png:
        assert png.format == "PNG" and png.width >= 10 * 16


@pytest.mark.slow
def test_vit_predict_agrees_with_vit_eval_on_val_digits_written_as_png(digits_run, tmp_path):
    images, labels = digits_val()
    chosen = range(0, 360, 6)  # 60 val images, every class
    for i in chosen:
        for split in ("train", "val"):  # imagefolder wants both splits; train is not read
            write_png(images[i], tmp_path / "pngs" / split / str(int(labels[i])) / f"{i:03d}.png")
    eval_png = tool("vit-eval", str(digits_run / "best.pt"), "data=imagefolder",
                    f"data.root={tmp_path / 'pngs'}", "--out", "eval_png", cwd=tmp_path)  # fmt: skip
    predicted = tool("vit-predict", str(digits_run / "best.pt"), "pngs/val", "--json",
                     "--topk", "10", cwd=tmp_path)  # fmt: skip
    eval_digits = tool(
        "vit-eval", str(digits_run / "best.pt"), "--out", "eval_digits", cwd=tmp_path
    )
    for result in (eval_png, predicted, eval_digits):
        assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in predicted.stdout.splitlines()]
    by_path = {Path(line["path"]).name: line["predictions"] for line in lines}
    assert len(by_path) == 60

    # 1. The same PNG files through vit-eval's loader: the same tensors, the same predictions.
    with (tmp_path / "eval_png" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        top = by_path[Path(row["path"]).name][0]
        assert top["label"] == row["predicted"]
        assert top["prob"] == pytest.approx(float(row["prob"]), abs=1e-5)

    # 2. Against vit-eval on the stored digits. The PNG holds round(255 x) where the data holds
    # x (multiples of 1/256), and the RGB -> grayscale step of the file loader truncates one
    # more level, so pixels differ by under 2/255: probabilities move by a few hundredths,
    # and the top-1 can flip only where the two best classes are that close.
    with (tmp_path / "eval_digits" / "predictions.csv").open() as f:
        stored = list(csv.DictReader(f))
    close = 0
    for i in chosen:
        top = by_path[f"{i:03d}.png"]
        probs = {p["label"]: p["prob"] for p in top}
        assert probs[stored[i]["predicted"]] == pytest.approx(float(stored[i]["prob"]), abs=0.05)
        if top[0]["prob"] - top[1]["prob"] > 0.05:
            assert top[0]["label"] == stored[i]["predicted"]
        else:
            close += 1
    assert close < 10


@pytest.mark.slow
def test_vit_predict_writes_attention_maps_beside_the_predictions(digits_run, tmp_path):
    from vit_cli.figures import image_grid

    images, _ = digits_val()
    for i in range(3):
        write_png(images[i], tmp_path / "in" / ("a" if i < 2 else "b") / f"{i % 2}.png")
    (tmp_path / "in" / "b" / "broken.png").write_bytes(b"not a png")
    result = tool("vit-predict", str(digits_run / "best.pt"), "in", "--json",
                  "--attention", "maps", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1  # the broken file
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    written = {line["path"]: line.get("attention") for line in lines}
    assert written[str(Path("in/b/broken.png"))] is None
    pngs = sorted(Path(p).name for p in written.values() if p)
    assert pngs == ["0.png", "0_2.png", "1.png"]  # two 0.png from two folders
    # One row: the image, the rollout and the last block's 2 heads, at the model's 16 px.
    expected = image_grid(torch.zeros(4, 3, 16, 16), ["x"] * 4, columns=4).shape[1:]
    for name in pngs:
        with Image.open(tmp_path / "maps" / name) as png:
            assert (png.height, png.width) == tuple(expected)


@pytest.mark.slow
def test_a_corrupt_file_gets_an_error_line_and_the_others_are_classified(digits_run, tmp_path):
    images, _ = digits_val()
    for i in range(5):
        write_png(images[i], tmp_path / "in" / f"{i}.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG but not really")
    result = tool("vit-predict", str(digits_run / "best.pt"), "in", "--json", "--topk", "3",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 6
    (broken,) = [line for line in lines if "error" in line]
    assert broken["path"].endswith("broken.png") and "not a readable image" in broken["error"]
    good = [line for line in lines if "predictions" in line]
    assert len(good) == 5
    for line in good:
        assert [p["label"] for p in line["predictions"]] != []
        assert len(line["predictions"]) == 3 and 0.0 < line["predictions"][0]["prob"] <= 1.0
    # Read ahead by a loader process, the same files give the same lines, in the same order.
    ahead = tool("vit-predict", str(digits_run / "best.pt"), "in", "--json", "--topk", "3",
                 "--workers", "1", cwd=tmp_path)  # fmt: skip
    assert ahead.returncode == 1
    assert [json.loads(line) for line in ahead.stdout.splitlines()] == lines
    table = tool("vit-predict", str(digits_run / "best.pt"), "in/*.png", cwd=tmp_path)
    assert table.returncode == 1
    assert "broken.png" in table.stderr and "1 of 6 files could not be read" in table.stderr
    assert "0.png" in table.stdout and "Traceback" not in table.stderr
    assert not (tmp_path / "outputs").exists()  # no Hydra run directory


def test_vit_eval_names_the_file_of_each_prediction_around_an_unreadable_one(digits_run, tmp_path):
    images, labels = digits_val()
    first_of_class = [labels.tolist().index(k) for k in range(10)]  # imagefolder needs all 10
    for k, i in enumerate(first_of_class):
        for split in ("train", "val"):  # imagefolder wants both splits; train is not read
            write_png(images[i], tmp_path / "pngs" / split / str(k) / f"{k}.png")
    (tmp_path / "pngs" / "val" / "4" / "4b.png").write_bytes(b"\x89PNG but not really")
    result = tool("vit-eval", str(digits_run / "best.pt"), "data=imagefolder",
                  f"data.root={tmp_path / 'pngs'}", "data.num_workers=2", "--out", "ev",
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with (tmp_path / "ev" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(row["path"]).name for row in rows) == [f"{k}.png" for k in range(10)]
    for row in rows:  # each row's target is the class folder its file sits in
        assert Path(row["path"]).parent.name == row["target"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_round_trips_through_a_checkpoint(family, compose_cfg, tmp_path, capsys):
    ema = ["trainer.ema.decay=0.5"] if family == "deit" else []
    fit(compose_cfg(*SHORT, *FAMILIES[family], *ema), tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")

    for use_ema in [False, True] if ema else [False]:
        key = "val_ema/acc1" if use_ema else "val/acc1"
        eval_main([str(tmp_path / "last.pt"), "--out", str(tmp_path / f"eval{use_ema}")]
                  + ["--ema"] * use_ema)  # fmt: skip
        metrics = json.loads((tmp_path / f"eval{use_ema}" / "metrics.json").read_text())
        assert metrics["acc1"] == ckpt["metrics"][key]

        # The Python API on the stored val tensors gives vit-eval's predictions.
        model, transform, class_names = load_model(tmp_path / "last.pt", ema=use_ema)
        images, _ = digits_val()
        top = predict(model, images, transform, class_names, topk=2)
        with (tmp_path / f"eval{use_ema}" / "predictions.csv").open() as f:
            assert [p[0].label for p in top] == [row["predicted"] for row in csv.DictReader(f)]
    capsys.readouterr()


def test_eval_transform_converts_rgba_and_grayscale_as_the_model_expects():
    gray = EvalTransform(img_size=16, in_chans=1, mean=[0.5], std=[0.5])
    rgb = EvalTransform(img_size=16, in_chans=3, mean=[0.5] * 3, std=[0.5] * 3)
    rgba = Image.new("RGBA", (40, 32), (255, 255, 255, 128))
    assert gray(rgba).shape == (1, 1, 16, 16) and rgb(rgba).shape == (1, 3, 16, 16)
    assert torch.allclose(gray(rgba), torch.ones(1, 1, 16, 16), atol=0.01)  # white
    small = Image.new("L", (8, 8), 0)
    assert rgb([small, small]).shape == (2, 3, 16, 16)
    pixels = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    as_pil = Image.fromarray(pixels[0].numpy(), mode="L")
    assert torch.allclose(gray(pixels), gray(pixels.float() / 255), atol=1e-6)
    assert (gray(as_pil) - gray(pixels)).abs().max() <= 1 / 255 / 0.5 + 1e-6  # RGB -> gray


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from tests.conftest import CONFIG_DIR
    from vit_cli.composition import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[*TINY_VIT, *SHORT]))
    GlobalHydra.instance().clear()
    root = tmp_path_factory.mktemp("small")
    fit(cfg, root)
    return root / "last.pt"


def edited(ckpt_path: Path, tmp_path: Path, edit) -> Path:
    ckpt = load_checkpoint(ckpt_path)
    edit(ckpt)
    save_checkpoint(ckpt, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def drop_class_names(ckpt: dict) -> None:
    del ckpt["data"]["class_names"]


def deepen(ckpt: dict) -> None:
    ckpt["config"]["model"]["depth"] = 3


def old_format(ckpt: dict) -> None:
    del ckpt["format_version"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop_class_names, "lacks what inference needs: data.class_names"),
        (deepen, "does not fit the configured model"),
        (old_format, "format version None"),
    ],
)
def test_checkpoints_unfit_for_inference_get_short_messages(
    small_checkpoint, tmp_path, edit, message
):
    with pytest.raises(UserError, match=message):
        load_model(edited(small_checkpoint, tmp_path, edit))


def test_missing_and_corrupt_checkpoints_and_empty_inputs_get_short_messages(
    small_checkpoint, tmp_path
):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nowhere.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_model(tmp_path / "corrupt.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.jpg")])
    with pytest.raises(UserError, match="no weight average"):
        load_model(small_checkpoint, ema=True)


def error_line(err: str, tool: str) -> str:
    """The line of `err` that holds `tool`'s error message (off a terminal, all of it)."""
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_errors_are_one_panel_with_exit_status_2(small_checkpoint, tmp_path, capsys):
    # Off a terminal (here: a pipe, and pytest's capture) a message is printed whole on one
    # line, so that each is found entire, however long the test folder's path.
    (tmp_path / "empty").mkdir()
    result = tool("vit-predict", str(small_checkpoint), "empty", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "The folder empty holds no images (looked for " in error_line(
        result.stderr, "vit-predict"
    )
    nowhere = tmp_path / "nowhere.pt"
    for args, message in [
        ([str(nowhere)], f"Checkpoint {nowhere} does not exist. Pass the path of a .pt file"),
        ([str(small_checkpoint), "data=cifar7"], "Unknown data=cifar7. Valid names: "),
        (
            [str(small_checkpoint), "model.depth=3"],
            "vit-eval takes data=NAME and data.KEY=VALUE overrides, not model.depth=3.",
        ),
        ([str(small_checkpoint), "data.no_such_key=1"], "no_such_key"),
        (
            [str(small_checkpoint), "data.batch_size=-3"],
            "data.batch_size=-3 is invalid: it must be ",
        ),
        (
            [str(small_checkpoint), "--batch-size=0"],
            "data.eval_batch_size=0 is invalid: it must be ",
        ),
        (
            [str(small_checkpoint), f"--out={small_checkpoint}"],
            f"--out {small_checkpoint} is a file; name a folder (it is made when missing).",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            eval_main(args)
        assert exit_info.value.code == 2
        assert message in error_line(capsys.readouterr().err, "vit-eval")


def test_help_of_both_tools(tmp_path):
    for name in ("vit-eval", "vit-predict"):
        result = tool(name, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "examples:" in result.stdout


def test_load_model_imports_neither_the_training_stack_nor_tensorboard(small_checkpoint):
    code = (
        "import sys, vit_cli\n"
        f"model, transform, names = vit_cli.load_model({str(small_checkpoint)!r})\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "vit_cli.inference" in loaded
    training = {"vit_cli.trainer", "vit_cli.loop", "vit_cli.components", "vit_cli.sinks"}
    assert not loaded & training
    assert not {m for m in loaded if m.split(".")[0] == "tensorboard" or ".tensorboard" in m}


def test_no_module_below_the_cli_imports_the_trainer():
    package = Path(vit_cli.__file__).parent
    importers = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if re.search(
            r"^\s*(from vit_cli\.trainer |from vit_cli import trainer|import vit_cli\.trainer)",
            path.read_text(),
            re.M,
        )
    ]
    assert importers == ["train.py"]


def test_vit_eval_never_downloads_or_extracts_what_a_checkpoint_names(
    small_checkpoint, tmp_path, capsys
):
    from tests.test_data import write_cifar_archive

    write_cifar_archive(tmp_path / "data")

    def point_at_the_archive(ckpt: dict) -> None:
        data = ckpt["config"]["data"]
        data.update(name="cifar10", root=str(tmp_path / "data"), download=True, check_md5=False)

    path = edited(small_checkpoint, tmp_path, point_at_the_archive)
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(path), "--out", str(tmp_path / "eval")])
    assert exit_info.value.code == 2
    assert "vit-eval reads only data that is in place" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar-10-python.tar.gz"]


def test_load_model_raises_the_projects_error_on_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello world\n")
    for name in ("empty.pt", "text.pt"):
        with pytest.raises(UserError, match="corrupt or not a vit-train checkpoint"):
            load_model(tmp_path / name)


def test_a_glob_over_a_folder_with_a_symlink_loop_ends_and_names_each_file_once(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    for name in ("photos/one.png", "photos/a/two.png"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    (tmp_path / "photos" / "a" / "up").symlink_to("..")  # photos/a/up/a/up/... forever
    found = expand_inputs([str(tmp_path / "photos" / "**" / "*.png")])
    assert found == [tmp_path / "photos" / "a" / "two.png", tmp_path / "photos" / "one.png"]
    assert expand_inputs([str(tmp_path / "photos" / "*.png")]) == [tmp_path / "photos" / "one.png"]


def test_vit_predict_refuses_an_image_above_max_pixels_per_file(small_checkpoint, tmp_path):
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    Image.new("L", (8, 8)).save(tmp_path / "small.png")
    result = tool(
        "vit-predict", str(small_checkpoint), str(tmp_path / "big.png"),
        str(tmp_path / "small.png"), "--json", "--max-pixels=1000", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    big, small = (json.loads(line) for line in result.stdout.splitlines())
    assert "40x40 = 1,600 pixels, above the limit of 1,000" in big["error"]
    assert "predictions" in small


def test_off_a_terminal_table_rows_and_error_lines_keep_long_paths_whole(
    small_checkpoint, tmp_path
):
    folder = tmp_path / ("a_folder_with_a_long_name_" * 4)
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"not a png")
    result = tool("vit-predict", str(small_checkpoint), str(folder), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert any(str(folder / "small.png") in line for line in result.stdout.splitlines())
    assert any(str(folder / "broken.png") in line for line in result.stderr.splitlines())
