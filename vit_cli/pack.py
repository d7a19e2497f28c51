"""`vit-data pack`: a data source's splits written as WebDataset tar shards, with a manifest.

Each split's samples go into shards in the split's own order, `shard_size` to a shard, so
that one command always writes the same shards: a rerun after Ctrl-C or a crash keeps the
shards already written and writes the rest. Images held in memory are written as PNG
(lossless); image files as their own bytes, never decoded and encoded again. webdataset's
TarWriter writes the tar files; `manifest.json` lists each shard's samples, size and MD5 for
the data=webdataset reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from vit_cli.config import DataConfig, validate
from vit_cli.data._shards import MANIFEST, webdataset_module
from vit_cli.data.webdataset import WebDatasetConfig
from vit_cli.errors import UserError

FORMAT = "vit-data pack 1"
# The settings of the shards in a folder and what each one holds: a rerun keeps the shards
# listed here and refuses other settings. Written after every shard.
PROGRESS = ".pack-progress.json"
# The extensions of image files by PIL's name of their format, where it is not the format in
# lower case: as webdataset's decoders and data=webdataset name them (MPO: a phone's JPEG).
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg"}


@dataclass(frozen=True)
class Shard:
    file: str  # train-000003.tar
    split: str
    indices: range  # the samples of its split that it holds


@dataclass
class Packing:
    """The shards that one source's splits make in one folder, and those already written."""

    out: Path
    cfg: DataConfig
    class_names: list[str]
    datasets: dict[str, Any]  # split -> its dataset (`ImageFiles`, or images as tensors)
    shards: list[Shard]
    settings: dict[str, Any]
    # file -> {"samples", "bytes", "md5", "image_keys", "unreadable": [[path, reason], ...]}
    written: dict[str, dict[str, Any]]

    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.file not in self.written]


def open_packing(src: str, out: Path, overrides: list[str], shard_size: int) -> Packing:
    """Check the arguments, build SRC's splits and take stock of OUT (created when missing),
    before any shard is written."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}.")
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file: give a folder (it is created when missing).")
    webdataset_module()
    cfg = data_config(src, overrides)

    from vit_cli.data import ImageFiles, prepare_data, source

    prepare_data(cfg)
    splits = source(cfg).build(cfg, cfg.img_size)
    datasets = {"train": splits.train, "val": splits.val}
    if splits.test is not None and splits.test is not splits.val:
        datasets["test"] = splits.test
    shards = [
        Shard(f"{split}-{k:06d}.tar", split, range(start, min(start + shard_size, len(data))))
        for split, data in datasets.items()
        for k, start in enumerate(range(0, len(data), shard_size))
    ]
    settings = {
        "format": FORMAT,
        "shard_size": shard_size,
        # As JSON reads it back (tuples as lists), to compare with the settings saved.
        "data": json.loads(json.dumps(asdict(cfg))),
        # A folder whose files changed would put other samples into the remaining shards.
        "samples": {
            split: sample_list_md5(data) if isinstance(data, ImageFiles) else len(data)
            for split, data in datasets.items()
        },
    }
    written = shards_written(out, settings, [shard.file for shard in shards])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create {out} ({e.strerror}): choose another OUT.") from e
    packing = Packing(out, cfg, splits.class_names, datasets, shards, settings, written)
    save_progress(packing)
    return packing


def data_config(src: str, overrides: list[str]) -> DataConfig:
    """The data config SRC names (a file of configs/data/, or an image folder for
    data=imagefolder), composed by Hydra as vit-train composes it, and checked."""
    from vit_cli.composition import compose_data_config

    others = [o for o in overrides if not o.startswith("data.")]
    if others:
        raise UserError(
            f"vit-data pack takes data.KEY=VALUE overrides after SRC and OUT, not "
            f"{' '.join(others)}."
        )
    names = sorted(
        p.name.removesuffix(".yaml")
        for p in (files("vit_cli.configs") / "data").iterdir()
        if p.name.endswith(".yaml")
    )
    folder = Path(src).expanduser()
    if src in names:
        group = [f"data={src}"]
    elif folder.is_dir():
        group = ["data=imagefolder", f"data.root={hydra_quoted(str(folder.resolve()))}"]
    else:
        raise UserError(
            f"SRC {src} is neither a data config ({', '.join(names)}) nor a folder: name one "
            "of those, or the image folder to pack."
        )
    cfg = compose_data_config([*group, *overrides])
    validate(cfg)
    return cfg


def hydra_quoted(text: str) -> str:
    """`text` as a quoted value of a Hydra override, read back unchanged: its quotes and the
    backslashes before them (or at its end) escaped, and `${` kept from interpolating."""
    text = re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text)
    return '"' + text.replace("${", "\\${") + '"'


def sample_list_md5(dataset: Any) -> str:
    """The MD5 of an `ImageFiles`' (path, label) list, in order."""
    listing = "".join(f"{path}\t{label}\n" for path, label in dataset.samples)
    return hashlib.md5(listing.encode(), usedforsecurity=False).hexdigest()


def shards_written(
    out: Path, settings: dict[str, Any], files: list[str]
) -> dict[str, dict[str, Any]]:
    """Those of `files` that an earlier run with the same settings wrote whole into OUT; an
    OUT written with other settings, or holding files of others, is refused."""
    progress_path = out / PROGRESS
    if not out.exists():
        return {}
    if not progress_path.exists():
        if any(out.iterdir()):
            raise UserError(
                f"OUT {out} holds files that vit-data pack did not write: choose an empty folder."
            )
        return {}
    try:
        progress = json.loads(progress_path.read_text())
        before, shards = flat(progress["settings"]), progress["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{progress_path} is unreadable ({e}): choose an empty folder.") from e
    now = flat(settings)
    changed = [setting_name(k) for k in sorted({*before, *now}) if before.get(k) != now.get(k)]
    if changed:
        raise UserError(
            f"OUT {out} holds shards packed with other settings (they differ in "
            f"{', '.join(changed)}): choose an empty folder, or give the same settings as before."
        )
    return {
        name: shards[name]
        for name in files
        if name in shards and (out / name).is_file()
        and (out / name).stat().st_size == shards[name]["bytes"]
    }  # fmt: skip


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys: {"data": {"root": x}} -> {"data.root": x}."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {
        dotted: item
        for key, inner in value.items()
        for dotted, item in flat(inner, f"{prefix}.{key}" if prefix else key).items()
    }


def setting_name(key: str) -> str:
    """A key of the settings as the user gives it: --shard-size, data.root, ..."""
    if key == "shard_size":
        return "--shard-size"
    if key.startswith("samples."):
        return f"the {key.removeprefix('samples.')} samples"
    return key


def write_shards(packing: Packing, stop: threading.Event, advance: Callable[[], None]) -> None:
    """Write the shards not yet written, in order, until `stop` is set; `advance` is called
    once a sample."""
    for shard in packing.todo():
        info = write_shard(packing, shard, stop, advance)
        if info is None:
            return
        packing.written[shard.file] = info
        save_progress(packing)


def write_shard(
    packing: Packing, shard: Shard, stop: threading.Event, advance: Callable[[], None]
) -> dict[str, Any] | None:
    """Write one shard through a hidden temporary file in OUT, renamed when it is whole; what
    it holds, or None when `stop` was set before its last sample (nothing is left then)."""
    from vit_cli.data import UNREADABLE, ImageFiles

    wds = webdataset_module()
    dataset = packing.datasets[shard.split]
    image_files = isinstance(dataset, ImageFiles)
    tmp = packing.out / f".{shard.file}.tmp"
    samples, keys, unreadable = 0, set(), []
    complete = False
    try:
        # mtime fixed, so that the same samples make the same bytes (and MD5) on a rerun.
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as tar:
            for i in shard.indices:
                if stop.is_set():
                    break
                if image_files:
                    name, label = dataset.samples[i]
                    try:
                        key, image = file_bytes(dataset, i, packing.cfg.max_image_pixels)
                    except UNREADABLE as e:
                        key = None
                        unreadable.append([name, str(e) or type(e).__name__])
                else:
                    pixels, label = dataset[i]
                    key, image = "png", png_bytes(pixels)
                if key is not None:
                    # The key is the sample's index in its split: unique, no dots, no path.
                    sample = {
                        "__key__": f"{i:08d}",
                        key: image,
                        WebDatasetConfig.label_key: str(int(label)).encode(),
                    }
                    tar.write(sample)
                    samples += 1
                    keys.add(key)
                advance()
            else:
                complete = True
        if not complete:
            tmp.unlink()
            return None
        info = {
            "samples": samples,
            "bytes": tmp.stat().st_size,
            "md5": file_md5(tmp),
            "image_keys": sorted(keys),
            "unreadable": unreadable,
        }
        os.replace(tmp, packing.out / shard.file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def file_bytes(dataset: Any, i: int, max_pixels: int) -> tuple[str, bytes]:
    """Image file i of an `ImageFiles` (or the encoded image it fetches: a table's row), as
    its format's extension (`jpg`, `png`, ...) and its bytes, unchanged; raises one of
    UNREADABLE when PIL cannot open it as an image, or it has too many pixels."""
    from PIL import Image

    from vit_cli.data._decode import check_pixels

    file = dataset.samples[i][0] if dataset.fetch is None else dataset.fetch(i)
    # The header only: a file that PIL opens is copied as it is, and the reader decodes it.
    with Image.open(file) as image:
        check_pixels(image, max_pixels, "data.max_image_pixels")
        extension = EXTENSIONS.get(image.format, image.format.lower())
    return extension, file.getvalue() if isinstance(file, io.BytesIO) else Path(file).read_bytes()


def png_bytes(image: Any) -> bytes:
    """A (C, H, W) image tensor, uint8 or float in [0, 1] (scaled to 0..255 and rounded),
    as a PNG file: lossless, so that the shards hold the source's pixels."""
    import torch
    from PIL import Image

    if image.is_floating_point():
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = image.permute(1, 2, 0).squeeze(-1).numpy()  # (H, W, C), or (H, W) for one channel
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, value: Any) -> None:
    """Write `path` through a hidden temporary file, renamed when whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def save_progress(packing: Packing) -> None:
    progress = {"settings": packing.settings, "shards": packing.written}
    write_json(packing.out / PROGRESS, progress)


def write_manifest(packing: Packing) -> Path:
    """Write OUT/manifest.json, once every shard is written; returns its path."""
    cfg = packing.cfg
    splits = {}
    for split in packing.datasets:
        shards = []
        for shard in packing.shards:
            if shard.split == split:
                info = packing.written[shard.file]
                shards.append(
                    {"file": shard.file, **{k: info[k] for k in ("samples", "bytes", "md5")}}
                )
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    manifest = {
        "format": FORMAT,
        "source": cfg.name,
        "classes": packing.class_names,
        "img_size": cfg.img_size,
        "in_chans": cfg.in_chans,
        "mean": cfg.mean,
        "std": cfg.std,
        "label_key": WebDatasetConfig.label_key,
        "image_keys": image_keys(packing),
        "splits": splits,
    }
    path = packing.out / MANIFEST
    write_json(path, manifest)
    return path


def image_keys(packing: Packing) -> list[str]:
    """The image extensions that the shards hold."""
    return sorted({key for info in packing.written.values() for key in info["image_keys"]})


def shard_pattern(packing: Packing, split: str) -> str:
    """A split's shards in WebDataset's brace notation: OUT/train-{000000..000009}.tar."""
    count = sum(s.split == split for s in packing.shards)
    numbers = "000000" if count == 1 else f"{{000000..{count - 1:06d}}}"
    return str(packing.out / f"{split}-{numbers}.tar")


# The data settings that decide how the images are trained on, carried over from SRC to the
# command that trains on its shards where data=webdataset's defaults differ (digits and CIFAR
# shift and flip their images whole; image folders crop at random).
CARRIED = ("batch_size", "shift", "augment.")


def train_command(packing: Packing) -> str:
    """The vit-train command that trains on the shards as vit-train trains on SRC, quoted for
    a POSIX shell."""
    cfg = packing.cfg
    values = {
        "train_shards": hydra_quoted(shard_pattern(packing, "train")),
        "val_shards": hydra_quoted(shard_pattern(packing, "val")),
        "num_classes": len(packing.class_names),
        "img_size": cfg.img_size,
        "in_chans": cfg.in_chans,
        "mean": cfg.mean,
        "std": cfg.std,
    }
    keys = image_keys(packing)
    if not set(keys) <= set(WebDatasetConfig.image_key.split(";")):
        values["image_key"] = hydra_quoted(";".join(keys))
    overrides = [f"data.{k}={override_value(v)}" for k, v in values.items()]
    reader = flat(asdict(data_config("webdataset", overrides)))
    for key, value in flat(asdict(cfg)).items():
        if key.startswith(CARRIED) and key in reader and reader[key] != value:
            overrides.append(f"data.{key}={override_value(value)}")
    words = ["vit-train", "data=webdataset", *overrides]
    return " ".join(shlex.quote(word) for word in words)


def override_value(value: Any) -> Any:
    """A config value as a Hydra override writes it: lists as [a,b], None as null."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(override_value(v)) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else value


def summary(packing: Packing, kept: int) -> str:
    """The unreadable files, one a line, what each split holds, and how to train on it."""
    lines = []
    unreadable = [item for s in packing.shards for item in packing.written[s.file]["unreadable"]]
    for path, reason in unreadable:
        lines.append(f"unreadable {path}: {reason}")
    counts = []
    for split in packing.datasets:
        shards = [s.file for s in packing.shards if s.split == split]
        samples = sum(packing.written[file]["samples"] for file in shards)
        counts.append(f"{split} {samples} samples in {len(shards)} {plural('shard', len(shards))}")
    listed = " (listed above)" if unreadable else ""
    lines.append(
        f"{', '.join(counts)}; wrote {len(packing.shards) - kept}, already there {kept}, "
        f"unreadable {len(unreadable)}{listed}; wrote {packing.out / MANIFEST}"
    )
    lines.append(f"Train on them with:\n  {train_command(packing)}")
    return "\n".join(lines)


def plural(word: str, count: int) -> str:
    return word if count == 1 else f"{word}s"
