"""data=webdataset: WebDataset tar shards (`vit-data pack` writes them, and so do
webdataset's ShardWriter, OpenCLIP's and timm's tools), streamed by every process.

Each sample is the tar members that share a base name: an image (data.image_key, e.g.
`000123.jpg`) and a class number as text (data.label_key, `000123.cls`). Images are decoded
as image folders' files are (`FileReader`: DCT-scaled JPEGs, EXIF orientation, the pixel
limit). `_shards.ShardStream` shares the shards out between processes and loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from vit_cli.config import Check, DataConfig, at_least
from vit_cli.data import DataSource
from vit_cli.errors import UserError

if TYPE_CHECKING:
    from vit_cli.data._shared import Splits


@dataclass
class WebDatasetConfig(DataConfig):
    name: str = "webdataset"
    # WebDataset's notation: 'shards/train-{000000..000099}.tar', several joined by '::';
    # local paths or any URL webdataset's gopen opens (pipe:, http://, s3 via pipe:...).
    train_shards: Optional[str] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    val_shards: Optional[str] = None  # noqa: UP045
    # The member extensions that hold the image, the first one a sample has is taken.
    image_key: str = "jpg;jpeg;png;webp"
    label_key: str = "cls"
    num_classes: Optional[int] = None  # noqa: UP045 (null: the manifest's classes)
    # Samples each loader worker shuffles among (raw bytes held: about this many files).
    shuffle_buffer: int = 1000
    # A folder: each process appends the keys of the samples it trains on to
    # keys-rank<R>.txt there (null: off).
    key_log: Optional[str] = None  # noqa: UP045

    def checks(self) -> list[Check]:
        return [*super().checks(), at_least("data.shuffle_buffer", self.shuffle_buffer, 1)]


_NEEDS_SHARDS = (
    "Set data.train_shards and data.val_shards to the shards' paths in brace notation, e.g. "
    "data.train_shards='shards/train-{000000..000009}.tar' (vit-data pack writes such shards)."
)


def _class_names(cfg: WebDatasetConfig, manifest: dict[str, Any] | None) -> list[str]:
    """The manifest's classes, or class numbers as names; data.num_classes must agree."""
    listed = (manifest or {}).get("classes")
    if listed is not None and not (isinstance(listed, list) and listed):
        raise UserError(
            f"The shards' manifest.json lists its classes as {str(listed)[:80]}, not as a "
            "list of names. Write it again with vit-data pack."
        )
    if listed is not None:
        if cfg.num_classes not in (None, len(listed)):
            raise UserError(
                f"data.num_classes={cfg.num_classes} but the shards' manifest lists "
                f"{len(listed)} classes. Set data.num_classes={len(listed)} or leave it out."
            )
        return [str(name) for name in listed]
    if cfg.num_classes is None:
        raise UserError(
            "data=webdataset needs data.num_classes: the shards have no manifest.json "
            "listing their classes (vit-data pack writes one)."
        )
    return [str(k) for k in range(cfg.num_classes)]


def build(cfg: WebDatasetConfig, img_size: int) -> Splits:
    """The train and val shards as streams of (image, label, key) samples."""
    from vit_cli.data._image_files import FileReader, SkipCounter
    from vit_cli.data._shards import SampleReader, ShardStream, shard_list
    from vit_cli.data._shared import Splits

    if cfg.train_shards is None or cfg.val_shards is None:
        raise UserError(f"data=webdataset reads shards. {_NEEDS_SHARDS}")
    train_shards, manifest = shard_list(cfg.train_shards, "data.train_shards")
    val_shards, _ = shard_list(cfg.val_shards, "data.val_shards")
    class_names = _class_names(cfg, manifest)
    image_keys = [key.strip().lower() for key in cfg.image_key.split(";") if key.strip()]
    skipped = SkipCounter()
    key_log = None if cfg.key_log is None else Path(cfg.key_log).expanduser().resolve()

    def stream(shards: list, train: bool) -> ShardStream:
        reader = FileReader(
            img_size, cfg.in_chans, cfg.augment, train, cfg.max_image_pixels, cfg.dct_scaling
        )
        samples = SampleReader(reader, image_keys, cfg.label_key, len(class_names))
        log = key_log if train else None
        return ShardStream(shards, samples, skipped, train, cfg.shuffle_buffer, log)

    return Splits(stream(train_shards, True), stream(val_shards, False), class_names, skipped)


SOURCE = DataSource(schema=WebDatasetConfig, build=build)
