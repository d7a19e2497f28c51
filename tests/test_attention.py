"""Attention maps: the explicit-softmax path against SDPA, rollout against its definition,
and Grad-CAM for Swin."""

from __future__ import annotations

import pytest
import torch

import vit_cli
from vit_cli.attention import attention_rollout, recording_attention
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.models.layers import attend
from vit_cli.models.swin import SwinTransformer, WindowAttention
from vit_cli.models.vit import VisionTransformer

SMALL_VIT = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                 num_heads=4)  # fmt: skip


def small_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "vit": VisionTransformer(**SMALL_VIT),
        "deit": DistilledVisionTransformer(**SMALL_VIT),
        # 8x8 then 4x4 maps with 4x4 windows: shifted windows and their masks in stage 1;
        # a 12 px image gives 6x6 maps, padded to 8x8 (padding masks too).
        "swin": SwinTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=10,
                                embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4),
        "swin_padded": SwinTransformer(img_size=12, patch_size=2, in_chans=1, num_classes=10,
                                       embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                                       window_size=4),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["vit", "deit", "swin", "swin_padded"])
def test_explicit_softmax_attention_equals_sdpa(name):
    model = small_models()[name].eval()
    size = model.patch_embed.img_size
    x = torch.randn(5, 1, size, size)
    with torch.no_grad():
        fused = model(x)
        with recording_attention(model) as layers:
            explicit = model(x)
            weights = [layer.weights for layer in layers]
    assert (explicit - fused).abs().max() <= 1e-6
    assert len(weights) == (3 if name in ("vit", "deit") else 4)
    for w in weights:
        torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)
    # Recording is off again: the fused path keeps no weights.
    assert all(not layer.keep_weights and layer.weights is None for layer in layers)


def test_attend_matches_the_definition_with_a_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.zeros(5, 5).masked_fill_(torch.rand(5, 5) > 0.6, float("-inf"))
    mask.fill_diagonal_(0.0)  # every query sees at least itself
    out, weights = attend(q, k, v, mask, 0.0, keep_weights=True)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + mask, dim=-1)
    torch.testing.assert_close(weights, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, by_hand @ v, atol=1e-6, rtol=0)
    fused, none = attend(q, k, v, mask, 0.0, keep_weights=False)
    assert none is None and (fused - out).abs().max() <= 1e-6


def test_shifted_window_weights_are_zero_across_regions():
    model = small_models()["swin"].eval()
    shifted = model.layers[0].blocks[1]
    assert shifted.shift_size > 0 and shifted.attn_mask is not None
    with torch.no_grad(), recording_attention(model):
        model(torch.randn(2, 1, 16, 16))
        weights = shifted.attn.weights  # (B, nW, heads, N, N)
    blocked = torch.isinf(shifted.attn_mask)[None, :, None]  # (1, nW, 1, N, N)
    assert blocked.any()
    assert (weights.masked_select(blocked.expand_as(weights)) == 0).all()


def test_window_attention_shares_the_mask_over_the_batch():
    torch.manual_seed(0)
    attn = WindowAttention(16, window_size=2, num_heads=2).eval()
    x = torch.randn(3, 4, 4, 16)  # (B, windows, N, C)
    mask = torch.zeros(4, 4, 4)
    mask[1, 0, 1] = float("-inf")
    with torch.no_grad():
        together = attn(x, mask)
        alone = torch.cat([attn(x[i : i + 1], mask) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_rollout_rows_sum_to_one_and_follow_the_definition():
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(2, 3, 6, 6), dim=-1) for _ in range(4)]
    rollout = attention_rollout(layers)
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(2, 6), atol=1e-6, rtol=0)
    # Abnar & Zuidema: A~ = 0.5 * mean_heads(A) + 0.5 * I, rolled out from the first layer on.
    expected = torch.eye(6).expand(2, 6, 6)
    for attn in layers:
        flow = 0.5 * attn.mean(dim=1) + 0.5 * torch.eye(6)
        expected = flow @ expected
    torch.testing.assert_close(rollout, expected, atol=1e-6, rtol=0)
    # A single layer that attends only to token 0 sends half of every token's flow there.
    only_first = torch.zeros(1, 1, 3, 3)
    only_first[..., 0] = 1.0
    assert attention_rollout([only_first])[0, 2].tolist() == pytest.approx([0.5, 0.0, 0.5])


@pytest.mark.parametrize("name", ["vit", "deit", "swin"])
def test_attention_maps_shapes_ranges_and_mode(name):
    model = small_models()[name].train()
    x = torch.randn(3, 1, 16, 16)
    maps = vit_cli.attention_maps(model, x)
    assert model.training  # restored
    assert maps.maps.shape == (3, 16, 16)
    assert maps.maps.min() >= 0 and maps.maps.max() <= 1
    assert maps.predicted.shape == (3,)
    with torch.no_grad():
        assert maps.predicted.tolist() == model.eval()(x).argmax(dim=1).tolist()
    if name == "swin":
        assert maps.method == "grad-cam" and maps.heads is None
    else:
        assert maps.method == "rollout" and maps.heads.shape == (3, 4, 16, 16)


def test_vit_rollout_map_is_the_class_token_row():
    model = small_models()["vit"].eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), recording_attention(model) as layers:
        model(x)
        rollout = attention_rollout([layer.weights for layer in layers])
    row = rollout[:, 0, 1:].reshape(2, 4, 4)  # class token -> 4x4 patches
    maps = vit_cli.attention_maps(model, x).maps
    # The map is that row, upsampled and scaled: the brightest patch stays the brightest.
    for i in range(2):
        r, c = divmod(int(row[i].argmax()), 4)
        assert maps[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].max() == pytest.approx(1.0, abs=0.05)


def test_grad_cam_works_on_frozen_swin():
    model = small_models()["swin"]
    for p in model.parameters():
        p.requires_grad_(False)
    maps = vit_cli.attention_maps(model, torch.randn(2, 1, 16, 16))
    assert maps.method == "grad-cam" and torch.isfinite(maps.maps).all()
