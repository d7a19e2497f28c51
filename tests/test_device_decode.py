"""data.decode=device (vit_cli/data/_device_decode.py): the workers read bytes, the training
process decodes each batch on its device. Run here on the CPU device, with torchvision's
CPU decoder: the code path nvjpeg takes on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY
from tests.test_image_files import EVAL, MAX_MAE, MAX_PIXELS, SIZE, TRAIN, mae, photo, save_jpeg
from vit_cli.augment import build_batch_augment
from vit_cli.config import AugmentConfig
from vit_cli.data import FileReader, ImageFiles, SkipCounter
from vit_cli.data._decode import ORIENTATION, UPRIGHT
from vit_cli.data._device_decode import BytesReader, DeviceDecoder, EncodedCollate, turn_upright

CPU = torch.device("cpu")


def test_turning_upright_on_the_device_is_pils_exif_transpose():
    stored = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5)  # (C, H, W)
    for orientation, method in UPRIGHT.items():
        by_pil = [np.asarray(Image.fromarray(c.numpy()).transpose(method)) for c in stored]
        assert torch.equal(turn_upright(stored, orientation), torch.from_numpy(np.stack(by_pil)))
    assert torch.equal(turn_upright(stored, 1), stored)


def decoded_batch(paths: list[Path], aug: AugmentConfig, train: bool, seed: int):
    """The batch as data.decode=device makes it, before normalisation: uint8 crops."""
    skipped = SkipCounter()
    files = ImageFiles([(str(p), 0) for p in paths], BytesReader(SIZE, 3, aug, train, MAX_PIXELS),
                       skipped)  # fmt: skip
    torch.manual_seed(seed)
    batch = EncodedCollate()([files[i] for i in range(len(paths))])
    decoder = DeviceDecoder(SIZE, 3, lambda images: images, CPU, skipped)
    return decoder(batch), skipped


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_device_decoding_cuts_the_boxes_the_workers_would(tmp_path, train):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    paths = [
        save_jpeg(photo(), tmp_path / "a.jpg"),
        save_jpeg(photo(700, 900), tmp_path / "portrait.jpg"),
        save_jpeg(photo(900, 700), tmp_path / "turned.jpg", exif=exif),
        save_jpeg(photo().convert("L"), tmp_path / "grey.jpg"),
    ]
    aug = TRAIN if train else EVAL
    for seed in range(3):
        (images, labels), _ = decoded_batch(paths, aug, train, seed)
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.uint8
        assert labels.tolist() == [0, 0, 0, 0]
        torch.manual_seed(seed)  # the workers' decode draws the same boxes, file by file
        reader = FileReader(SIZE, 3, aug, train, MAX_PIXELS, dct_scaling=False)
        for got, path in zip(images, paths, strict=True):
            assert mae(got, reader(path)) < MAX_MAE


def test_other_files_are_decoded_by_the_worker_and_bad_ones_skipped(tmp_path):
    png = tmp_path / "a.png"
    photo(400, 300).save(png)
    cmyk = save_jpeg(photo(400, 300).convert("CMYK"), tmp_path / "cmyk.jpg")
    good = save_jpeg(photo(400, 300), tmp_path / "good.jpg")
    whole = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"  # its header reads well: only decoding finds it
    truncated.write_bytes(whole[: len(whole) // 3])
    (images, labels), skipped = decoded_batch([png, truncated, cmyk, good], TRAIN, True, 0)
    assert images.shape == (3, 3, SIZE, SIZE) and len(labels) == 3
    assert skipped.take() == 1


def test_batch_augmentation_keeps_to_the_images_device():
    # Meta tensors stand in for CUDA ones: an op that mixes in a CPU tensor fails on them.
    for auto in ("none", "randaugment", "trivialaugment"):
        aug = AugmentConfig(hflip=0.5, erase_prob=0.5, auto_augment=auto)
        augment = build_batch_augment(aug, 16, [0.5] * 3, [0.2] * 3, shift=2, train=True)
        images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8, device="meta")
        out = augment(images)
        assert out.device.type == "meta" and out.shape == (4, 3, 16, 16)


def write_jpeg_folder(root: Path, per_class: int = 12) -> None:
    """Two classes told apart by their colour cast, as JPEGs with EXIF orientations."""
    rng = np.random.default_rng(0)
    base = np.asarray(photo(160, 120), dtype=np.float32)
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for label, gains in enumerate(([1.2, 0.9, 0.8], [0.8, 0.9, 1.2])):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(base * gains + rng.normal(0, 8, base.shape), 0, 255)
                exif = Image.Exif()
                exif[ORIENTATION] = int(rng.integers(1, 9))
                save_jpeg(Image.fromarray(pixels.astype(np.uint8)), folder / f"{i}.jpg", exif=exif)


@pytest.mark.slow
def test_vit_train_decodes_on_the_device_end_to_end(tmp_path, run_cli):
    write_jpeg_folder(tmp_path / "jpegs")
    common = [
        "data=imagefolder", f"data.root={tmp_path / 'jpegs'}", "data.img_size=32",
        "data.batch_size=8", "data.num_workers=1", "model.patch_size=8", *TINY,
    ]  # fmt: skip
    result = run_cli(*common, "data.decode=device", "hydra.run.dir=device")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "device" / "last.pt").exists()

    wrong = run_cli("data.decode=device", "trainer.epochs=1", "hydra.run.dir=digits")
    assert wrong.returncode == 2
    assert "data.decode=device decodes image files; data=digits" in wrong.stderr + wrong.stdout
