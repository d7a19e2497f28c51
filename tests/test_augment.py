"""Batched augmentation, Mixup/CutMix targets and label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from vit_cli.augment import (
    RANDAUGMENT_OPS,
    BatchAugment,
    BatchRandAugment,
    MixupCutmix,
    build_batch_augment,
    cutmix_box,
    image_transform,
    random_erase,
    random_hflip,
    random_shift,
    smooth_one_hot,
)
from vit_cli.config import AugmentConfig, validate
from vit_cli.errors import UserError
from vit_cli.losses import DistillationLoss, SoftTargetCrossEntropy, soft_target_cross_entropy


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(B: int = 6, C: int = 3, H: int = 8, W: int = 8) -> torch.Tensor:
    """uint8 images with no zero pixel, so that zero padding is recognisable."""
    return (torch.arange(B * C * H * W) % 250 + 1).to(torch.uint8).view(B, C, H, W)


def translate(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` moved by (dy, dx), zero filled: the reference for random_shift."""
    C, H, W = image.shape
    out = torch.zeros_like(image)
    src = image[:, max(-dy, 0) : H - max(dy, 0), max(-dx, 0) : W - max(dx, 0)]
    out[:, max(dy, 0) : H - max(-dy, 0), max(dx, 0) : W - max(-dx, 0)] = src
    return out


def test_random_shift_translates_each_image_within_the_range_and_zero_pads():
    torch.manual_seed(0)
    images = distinct_images(B=32)
    shifted = random_shift(images, 2)
    offsets = set()
    for original, moved in zip(images, shifted, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(moved, translate(original, dy, dx))
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5  # each image draws its own offset


def test_random_hflip_flips_with_its_probability():
    images = distinct_images()
    assert torch.equal(random_hflip(images, 1.0), images.flip(-1))
    assert torch.equal(random_hflip(images, 0.0), images)


def test_random_erase_replaces_one_box_per_image_within_the_area_bounds():
    torch.manual_seed(0)
    images = torch.full((64, 3, 32, 32), 100.0)
    erased = random_erase(images, 1.0)
    for image in erased:
        changed = (image != 100.0).all(dim=0)  # (H, W)
        rows, cols = changed.any(dim=1), changed.any(dim=0)
        h, w = int(rows.sum()), int(cols.sum())
        assert int(changed.sum()) == h * w  # one rectangle
        assert 0.02 * 1024 * 0.5 <= h * w <= 1024 / 3 * 1.5
    assert torch.equal(random_erase(images, 0.0), images)


def test_eval_batch_is_scaled_resized_and_normalised():
    images = distinct_images()
    out = BatchAugment(8, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])(images)
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    torch.testing.assert_close(out, expected)
    assert BatchAugment(16, [0.0] * 3, [1.0] * 3)(images).shape == (6, 3, 16, 16)


def test_train_batch_with_auto_augment_keeps_shape_and_dtype():
    torch.manual_seed(0)
    for name in ("randaugment", "trivialaugment"):
        aug = AugmentConfig(auto_augment=name, hflip=0.5, erase_prob=0.5)
        batch = build_batch_augment(aug, 8, [0.5] * 3, [0.5] * 3, shift=1, train=True)
        out = batch(distinct_images())
        assert out.shape == (6, 3, 8, 8) and out.dtype == torch.float32


def test_randaugment_ops_match_torchvision():
    """Each op at each sign and some magnitudes, against torchvision's own RandAugment op."""
    reference = v2.RandAugment()
    images = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8, generator=gen(0))
    for name, (magnitudes_fn, signed, apply) in RANDAUGMENT_OPS.items():
        magnitudes = magnitudes_fn(31, 12, 12)
        for level in (0, 9, 30):
            m = 0.0 if magnitudes is None else float(magnitudes[level])
            for magnitude in (m, -m) if signed else (m,):
                expected = reference._apply_image_or_video_transform(
                    images, name, magnitude, reference.interpolation, reference._fill
                )
                assert torch.equal(apply(images, magnitude), expected), (name, magnitude)


def candidates(image: torch.Tensor, levels: range) -> list[torch.Tensor]:
    """Every result one RandAugment op can give `image` at the given levels."""
    out = []
    for magnitudes_fn, signed, apply in RANDAUGMENT_OPS.values():
        for level in levels:
            magnitudes = magnitudes_fn(31, *image.shape[-2:])
            m = 0.0 if magnitudes is None else float(magnitudes[level])
            out += [apply(image, m)] + ([apply(image, -m)] if signed else [])
    return out


@pytest.mark.parametrize("magnitude_std", [0.0, 4.0])
def test_randaugment_draws_each_image_its_own_op(magnitude_std):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 12, 12), dtype=torch.uint8, generator=gen(1))
    out = BatchRandAugment(num_ops=1, magnitude=28, magnitude_std=magnitude_std)(
        image.expand(64, -1, -1, -1)
    )
    # Each image is one op's result at a magnitude within 0..30 (the jitter is clipped).
    levels = range(31) if magnitude_std else range(28, 29)
    options = candidates(image, levels)
    assert all(any(torch.equal(o[None], c) for c in options) for o in out)
    assert len({o.numpy().tobytes() for o in out}) >= 10  # not one draw for the batch


def test_image_transform_crops_files_to_the_model_size():
    image = Image.new("RGB", (50, 30), color=(10, 20, 30))
    train = image_transform(16, 3, AugmentConfig(crop_scale=[0.5, 1.0]), train=True)(image)
    val = image_transform(16, 1, AugmentConfig(eval_crop_ratio=0.875), train=False)(image)
    assert train.shape == (3, 16, 16) and train.dtype == torch.uint8
    assert val.shape == (1, 16, 16)


def test_out_of_range_augment_values_are_rejected_naming_the_key(compose_cfg):
    for override, key in [
        ("data.augment.hflip=1.5", "data.augment.hflip"),
        ("data.augment.auto_augment=autoaugment", "data.augment.auto_augment"),
        ("data.augment.repeats=0", "data.augment.repeats"),
        ("data.augment.crop_scale=[0.5,0.1]", "data.augment.crop_scale"),
        ("trainer.ema.decay=1.0", "trainer.ema.decay"),
    ]:
        with pytest.raises(UserError, match=key):
            validate(compose_cfg(override))


# ----------------------------------------------------------------------------- mixing


def test_mixup_mixes_images_and_targets_with_one_weight_and_targets_sum_to_one():
    torch.manual_seed(0)
    images = torch.randn(8, 3, 8, 8)
    labels = torch.arange(8) % 5
    mixer = MixupCutmix(num_classes=5, mixup_alpha=0.8)
    mixed, targets = mixer(images, labels)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    lam = float(targets[0, 0])  # image 0 (label 0) is mixed with image 7 (label 2)
    torch.testing.assert_close(mixed, images * lam + images.flip(0) * (1 - lam))
    one_hot = F.one_hot(labels, 5).float()
    torch.testing.assert_close(targets, one_hot * lam + one_hot.flip(0) * (1 - lam))


def test_cutmix_target_weight_is_the_share_of_pixels_kept():
    torch.manual_seed(1)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        mixed, targets = MixupCutmix(num_classes=4, cutmix_alpha=1.0)(images, labels)
        kept = (mixed[0] == 0).float().mean()  # image 0 is mixed with image 3
        torch.testing.assert_close(targets[0, 0], kept)
        torch.testing.assert_close(targets[0, 3], 1 - kept)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))


def test_cutmix_box_covers_about_one_minus_lambda():
    torch.manual_seed(0)
    y0, y1, x0, x1 = cutmix_box(100, 100, 0.75)
    assert (y1 - y0) * (x1 - x0) <= 2500  # clipped at the border, never larger


def test_switch_probability_picks_cutmix_or_mixup():
    torch.manual_seed(0)
    images = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    only_cutmix = MixupCutmix(4, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    mixed, _ = only_cutmix(images, labels)
    # CutMix copies pixels: every mixed pixel is one of the two originals.
    assert ((mixed == images) | (mixed == images.flip(0))).all()


def test_mix_prob_zero_leaves_images_and_gives_smoothed_one_hot_targets():
    images = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = MixupCutmix(4, mixup_alpha=1.0, prob=0.0, label_smoothing=0.2)(images, labels)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(targets, smooth_one_hot(labels, 4, 0.2))
    torch.testing.assert_close(targets[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))


def test_label_smoothing_composes_with_mixing():
    """Loss on mixed smoothed targets = the lambda-weighted smoothed losses of both labels."""
    torch.manual_seed(0)
    images = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    logits = torch.randn(6, 10)
    _, targets = MixupCutmix(10, mixup_alpha=1.0, label_smoothing=0.1)(images, labels)
    lam = float(targets[0, 0] - 0.01) / 0.9
    expected = lam * F.cross_entropy(logits, labels, label_smoothing=0.1) + (
        1 - lam
    ) * F.cross_entropy(logits, labels.flip(0), label_smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), expected)


def test_deit_loss_with_mixed_targets_uses_them_for_the_class_head_and_teacher_argmax():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    images = torch.randn(4, 3, 8, 8)
    mixed, targets = MixupCutmix(5, mixup_alpha=1.0, label_smoothing=0.1)(
        images, torch.tensor([0, 1, 2, 3])
    )
    cls_logits, dist_logits = torch.randn(4, 5), torch.randn(4, 5)
    loss_fn = DistillationLoss(SoftTargetCrossEntropy(), teacher, kind="hard", alpha=0.5)
    loss, _, parts = loss_fn(mixed, (cls_logits, dist_logits), targets)
    base = soft_target_cross_entropy(cls_logits, targets)
    distill = F.cross_entropy(dist_logits, teacher(mixed).argmax(dim=1))
    torch.testing.assert_close(parts["loss_base"], base)
    torch.testing.assert_close(parts["loss_distill"], distill)
    torch.testing.assert_close(loss, 0.5 * base + 0.5 * distill)
