import math

import pytest
import torch
import torch.nn.functional as F

from vit_cli.models.layers import Attention, DropPath, stochastic_depth_rates
from vit_cli.models.vit import VisionTransformer


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vit_base_16_224_has_86_6m_parameters():
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    assert count(model) == 86_567_656
    assert round(count(model) / 1e6, 1) == 86.6


@pytest.mark.parametrize(
    ("embed_dim", "heads", "params"),
    [(192, 3, 5_717_416), (384, 6, 22_050_664)],  # DeiT Table 1: 5.7M / 22M
)
def test_vit_tiny_and_small_match_published_sizes(embed_dim, heads, params):
    model = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=heads
    )
    assert count(model) == params


def test_forward_shapes_and_token_count():
    model = VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=7, embed_dim=48, depth=2, num_heads=3
    )
    x = torch.randn(5, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (5, 1 + 64, 48)
    assert model(x).shape == (5, 7)
    assert model.pos_embed.shape == (1, 65, 48)


def test_invalid_sizes_raise_value_error_naming_the_values():
    with pytest.raises(ValueError, match="image size 30 is not divisible by patch size 16"):
        VisionTransformer(img_size=30, patch_size=16)
    with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
        VisionTransformer(img_size=32, patch_size=16, embed_dim=100, num_heads=3)


def test_wrong_input_size_is_reported():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="input is 16x16 but the model was built for 32x32"):
        model(torch.randn(1, 3, 16, 16))


def test_initialisation_truncated_normal_std_002():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=2, num_heads=6)
    for tensor in (model.blocks[0].mlp.fc1.weight, model.pos_embed, model.head.weight):
        assert abs(tensor.std().item() - 0.02) < 0.001
        assert abs(tensor.mean().item()) < 0.001
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert model.blocks[0].attn.qkv.bias is not None  # qkv_bias=True
    assert model.norm.eps == 1e-6


def test_attention_equals_softmax_definition():
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=4).eval()
    x = torch.randn(2, 5, 16)
    B, N, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, 4, 4).permute(2, 0, 3, 1, 4)
    weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_stochastic_depth_rate_increases_linearly_over_depth():
    assert stochastic_depth_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.2
    )
    assert [b.drop_path.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    torch.manual_seed(0)
    layer = DropPath(0.5).train()
    out = layer(torch.ones(4000, 3, 2))
    per_sample = out.flatten(1)
    # Every sample is either dropped entirely or scaled by 1/keep_prob.
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(dim=1).values == per_sample.max(dim=1).values)
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(layer.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_no_weight_decay_lists_embeddings_and_tokens():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    names = {name for name, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
