"""vit-export: every family's export gives the eager model's logits at batches of 1 and 7,
the JSON reproduces vit-predict's preprocessing, and an export that disagrees is refused."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

import vit_cli
from tests.conftest import TINY
from vit_cli import export
from vit_cli.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from vit_cli.composition import compose_train_config
from vit_cli.errors import UserError
from vit_cli.export import TOLERANCES, export_checkpoint
from vit_cli.inference import load_model, read_for_inference
from vit_cli.models import build_model
from vit_cli.models.factory import model_from_checkpoint
from vit_cli.models.swin import SwinTransformerBlock

# Tiny models of each family. The Swin one keeps the digits preset's 16 px, 2 px patches and
# 4 x 4 windows: an 8 x 8 map, so its second block shifts the windows under a mask.
FAMILIES = {
    "vit": ["model.embed_dim=16", "model.depth=2", "model.num_heads=2"],
    "deit": ["model=deit", "model.embed_dim=16", "model.depth=2", "model.num_heads=2"],
    "swin": ["model=swin", "model.embed_dim=8", "model.depths=[2,2]", "model.num_heads=[1,2]"],
}
IN_CHANS = {"vit": 1, "deit": 1, "swin": 3}  # grey and RGB models
IMG_SIZE = 16


def write_checkpoint(path: Path, family: str, ema: bool = False) -> Path:
    """A checkpoint as vit-train writes it (the fields inference reads), with random weights.

    With `ema`, the weight average is another random model, so that the two differ.
    """
    cfg = compose_train_config([*FAMILIES[family], "data.augment.eval_crop_ratio=0.875"])
    C = IN_CHANS[family]
    torch.manual_seed(0)
    model = build_model(cfg.model, IMG_SIZE, C, 10)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
        "data": {
            "class_names": [f"class{k}" for k in range(10)],
            "num_classes": 10,
            "in_chans": C,
            "img_size": IMG_SIZE,
            "mean": [0.3, 0.4, 0.5][:C],
            "std": [0.2, 0.25, 0.3][:C],
        },
    }
    if ema:
        ckpt["ema"] = {"model": build_model(cfg.model, IMG_SIZE, C, 10).state_dict(), "updates": 3}
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(root / f"{family}.pt", family) for family in FAMILIES}


def load_exported(format: str, path: Path):
    """The exported file as a function of a batch, loaded as a server would load it."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (images,), (logits,) = session.get_inputs(), session.get_outputs()
        assert (images.name, logits.name) == ("images", "logits")
        assert isinstance(images.shape[0], str)  # a symbolic batch dimension
        return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    if format == "torchscript":
        with export.quiet_torch_jit():
            return torch.jit.load(str(path))
    return torch.export.load(path).module()


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("format", export.FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_exports_the_eager_logits_at_batch_1_and_7(
    family, format, checkpoints, tmp_path
):
    output = tmp_path / f"model{export.SUFFIXES[format]}"
    result = export_checkpoint(checkpoints[family], format, output)
    assert result.path == output and result.files == (output,)
    assert result.max_abs_diff <= TOLERANCES[format] == result.tolerance
    assert result.batches == (1, 7)

    model = model_from_checkpoint(read_for_inference(checkpoints[family]), family)
    if family == "swin":  # the export covers shifted windows and their masks
        shifted = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
        assert any(b.shift_size > 0 and b.attn_mask is not None for b in shifted)
    run = load_exported(format, output)
    for batch in (1, 7):
        images = torch.randn(batch, IN_CHANS[family], IMG_SIZE, IMG_SIZE)
        with torch.no_grad():
            expected, got = model(images), run(images)
            assert got.shape == (batch, 10)
            torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCES[format])
            if family == "deit":  # what a DeiT predicts with: the mean of its two heads
                cls_logits, dist_logits = model.forward_heads(images)
                assert not torch.allclose(cls_logits, dist_logits)
                mean = (cls_logits + dist_logits) / 2
                torch.testing.assert_close(got, mean, rtol=0, atol=TOLERANCES[format])


def test_ema_exports_the_weight_average_under_its_own_name(tmp_path):
    ckpt_path = write_checkpoint(tmp_path / "best.pt", "vit", ema=True)
    result = export_checkpoint(ckpt_path, "torchscript", ema=True)
    assert result.path == tmp_path / "best_ema.torchscript.pt" and result.weights == "ema"
    ckpt = read_for_inference(ckpt_path)
    images = torch.randn(7, 1, IMG_SIZE, IMG_SIZE)
    with torch.no_grad():
        got = load_exported("torchscript", result.path)(images)
        torch.testing.assert_close(
            got, model_from_checkpoint(ckpt, "best", ema=True)(images), rtol=0, atol=1e-5
        )
        assert not torch.allclose(got, model_from_checkpoint(ckpt, "best")(images), atol=1e-3)
    spec = json.loads((tmp_path / "best_ema.preprocessing.json").read_text())
    assert spec["model"]["weights"] == "ema"


def test_onnx_weights_above_the_limit_go_to_a_data_file_beside_the_model(
    checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setattr(export, "ONNX_EXTERNAL_DATA_BYTES", 0)
    output = tmp_path / "served" / "vit.onnx"
    result = export_checkpoint(checkpoints["vit"], "onnx", output)
    assert result.files == (output, tmp_path / "served" / "vit.onnx.data")
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "vit.onnx", "vit.onnx.data", "vit.preprocessing.json"
    ]  # fmt: skip
    images = torch.randn(7, 1, IMG_SIZE, IMG_SIZE)
    expected = model_from_checkpoint(read_for_inference(checkpoints["vit"]), "vit")(images).detach()
    got = load_exported("onnx", output)(images)  # reads its weights from the renamed file
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCES["onnx"])


# ----------------------------------------------------------------------------- preprocessing


def preprocess_as_a_server(path: Path, spec: dict) -> np.ndarray:
    """The README's serving recipe: PIL and NumPy, from the JSON alone."""
    pre = spec["preprocessing"]
    image = ImageOps.exif_transpose(Image.open(path)).convert(pre["color_mode"])
    width, height = image.size
    short, crop = pre["resize_size"], pre["center_crop"]
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.Resampling.BILINEAR)  # antialiased, as in vit-predict
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32).reshape(crop, crop, -1) / pre["pixel_scale"]
    pixels = (pixels - np.float32(pre["mean"])) / np.float32(pre["std"])
    return pixels.transpose(2, 0, 1)  # (C, H, W)


def test_the_json_holds_the_checkpoints_preprocessing_and_reproduces_vit_predicts_input(
    checkpoints, tmp_path
):
    result = export_checkpoint(checkpoints["swin"], "torchscript", tmp_path / "swin.pt")
    assert result.preprocessing == tmp_path / "swin.preprocessing.json"
    spec = json.loads(result.preprocessing.read_text())
    data = load_checkpoint(checkpoints["swin"])["data"]
    pre = spec["preprocessing"]
    assert pre["mean"] == data["mean"] and pre["std"] == data["std"]
    assert pre["img_size"] == pre["center_crop"] == IMG_SIZE
    assert pre["resize_size"] == round(IMG_SIZE / 0.875) == 18
    assert (pre["eval_crop_ratio"], pre["interpolation"], pre["antialias"]) == (
        0.875, "bilinear", True
    )  # fmt: skip
    assert (pre["color_mode"], pre["in_chans"]) == ("RGB", 3)
    assert spec["class_names"] == data["class_names"]
    assert spec["input"] == {
        "name": "images", "shape": ["batch", 3, 16, 16], "dtype": "float32", "layout": "NCHW"
    }  # fmt: skip
    assert spec["output"]["meaning"] == "logits" and spec["output"]["shape"] == ["batch", 10]
    assert spec["model"] == {"family": "swin", "checkpoint": str(checkpoints["swin"]),
                             "weights": "model"}  # fmt: skip

    # A server that follows the JSON feeds the model what vit-predict feeds it. PIL's bilinear
    # resize and torchvision's (on uint8 pixels) round a pixel differently at most by 1 level.
    _, transform, _ = load_model(checkpoints["swin"])
    rng = np.random.default_rng(0)
    for width, height in [(37, 23), (20, 52), (18, 18), (64, 48)]:
        file = tmp_path / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(file)
        expected = transform.batch(transform.read(file)[None])[0].numpy()
        got = preprocess_as_a_server(file, spec)
        assert got.shape == expected.shape == (3, 16, 16)
        one_level = 1 / 255 / min(pre["std"])
        assert np.abs(got - expected).max() <= one_level + 1e-5


def test_a_deit_json_says_its_logits_average_both_heads(checkpoints, tmp_path):
    result = export_checkpoint(checkpoints["deit"], "torchscript", tmp_path / "deit.pt")
    spec = json.loads(result.preprocessing.read_text())
    assert "distillation head" in spec["output"]["heads"]
    assert spec["preprocessing"]["color_mode"] == "L"


# ----------------------------------------------------------------------------- refusals


def test_an_export_that_disagrees_is_refused_and_leaves_the_old_file(
    checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setitem(TOLERANCES, "torchscript", -1.0)  # no difference is small enough
    output = tmp_path / "vit.torchscript.pt"
    output.write_bytes(b"an earlier export")
    with pytest.raises(UserError, match=r"disagrees.*batch of 1.*tolerance -1"):
        export_checkpoint(checkpoints["vit"], "torchscript", output)
    assert output.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["vit.torchscript.pt"]  # no JSON, no temp


def test_ema_without_a_weight_average_and_unknown_formats_are_clear_errors(checkpoints, tmp_path):
    with pytest.raises(UserError, match="holds no weight average; drop --ema"):
        export_checkpoint(checkpoints["vit"], "exported", tmp_path / "m.pt2", ema=True)
    with pytest.raises(UserError, match="Valid formats: onnx, torchscript, exported"):
        export_checkpoint(checkpoints["vit"], "tflite", tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_name_the_install_command(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when absent
    with pytest.raises(UserError, match=r'needs onnxruntime.*pip install "vit-cli\[export\]"'):
        export_checkpoint(checkpoints["vit"], "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_onnx_packages_stay_optional():
    code = (
        "import sys, vit_cli.export, vit_cli.export_cli, vit_cli.inference\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert not {m.split(".")[0] for m in result.stdout.split()} & set(export.ONNX_PACKAGES)
    package = Path(vit_cli.__file__).parent
    importers = [
        path.name
        for path in package.rglob("*.py")
        if re.search(r"^\s*(import|from) (onnx|onnxruntime|onnxscript)\b", path.read_text(), re.M)
    ]
    assert importers == ["export.py"]


# ----------------------------------------------------------------------------- the CLI


def vit_export_command() -> list[str]:
    exe = shutil.which("vit-export")
    return [exe] if exe else [sys.executable, "-m", "vit_cli.export_cli"]


@pytest.mark.slow
def test_vit_export_exports_a_trained_checkpoint_and_reports_errors_in_one_line(run_cli, tmp_path):
    short = [a for a in TINY if not a.startswith("trainer.epochs")]
    trained = run_cli(*short, "trainer.epochs=1", "trainer.max_steps=4", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.stderr
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)

    def vit_export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*vit_export_command(), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    result = vit_export("run/last.pt")
    assert result.returncode == 0, result.stderr
    assert re.search(r"max \|difference\| \S+ \(tolerance 1e-04\)", result.stdout)
    spec = json.loads((tmp_path / "run" / "last.preprocessing.json").read_text())
    data = load_checkpoint(tmp_path / "run" / "last.pt")["data"]
    assert spec["preprocessing"]["mean"] == data["mean"]
    assert spec["class_names"] == data["class_names"]
    assert (tmp_path / "run" / "last.onnx").is_file()

    refused = vit_export("run/last.pt", "--ema", "--format", "exported")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "vit-export: error" in refused.stderr and "no weight average" in refused.stderr
    assert not (tmp_path / "run" / "last_ema.pt2").exists()
    assert vit_export("--help").returncode == 0


def _file_size_limit(limit: int):
    """A preexec_fn: files this process writes cannot grow past `limit` bytes (ulimit -f),
    a disk that fills at that size. Python ignores SIGXFSZ, so a write fails with EFBIG."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("format", ["onnx", "torchscript", "exported"])
def test_an_export_to_a_full_disk_is_one_message_and_leaves_nothing_behind(
    format, checkpoints, tmp_path
):
    output = tmp_path / "out" / f"vit.{format}"
    output.parent.mkdir()
    command = [*vit_export_command(), str(checkpoints["vit"]), "--format", format,
               "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            preexec_fn=_file_size_limit(4096))  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "vit-export: error: Could not write" in result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert list(output.parent.iterdir()) == []  # no model, no JSON, no temporary folder
