"""Swin Transformer: the window math on its own, then blocks, the model and its configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vit_cli.composition import register_configs
from vit_cli.models import build_model
from vit_cli.models.swin import (
    SwinConfig,
    SwinTransformer,
    SwinTransformerBlock,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_model(name: str) -> SwinConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return OmegaConf.to_object(cfg).model


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def swin_tiny(**kwargs) -> SwinTransformer:
    return SwinTransformer(
        img_size=224,
        patch_size=4,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        **kwargs,
    )


# Window partition and reverse.


def test_window_partition_orders_windows_and_tokens_row_major() -> None:
    x = torch.arange(4 * 6).view(1, 4, 6, 1)
    windows = window_partition(x, 2)
    assert windows.shape == (6, 4, 1)
    assert windows[0, :, 0].tolist() == [0, 1, 6, 7]  # top-left window
    assert windows[1, :, 0].tolist() == [2, 3, 8, 9]  # its right neighbour
    assert windows[3, :, 0].tolist() == [12, 13, 18, 19]  # first window of the second row


def test_window_reverse_inverts_window_partition() -> None:
    x = torch.randn(2, 14, 21, 5)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 49, 5)
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


# Relative position index.


@pytest.mark.parametrize("window", [1, 2, 4, 7])
def test_relative_position_index_covers_the_bias_table(window: int) -> None:
    index = relative_position_index(window)
    N, table_size = window**2, (2 * window - 1) ** 2
    assert index.shape == (N, N) and index.dtype == torch.long
    assert index.min() == 0 and index.max() == table_size - 1
    assert index.unique().numel() == table_size  # every offset in the window is used


@pytest.mark.parametrize("window", [2, 4, 7])
def test_relative_position_index_depends_only_on_the_offset(window: int) -> None:
    index = relative_position_index(window)
    table_size = (2 * window - 1) ** 2
    # Zero offset: one constant entry, the centre of the (2M-1) x (2M-1) table.
    assert torch.all(index.diagonal() == (table_size - 1) // 2)
    # Swapping query and key mirrors the offset through the centre of the table.
    assert torch.equal(index + index.T, torch.full_like(index, table_size - 1))
    # Token (r, c) against token (0, 0): offset (r, c) is entry (r + M - 1, c + M - 1).
    tokens = torch.arange(window**2)
    rows, cols = tokens // window, tokens % window
    assert torch.equal(index[:, 0], (rows + window - 1) * (2 * window - 1) + cols + window - 1)


# Shifted-window mask.


def test_shifted_window_mask_is_zero_without_shift_or_padding() -> None:
    mask = shifted_window_mask(8, 8, 4, 0)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask == 0)


def test_shifted_window_mask_only_masks_windows_that_wrap_around() -> None:
    H = W = 28
    ws, shift = 7, 3
    mask = shifted_window_mask(H, W, ws, shift)
    assert mask.shape == ((H // ws) * (W // ws), ws * ws, ws * ws)
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert torch.equal(mask, mask.transpose(1, 2))
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)  # a token always sees itself
    masked_windows = (mask == float("-inf")).flatten(1).any(1).view(H // ws, W // ws)
    expected = torch.zeros(H // ws, W // ws, dtype=torch.bool)
    expected[-1, :] = expected[:, -1] = True  # the last row and column of windows wrap
    assert torch.equal(masked_windows, expected)


def test_shifted_window_mask_matches_unshifted_neighbourhoods() -> None:
    """Two tokens of a shifted window may attend iff they were neighbours before the roll."""
    H, W, ws, shift = 12, 16, 4, 2
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([rows, cols], dim=-1).unsqueeze(0)  # (1, H, W, 2)
    coords = torch.roll(coords, shifts=(-shift, -shift), dims=(1, 2))
    coords = window_partition(coords, ws)  # (nW, N, 2), original coordinates
    distance = (coords[:, :, None] - coords[:, None, :]).abs()  # (nW, N, N, 2)
    neighbours = (distance < ws).all(-1)
    mask = shifted_window_mask(H, W, ws, shift)
    assert torch.equal(mask == 0, neighbours)


def test_shifted_window_mask_separates_padding_from_real_tokens() -> None:
    H = W = 8
    ws = 3  # padded to 9x9
    mask = shifted_window_mask(H, W, ws, 0)
    padded = torch.zeros(1, 9, 9, 1, dtype=torch.bool)
    padded[:, H:] = padded[:, :, W:] = True
    padded = window_partition(padded, ws).squeeze(-1)  # (nW, N)
    real_pairs = ~padded[:, :, None] & ~padded[:, None, :]
    assert mask.shape == (9, 9, 9)
    assert torch.all(mask[real_pairs] == 0)
    real_to_pad = ~padded[:, :, None] & padded[:, None, :]
    assert real_to_pad.any()
    assert torch.all(mask[real_to_pad] == float("-inf"))


def test_shifted_window_mask_blocks_cross_region_attention(monkeypatch) -> None:
    """The softmax that attention computes gives exactly zero weight across regions."""
    import vit_cli.models.swin as swin

    torch.manual_seed(0)
    H = W = 8
    ws, shift = 4, 2
    block = SwinTransformerBlock(16, (H, W), num_heads=2, window_size=ws, shift_size=shift)
    block.eval()
    calls = []
    attend = swin.attend

    def spy(q, k, v, attn_mask, dropout_p, keep_weights):
        out, weights = attend(q, k, v, attn_mask, dropout_p, keep_weights)
        calls.append((q, k, v, attn_mask, out))
        return out, weights

    monkeypatch.setattr(swin, "attend", spy)
    with torch.no_grad():
        block(torch.randn(2, H * W, 16))
    ((q, k, v, attn_mask, out),) = calls
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + attn_mask, dim=-1)
    torch.testing.assert_close(weights @ v, out)  # these are the weights attention used
    nW = (H // ws) * (W // ws)
    weights = weights.view(2, nW, 2, ws * ws, ws * ws)  # windows and heads share an axis

    # Ground truth from coordinates: neighbours in the unshifted map share a region.
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.roll(torch.stack([rows, cols], -1)[None], (-shift, -shift), (1, 2))
    coords = window_partition(coords, ws)  # (nW, N, 2)
    same_region = ((coords[:, :, None] - coords[:, None, :]).abs() < ws).all(-1)  # (nW, N, N)
    same_region = same_region[None, :, None].expand_as(weights)  # (B, nW, nh, N, N)
    assert (~same_region).any()
    assert torch.all(weights[~same_region] == 0)
    assert torch.all(weights[same_region] > 0)


def test_shifted_block_does_not_mix_opposite_edges() -> None:
    """A token at one corner cannot reach the far corner through the wrap-around."""
    torch.manual_seed(0)
    H = W = 8
    block = SwinTransformerBlock(16, (H, W), num_heads=2, window_size=4, shift_size=2).eval()
    x = torch.randn(1, H, W, 16)
    x2 = x.clone()
    x2[0, 0, 0] += 1.0  # rolled by -2, the top-left corner shares a window with the far edges
    with torch.no_grad():
        y = block(x.view(1, H * W, 16)).view(H, W, 16)
        y2 = block(x2.view(1, H * W, 16)).view(H, W, 16)
    changed = (y != y2).any(-1)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:2, :2] = True  # its region: the 2x2 corner that wraps around together
    assert torch.equal(changed, expected)


# Blocks and stages.


def test_shift_changes_the_block_output() -> None:
    torch.manual_seed(0)
    plain = SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=0).eval()
    shifted = SwinTransformerBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2).eval()
    shifted.load_state_dict(plain.state_dict())  # same weights; only the shift differs
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        assert not torch.allclose(plain(x), shifted(x), atol=1e-4)


def test_window_shrinks_to_the_map_and_stops_shifting() -> None:
    model = SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2)
    )
    first, second = model.layers[0].blocks, model.layers[1].blocks
    assert [(b.window_size, b.shift_size) for b in first] == [(7, 0), (7, 3)]  # 8x8 map
    assert [(b.window_size, b.shift_size) for b in second] == [(4, 0), (4, 0)]  # 4x4 map
    assert second[1].attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2, 2)
    assert second[1].attn_mask is None  # one unshifted window: nothing to mask


def test_swin_tiny_token_maps_per_stage() -> None:
    model = swin_tiny().eval()
    shapes = []
    for stage in model.layers:
        stage.blocks[-1].register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert shapes == [(1, 56 * 56, 96), (1, 28 * 28, 192), (1, 14 * 14, 384), (1, 7 * 7, 768)]
    assert [stage.blocks[0].input_resolution for stage in model.layers] == [
        (56, 56),
        (28, 28),
        (14, 14),
        (7, 7),
    ]
    assert [(b.window_size, b.shift_size) for b in model.layers[3].blocks] == [(7, 0), (7, 0)]


@pytest.mark.parametrize(
    ("img_size", "patch_size", "window_size", "resolutions"),
    [(8, 1, 3, [(8, 8), (4, 4), (2, 2)]), (36, 4, 7, [(9, 9), (5, 5), (3, 3)])],
)
def test_maps_not_divisible_by_the_window_are_padded(
    img_size: int, patch_size: int, window_size: int, resolutions: list[tuple[int, int]]
) -> None:
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=1,
        num_classes=10,
        embed_dim=16,
        depths=(2, 2, 2),
        num_heads=(1, 2, 4),
        window_size=window_size,
    )
    assert [stage.blocks[0].input_resolution for stage in model.layers] == resolutions
    first = model.layers[0].blocks[1]
    expected = math.ceil(resolutions[0][0] / first.window_size) * first.window_size
    assert first.padded_resolution == (expected, expected)
    x = torch.randn(3, 1, img_size, img_size)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stochastic_depth_rises_linearly_over_all_blocks() -> None:
    model = SwinTransformer(
        img_size=16,
        patch_size=2,
        embed_dim=8,
        depths=(1, 2, 2),
        num_heads=(1, 1, 1),
        window_size=2,
        drop_path_rate=0.4,
    )
    rates = [block.drop_path.drop_prob for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


# The model.


def test_swin_tiny_has_the_published_parameter_count() -> None:
    with torch.device("meta"):  # counts need no memory and no initialisation
        model = swin_tiny(num_classes=1000)
    assert num_params(model) == 28_288_354  # 28.3M (Table 1: 28M)


@pytest.mark.parametrize(
    ("config", "expected"), [("swin_small", 49_606_258), ("swin_base", 87_768_224)]
)
def test_swin_small_and_base_have_the_published_parameter_counts(
    config: str, expected: int
) -> None:
    cfg = compose_model(config)
    with torch.device("meta"):
        model = build_model(cfg, img_size=224, in_chans=3, num_classes=1000)
    assert num_params(model) == expected  # 49.6M and 87.8M (Table 1: 50M, 88M)


def test_parameter_names_follow_the_official_layout() -> None:
    model = SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), ape=True
    )
    names = set(model.state_dict())
    for name in [
        "absolute_pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "layers.0.blocks.1.norm1.weight",
        "layers.0.blocks.1.attn.qkv.weight",
        "layers.0.blocks.1.attn.proj.weight",
        "layers.0.blocks.1.attn.relative_position_bias_table",
        "layers.0.blocks.1.norm2.weight",
        "layers.0.blocks.1.mlp.fc1.weight",
        "layers.0.blocks.1.mlp.fc2.weight",
        "layers.0.downsample.reduction.weight",
        "layers.0.downsample.norm.weight",
        "norm.weight",
        "head.weight",
    ]:
        assert name in names, name
    assert "layers.0.downsample.reduction.bias" not in names
    assert not any(n.startswith("layers.1.downsample") for n in names)  # last stage
    # Derived buffers exist, but stay out of checkpoints.
    buffers = dict(model.named_buffers())
    assert "layers.0.blocks.1.attn.relative_position_index" in buffers
    assert "layers.0.blocks.1.attn_mask" in buffers
    assert not any(n.endswith(("relative_position_index", "attn_mask")) for n in names)


def test_no_weight_decay_names_real_parameters() -> None:
    model = SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), ape=True
    )
    last_segments = {name.split(".")[-1] for name, _ in model.named_parameters()}
    assert model.no_weight_decay() == {"absolute_pos_embed", "relative_position_bias_table"}
    assert model.no_weight_decay() <= last_segments


def test_forward_splits_into_pooled_features_and_head() -> None:
    torch.manual_seed(0)
    model = SwinTransformer(
        img_size=16,
        patch_size=2,
        in_chans=1,
        num_classes=5,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(1, 2),
        window_size=4,
    ).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (4, 16)
        torch.testing.assert_close(model.forward_head(features), model(x))


def test_patch_merging_concatenates_2x2_neighbours_in_official_order() -> None:
    model = SwinTransformer(img_size=8, patch_size=2, embed_dim=2, depths=(1, 1), num_heads=(1, 1))
    merging = model.layers[0].downsample
    torch.nn.init.ones_(merging.norm.weight)
    torch.nn.init.zeros_(merging.norm.bias)
    x = torch.randn(1, 4, 4, 2)
    with torch.no_grad():
        merging.reduction.weight.copy_(torch.eye(8)[:4])  # keep the first 4 channels
        out = merging(x.view(1, 16, 2))
    # Row and column offsets (0, 0), (1, 0), (0, 1), (1, 1) of the top-left 2x2 group.
    top_left = torch.cat([x[0, 0, 0], x[0, 1, 0], x[0, 0, 1], x[0, 1, 1]])
    expected = F.layer_norm(top_left, (8,))[:4]
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"img_size": 30, "patch_size": 4}, "img_size 30 is not divisible by patch_size 4"),
        ({"depths": (2, 2), "num_heads": (3,)}, "same length"),
        ({"embed_dim": 96, "num_heads": (3, 5, 12, 24)}, "num_heads[1] = 5"),
    ],
)
def test_invalid_sizes_raise_value_errors_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SwinTransformer(**kwargs)


# Configs.


def test_default_swin_config_composes_and_builds_for_digits() -> None:
    cfg = compose_model("swin")
    assert isinstance(cfg, SwinConfig)
    assert cfg.img_size is None  # the data's native 8x8
    model = build_model(cfg, img_size=8, in_chans=1, num_classes=10)
    assert isinstance(model, SwinTransformer)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("config", "values"),
    [
        ("swin_tiny", (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, 224, 4, 0.2)),
        ("swin_small", (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, 224, 4, 0.3)),
        ("swin_base", (128, [2, 2, 18, 2], [4, 8, 16, 32], 7, 224, 4, 0.5)),
        ("swin_cifar", (96, [2, 6, 4], [3, 6, 12], 4, 32, 2, 0.1)),
    ],
)
def test_shipped_swin_configs_hold_their_values(config: str, values: tuple) -> None:
    cfg = compose_model(config)
    assert (
        cfg.embed_dim,
        cfg.depths,
        cfg.num_heads,
        cfg.window_size,
        cfg.img_size,
        cfg.patch_size,
        cfg.drop_path_rate,
    ) == values


def test_cifar_config_builds_for_32x32_images() -> None:
    cfg = compose_model("swin_cifar")
    model = build_model(cfg, img_size=cfg.img_size, in_chans=3, num_classes=10)
    assert [stage.blocks[0].input_resolution for stage in model.layers] == [
        (16, 16),
        (8, 8),
        (4, 4),
    ]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# The attention mask (relative position bias + window mask) kept between eval passes.


def small_swin(seed: int = 0) -> SwinTransformer:
    torch.manual_seed(seed)
    # 32 px, patch 2, window 4: a shifted, masked block and an unmasked one in stage 1.
    return SwinTransformer(
        img_size=32, patch_size=2, num_classes=5, embed_dim=16, depths=(2, 2),
        num_heads=(2, 4), window_size=4, drop_path_rate=0.0,
    ).eval()  # fmt: skip


def computed_afresh(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():  # with gradients on, nothing is kept
        return model(x).detach()


def test_the_kept_mask_follows_the_table_through_steps_loads_averages_and_copies() -> None:
    import copy

    from vit_cli.ema import ModelEma

    model, x = small_swin(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
    assert torch.equal(first, computed_afresh(model, x))
    # Kept: a second pass reuses it (the same tensor object).
    masks = [block.attn._cached_mask for block in model.layers[0].blocks]
    with torch.no_grad():
        model(x)
    assert all(
        m is block.attn._cached_mask for m, block in zip(masks, model.layers[0].blocks, strict=True)
    )

    # An optimizer step (fused AdamW updates the table in place).
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.inference_mode():
        stepped = model(x)
    assert not torch.allclose(stepped, first)
    assert torch.equal(stepped, computed_afresh(model, x))

    # load_state_dict of other weights.
    model.load_state_dict(small_swin(seed=1).state_dict())
    with torch.no_grad():
        loaded = model(x)
    assert torch.equal(loaded, computed_afresh(small_swin(seed=1), x))

    # The weight average: updated in place by lerp_.
    ema = ModelEma(model, decay=0.5, warmup=False)
    with torch.no_grad():
        before = ema.module(x)
    model.load_state_dict(small_swin(seed=2).state_dict())
    ema.update(model)
    with torch.no_grad():
        averaged = ema.module(x)
    assert not torch.allclose(averaged, before)
    assert torch.equal(averaged, computed_afresh(ema.module, x))

    # A copy made after a pass computes its own.
    copied = copy.deepcopy(model)
    copied.load_state_dict(small_swin(seed=3).state_dict())
    with torch.no_grad():
        assert torch.equal(copied(x), computed_afresh(small_swin(seed=3), x))


@pytest.mark.slow
def test_a_compiled_swin_sees_every_change_of_the_table() -> None:
    model, x = small_swin(), torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), computed_afresh(model, x), rtol=1e-5, atol=1e-5)
        model.train()
        model(x).sum().backward()
        optimizer.step()
        model.eval()
