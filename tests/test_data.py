import pytest
import torch
from PIL import Image

from vit_cli.config import DataConfig
from vit_cli.data import build_data
from vit_cli.errors import UserError


def digits(**kw) -> DataConfig:
    return DataConfig(name="digits", **kw)


def test_digits_split_is_fixed_stratified_80_20():
    a = build_data(digits(), 8, torch.Generator())
    b = build_data(digits(), 8, torch.Generator())
    train, val = a.train_loader.dataset, a.val_loader.dataset
    assert (len(train), len(val)) == (1437, 360)
    assert torch.equal(val.tensors[1], b.val_loader.dataset.tensors[1])
    assert torch.equal(val.tensors[0], b.val_loader.dataset.tensors[0])
    # Stratified: every class holds ~20% of its images in val.
    counts = torch.bincount(val.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert a.class_names == [str(d) for d in range(10)]
    images, labels = next(iter(a.train_loader))
    assert images.shape == (64, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (64,)


def test_digits_resize_to_the_model_resolution():
    data = build_data(digits(), 32, torch.Generator())
    images, _ = next(iter(data.val_loader))
    assert images.shape[1:] == (1, 32, 32)
    assert data.img_size == 32


def test_random_shift_moves_pixels_without_changing_shape():
    torch.manual_seed(0)
    data = build_data(digits(shift=1), 8, torch.Generator())
    train = data.train_loader.dataset
    originals = train.images[:50]
    shifted = torch.stack([train[i][0] for i in range(50)])
    assert shifted.shape == originals.shape
    assert not torch.equal(shifted, originals)
    train.shift = 0
    assert torch.equal(train[0][0], train.images[0])


def test_fixed_generator_seed_fixes_the_batch_order():
    gen = torch.Generator()
    data = build_data(digits(), 8, gen)
    gen.manual_seed(5)
    first = next(iter(data.train_loader))[1]
    gen.manual_seed(5)
    assert torch.equal(next(iter(data.train_loader))[1], first)


def test_fake_data_has_the_requested_shape_and_classes():
    cfg = DataConfig(
        name="fake",
        in_chans=3,
        num_classes=4,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        batch_size=8,
        train_size=16,
        val_size=8,
    )
    data = build_data(cfg, 24, torch.Generator())
    images, labels = next(iter(data.train_loader))
    assert images.shape == (8, 3, 24, 24)
    assert labels.max() < 4
    assert len(data.val_loader.dataset) == 8


def write_pngs(root, split, classes, n=3, size=20):
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size + i), color=(i * 40, 100, 200)).save(
                root / split / c / f"{i}.png"
            )


def test_imagefolder_loads_train_and_val_folders(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "dog"], n=2)
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path),
        in_chans=3,
        num_classes=2,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        batch_size=2,
    )
    data = build_data(cfg, 16, torch.Generator())
    assert data.class_names == ["cat", "dog"]
    images, _ = next(iter(data.val_loader))
    assert images.shape == (2, 3, 16, 16)


def test_missing_root_says_what_to_do(tmp_path):
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path / "nowhere"),
        in_chans=3,
        num_classes=2,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    with pytest.raises(UserError, match="does not exist.*train/ and val/"):
        build_data(cfg, 16, torch.Generator())


def test_val_classes_must_match_train(tmp_path):
    write_pngs(tmp_path, "train", ["cat", "dog"])
    write_pngs(tmp_path, "val", ["cat", "eel"])
    cfg = DataConfig(
        name="imagefolder",
        root=str(tmp_path),
        in_chans=3,
        num_classes=2,
        mean=[0.5] * 3,
        std=[0.5] * 3,
    )
    with pytest.raises(UserError, match="val classes"):
        build_data(cfg, 16, torch.Generator())


def test_num_classes_must_match_the_dataset():
    with pytest.raises(UserError, match="data.num_classes=3 but data=digits has 10"):
        build_data(digits(num_classes=3), 8, torch.Generator())
