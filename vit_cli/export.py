"""Export a vit-train checkpoint for serving: ONNX, TorchScript, or a torch.export program.

Every export is checked before it is kept. The file is written into a temporary folder in
the destination folder, loaded back (ONNX Runtime on the CPU, `torch.jit.load`,
`torch.export.load`), run on random batches of 1 and 7 images and compared with the eager
model. Only a file that agrees within the format's tolerance is renamed into place
(`os.replace`); one that disagrees is deleted and the export raises a UserError. Then
`<stem>.preprocessing.json` is written beside it: how vit-predict turns an image file into
the model's input, read from the checkpoint's own eval transform, so that a server without
vit_cli can reproduce vit-predict's predictions.

onnx, onnxruntime and onnxscript are optional (`pip install "vit-cli[export]"`): they are
imported here only, and only by an ONNX export.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vit_cli.augment import pil_mode
from vit_cli.errors import UserError, first_line, no_space_error
from vit_cli.inference import EvalTransform, eval_transform_of, read_for_inference
from vit_cli.models.factory import model_from_checkpoint
from vit_cli.runtime import resolve_device

FORMATS = ("onnx", "torchscript", "exported")
# The default file name beside the checkpoint is its stem plus this suffix.
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}
# Largest |exported - eager| logit difference accepted. ONNX Runtime's kernels (fused
# attention, LayerNorm, GEMM) sum in another order than PyTorch's; the two PyTorch formats
# run PyTorch's own kernels.
TOLERANCES = {"onnx": 1e-4, "torchscript": 1e-5, "exported": 1e-5}
CHECK_BATCHES = (1, 7)
# The example batch that exporting traces with. Not 1: torch.export specialises sizes 0 and 1
# to constants, and a trace can bake a batch of 1 into broadcasts.
EXAMPLE_BATCH = 2
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Weights above this size go to a `<name>.data` file beside the .onnx file: protobuf, which
# ONNX files are, holds at most 2 GiB.
ONNX_EXTERNAL_DATA_BYTES = 3 * 2**29  # 1.5 GiB
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the model file
    files: tuple[Path, ...]  # every file of the model: `path`, and an ONNX weights file if any
    preprocessing: Path  # the JSON beside it
    format: str
    weights: str  # "model" or "ema"
    max_abs_diff: float  # largest |exported - eager| logit over the check batches
    tolerance: float
    batches: tuple[int, ...]  # the batch sizes checked


def export_checkpoint(
    path: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    ema: bool = False,
    device: str = "cpu",
) -> ExportResult:
    """Export a vit-train checkpoint's model (or its weight average, `ema`) to `format`.

    The model takes a float32 batch (B, in_chans, img_size, img_size), normalised as
    vit-predict normalises it, with any B >= 1, and returns logits (B, num_classes); a DeiT
    student returns the mean of its two heads, as it predicts. `output` defaults to the
    checkpoint's stem plus `SUFFIXES[format]` (with `_ema` for the weight average), beside it.
    """
    if format not in FORMATS:
        raise UserError(f"Unknown export format {format!r}. Valid formats: {', '.join(FORMATS)}.")
    if format == "onnx":
        require_onnx()
    torch_device = resolve_device(device)
    if format == "onnx" and torch_device.type != "cpu":
        raise UserError(
            f"An ONNX export runs on the CPU (device={device} was asked for): the file does not "
            "depend on a device, ONNX Runtime chooses one when serving. Drop --device."
        )
    source = Path(path).expanduser()
    ckpt = read_for_inference(source)
    model = model_from_checkpoint(ckpt, str(source), ema).to(torch_device)
    output = (
        Path(output).expanduser() if output is not None else default_output(source, format, ema)
    )
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; name the file to write.")
    output.parent.mkdir(parents=True, exist_ok=True)
    input_shape = (ckpt["data"]["in_chans"], ckpt["data"]["img_size"], ckpt["data"]["img_size"])
    what = f"the {ckpt['config']['model']['name']} model of {source}"
    max_diff, files = write_checked(format, model, input_shape, torch_device, output, what)
    spec = preprocessing_spec(ckpt, eval_transform_of(ckpt), model, source, ema)
    json_path = preprocessing_path(output, format)
    write_text_atomically(json_path, json.dumps(spec, indent=2) + "\n")
    return ExportResult(
        path=output,
        files=files,
        preprocessing=json_path,
        format=format,
        weights="ema" if ema else "model",
        max_abs_diff=max_diff,
        tolerance=TOLERANCES[format],
        batches=CHECK_BATCHES,
    )


def default_output(checkpoint: Path, format: str, ema: bool) -> Path:
    """`best.pt` -> `best.onnx`, `best.torchscript.pt`, `best.pt2` (`best_ema.*` with --ema)."""
    stem = checkpoint.stem + ("_ema" if ema else "")
    return checkpoint.with_name(stem + SUFFIXES[format])


def preprocessing_path(output: Path, format: str) -> Path:
    """`best.onnx`, `best.pt2` and `best.torchscript.pt` -> `best.preprocessing.json`.

    The JSON describes the model's input and output, which all formats share, so exports of
    one checkpoint to several formats under one stem share it too.
    """
    name = output.name.removesuffix(SUFFIXES[format])
    if name == output.name:  # a name of the user's own: drop its last suffix only
        name = output.stem
    return output.with_name(name + ".preprocessing.json")


def require_onnx() -> None:
    """Import the optional ONNX packages, or say how to install them."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f"--format onnx needs {', '.join(missing)}, which are not installed. Install them "
            'with pip install -e ".[export]" in a checkout, or pip install "vit-cli[export]".'
        )


# ----------------------------------------------------------------------------- writers


def batch_dim() -> torch.export.Dim:
    """The dynamic batch dimension, from 1 image up."""
    return torch.export.Dim("batch", min=1)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX through the dynamo exporter (torch.export, then onnxscript's translation)."""
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch_dim()},),
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(path, external_data=weight_bytes > ONNX_EXTERNAL_DATA_BYTES)


@contextlib.contextmanager
def quiet_torch_jit() -> Iterator[None]:
    """Silence two warnings that do not apply here. PyTorch marks torch.jit deprecated in
    favour of torch.export (the `exported` format). And tracing turns PatchEmbed's check of
    the input size into a constant, which is what an export for a fixed size wants."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit.*deprecated", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced TorchScript module. Tracing records the batch size as `x.shape[0]`, so it
    stays dynamic; the models have no data-dependent control flow for a trace to miss."""
    with torch.no_grad(), quiet_torch_jit():
        traced = torch.jit.trace(model, example)
    write_serialized(lambda f: torch.jit.save(traced, f), path)


def write_exported(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A torch.export program (`.pt2`) with a dynamic batch dimension."""
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch_dim()},))
    write_serialized(lambda f: torch.export.save(program, f), path)


def write_serialized(save: Callable[[io.BytesIO], None], path: Path) -> None:
    """`save` into memory, then the bytes to `path`. PyTorch's file writer aborts the process
    when a write to a file fails (a full disk): its destructor throws. Python's write raises
    an OSError instead, which is reported as one message."""
    buffer = io.BytesIO()
    save(buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
    "exported": write_exported,
}


def write_checked(
    format: str,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    output: Path,
    what: str,
) -> tuple[float, tuple[Path, ...]]:
    """Export `model` to `output` if the written file agrees with it: (largest difference,
    the files written). Written in a temporary folder beside `output`, checked, then renamed."""
    with staging(output) as staged:
        example = torch.randn(EXAMPLE_BATCH, *input_shape, device=device)
        try:
            WRITERS[format](model, example, staged)
        except Exception as e:  # the exporters fail in many ways, each with its own type
            if no_space_error(e) is not None:
                raise  # a full disk, reported as such (cli.reported_errors)
            raise UserError(
                f"PyTorch could not export {what} to {format}: {first_line(e)}. Try another "
                "--format (HYDRA_FULL_ERROR=1 shows the trace)."
            ) from e
        max_diff = verify(format, staged, model, input_shape, device, output)
        return max_diff, publish(staged, output)


# ----------------------------------------------------------------------------- checking


def load_back(
    format: str, path: Path, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written file, loaded as a server would load it, as a function of a batch."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    if format == "torchscript":
        with quiet_torch_jit():
            module = torch.jit.load(str(path), map_location=device)
        return module
    return torch.export.load(path).module()


def verify(
    format: str,
    path: Path,
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device,
    output: Path,
) -> float:
    """The largest |file - eager| logit difference on random batches of CHECK_BATCHES.

    Raises a UserError when the file fails to load or run, gives another shape, or differs
    by more than TOLERANCES[format] (NaN included).
    """
    tolerance = TOLERANCES[format]

    def refuse(what: str) -> UserError:
        return UserError(
            f"The {format} export disagrees with the PyTorch model: {what}. Nothing was "
            f"written to {output}. This is a bug in exporting this model; --format "
            f"{'exported' if format != 'exported' else 'onnx'} may work meanwhile."
        )

    try:
        run = load_back(format, path, device)
    except Exception as e:
        raise refuse(f"the written file does not load ({first_line(e)})") from e
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in CHECK_BATCHES:
        images = torch.randn(batch, *input_shape, generator=generator).to(device)
        with torch.no_grad():
            expected = model(images).float().cpu()  # (batch, num_classes)
            try:
                got = run(images).float().cpu()
            except Exception as e:
                raise refuse(f"it fails on a batch of {batch} ({first_line(e)})") from e
        if got.shape != expected.shape:
            raise refuse(
                f"on a batch of {batch} it returns shape {tuple(got.shape)}, the model "
                f"{tuple(expected.shape)}"
            )
        diff = (got - expected).abs().max().item()
        if not diff <= tolerance:
            raise refuse(
                f"on a batch of {batch} its logits differ by up to {diff:.2g} (tolerance "
                f"{tolerance:.0e})"
            )
        worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A path with `output`'s name in a temporary folder beside it, removed on leaving.

    The exporter writes there (an ONNX file may bring a weights file that it names after
    itself), so nothing appears under `output`'s name until `publish` moves it.
    """
    # A killed export (SIGKILL, power loss) can leave its folder behind.
    for stale in output.parent.glob(f".{glob.escape(output.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        yield folder / output.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staged: Path, output: Path) -> tuple[Path, ...]:
    """Rename the staged files into `output`'s folder, the model file last, so that its
    name appears only once its weights file (if any) is in place."""
    companions = sorted(p for p in staged.parent.iterdir() if p != staged)
    for part in [*companions, staged]:
        os.replace(part, output.parent / part.name)
    return (output, *(output.parent / p.name for p in companions))


def write_text_atomically(path: Path, text: str) -> None:
    """Write under a temporary name, then rename. Opened with `open` rather than mkstemp,
    whose 0600 mode would keep the file from a server running as another user."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- preprocessing


def preprocessing_spec(
    ckpt: dict, transform: EvalTransform, model: nn.Module, source: Path, ema: bool
) -> dict:
    """What a server needs to feed the exported model as vit-predict feeds it."""
    data = ckpt["data"]
    C, S, K = data["in_chans"], data["img_size"], data["num_classes"]
    output = {"name": OUTPUT_NAME, "shape": ["batch", K], "dtype": "float32", "meaning": "logits"}
    output["probabilities"] = "softmax over the last dimension, as vit-predict reports them"
    if hasattr(model, "set_both_heads"):
        output["heads"] = "the mean of the class head's and the distillation head's logits"
    preprocessing = describe_eval_transform(transform)
    # For the record: resize_size is round(img_size / eval_crop_ratio) (augment.CropGeometry).
    saved_augment = ckpt["config"]["data"].get("augment", {})
    preprocessing["eval_crop_ratio"] = saved_augment.get("eval_crop_ratio", 1.0)
    return {
        "model": {
            "family": ckpt["config"]["model"]["name"],
            "checkpoint": str(source),
            "weights": "ema" if ema else "model",
        },
        "class_names": list(data["class_names"]),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", C, S, S],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "output": output,
        "preprocessing": preprocessing,
    }


def describe_eval_transform(transform: EvalTransform) -> dict:
    """The eval transform's steps as data, read from its own objects so that the JSON
    follows the transform."""
    geometry = transform.file.geometry
    if geometry.random:
        raise RuntimeError("vit-export describes the eval transform, not a random crop.")
    spec: dict = {
        "color_mode": pil_mode(transform.in_chans),  # "L" (luma, ITU-R 601-2) or "RGB"
        "in_chans": transform.in_chans,
        "exif_orientation": "applied",
        "resize_size": geometry.resize_to,
        "resize_edge": "shorter",  # the longer: int(resize_size * long / short)
        "interpolation": "bilinear",
        "antialias": True,
        "center_crop": geometry.size,
        # JPEGs decoded at a reduced DCT scale where the crop keeps its size (PIL's draft).
        "jpeg_dct_scaling": transform.file.dct_scaling,
    }
    spec.update(
        img_size=transform.img_size,
        pixel_scale=255.0,
        mean=transform.mean,
        std=transform.std,
        max_image_pixels=transform.max_pixels,
    )
    spec["steps"] = [
        f"open the image, turn it upright by its EXIF orientation tag and convert it to PIL "
        f"mode {spec['color_mode']}",
        f"resize its shorter side to {spec['resize_size']} pixels ({spec['interpolation']}, "
        f"antialias={spec['antialias']}), keeping the aspect ratio, on uint8 pixels",
        f"crop the centre {spec['center_crop']} x {spec['center_crop']} pixels",
        "divide by pixel_scale (255) to [0, 1], subtract mean and divide by std per channel",
        f"stack as float32 {INPUT_NAME} (batch, {spec['in_chans']}, {transform.img_size}, "
        f"{transform.img_size})",
    ]
    return spec
