"""Pretrained weights from timm, torchvision, the official DeiT/Swin layouts and our own runs.

Source models are real timm and torchvision models, randomly initialised with a seed; every
parameter then gets seeded noise, so that a LayerNorm weight or bias mapped to the wrong
place would change the logits. Each heavy model is built once per module.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import nn

from tests.conftest import TINY as CLI_TINY
from vit_cli.checkpoint import FORMAT_VERSION, save_checkpoint
from vit_cli.ema import ModelEma
from vit_cli.errors import UserError
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.models.swin import SwinTransformer
from vit_cli.models.vit import VisionTransformer
from vit_cli.pretrained import LoadReport, load_pretrained, read_state_dict

TINY = dict(embed_dim=192, depth=12, num_heads=3)  # ViT-Ti/16 and DeiT-Ti (DeiT Table 1)
SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))  # Swin Sec. 3.3
ATOL = 1e-5


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """`model` in eval mode with N(0, 0.02) noise added to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def images(size: int = 224, channels: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(7))


@dataclass
class Source:
    model: nn.Module
    logits: torch.Tensor  # on images()

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Contiguous clones: safetensors refuses views and tensors that share memory.
        return {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}


def source(model: nn.Module, seed: int) -> Source:
    model = perturbed(model, seed)
    with torch.no_grad():
        return Source(model, model(images()))


@pytest.fixture(scope="module")
def timm_vit_tiny() -> Source:
    torch.manual_seed(0)
    return source(timm.create_model("vit_tiny_patch16_224"), seed=1)


@pytest.fixture(scope="module")
def timm_deit_tiny_distilled() -> Source:
    torch.manual_seed(0)
    return source(timm.create_model("deit_tiny_distilled_patch16_224"), seed=2)


@pytest.fixture(scope="module")
def timm_swin_tiny() -> Source:
    torch.manual_seed(0)
    return source(timm.create_model("swin_tiny_patch4_window7_224"), seed=3)


@pytest.fixture(scope="module")
def torchvision_vit_b_16() -> Source:
    torch.manual_seed(0)
    return source(torchvision.models.vit_b_16(weights=None), seed=4)


@pytest.fixture(scope="module")
def torchvision_swin_t() -> Source:
    torch.manual_seed(0)
    return source(torchvision.models.swin_t(weights=None), seed=5)


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def accounted(report: LoadReport) -> list[str]:
    """Every model parameter the report names: loaded, adapted or reset."""
    names = list(report.loaded)
    for entry in report.resampled + report.reset:
        names += entry.rsplit(": ", 1)[0].split(", ")
    return sorted(names)


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images() if x is None else x)


SOURCES = {
    # fixture: (layout in the report, our model with the same hyperparameters)
    "timm_vit_tiny": ("timm", lambda: VisionTransformer(**TINY)),
    "timm_deit_tiny_distilled": ("timm", lambda: DistilledVisionTransformer(**TINY)),
    "timm_swin_tiny": ("timm", lambda: SwinTransformer(**SWIN_T)),
    "torchvision_vit_b_16": ("torchvision", lambda: VisionTransformer()),  # ViT-B/16
    "torchvision_swin_t": ("torchvision", lambda: SwinTransformer(**SWIN_T)),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_weights_give_the_source_models_logits(name, suffix, request, tmp_path):
    src = request.getfixturevalue(name)
    layout, build = SOURCES[name]
    model = build()
    report = load_pretrained(model, save(src.state_dict(), tmp_path / f"weights{suffix}"))
    assert report.layout == layout
    assert report.resampled == [] and report.reset == []
    assert accounted(report) == sorted(model.state_dict())
    torch.testing.assert_close(logits(model), src.logits, atol=ATOL, rtol=0)


def test_torchvision_swin_index_buffers_are_ignored_as_rebuilt(torchvision_swin_t, tmp_path):
    path = save(torchvision_swin_t.state_dict(), tmp_path / "swin_t.pth")
    report = load_pretrained(SwinTransformer(**SWIN_T), path)
    (entry,) = report.ignored
    keys, why = entry.rsplit(": ", 1)
    assert why == "buffer the model rebuilds from its config"
    assert len(keys.split(", ")) == sum(SWIN_T["depths"])
    assert "features.1.0.attn.relative_position_index" in keys


def test_distilled_deit_heads_each_match_timm(timm_deit_tiny_distilled, tmp_path):
    src = timm_deit_tiny_distilled.model
    model = DistilledVisionTransformer(**TINY)
    load_pretrained(model, save(timm_deit_tiny_distilled.state_dict(), tmp_path / "deit.pth"))
    with torch.no_grad():
        features = src.forward_features(images())  # (B, 2 + N, D)
        cls_logits, dist_logits = model.eval().forward_heads(images())
    torch.testing.assert_close(cls_logits, src.head(features[:, 0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(dist_logits, src.head_dist(features[:, 1]), atol=ATOL, rtol=0)
    # timm predicts with the mean of the two heads in eval mode, as our forward does.
    torch.testing.assert_close(
        (cls_logits + dist_logits) / 2, timm_deit_tiny_distilled.logits, atol=ATOL, rtol=0
    )


def test_official_deit_checkpoint_wrapped_under_model_loads(timm_deit_tiny_distilled, tmp_path):
    path = save({"model": timm_deit_tiny_distilled.state_dict()}, tmp_path / "deit.pth")
    model = DistilledVisionTransformer(**TINY)
    report = load_pretrained(model, path)
    assert report.layout == "official DeiT"
    torch.testing.assert_close(logits(model), timm_deit_tiny_distilled.logits, atol=ATOL, rtol=0)


def official_swin_layout(timm_swin: nn.Module) -> dict[str, torch.Tensor]:
    """timm's Swin state in the original repository's layout, derived buffers included.

    The original code merges patches at the end of stage i, where timm does it at the start
    of stage i + 1, and names the classifier `head`, not `head.fc`.
    """
    state = {}
    for key, value in timm_swin.state_dict().items():
        key = re.sub(
            r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key
        )
        state[key.replace("head.fc.", "head.")] = value.clone()
    for key, buffer in timm_swin.named_buffers():  # non-persistent in timm, saved by the original
        if key.endswith(("relative_position_index", "attn_mask")):
            state[key] = buffer.clone()
    return state


def test_official_swin_layout_with_buffers_loads(timm_swin_tiny, tmp_path):
    state = official_swin_layout(timm_swin_tiny.model)
    assert "layers.0.downsample.reduction.weight" in state and "head.weight" in state
    path = save({"model": state}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    model = SwinTransformer(**SWIN_T)
    report = load_pretrained(model, path)
    assert report.layout == "official Swin"
    ignored = ", ".join(report.ignored)
    assert "layers.0.blocks.0.attn.relative_position_index" in ignored
    assert "layers.0.blocks.1.attn_mask" in ignored  # the shifted block's mask
    torch.testing.assert_close(logits(model), timm_swin_tiny.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("img_size", [384, 112])
def test_pos_embed_resampled_for_another_image_size_matches_timm(img_size, timm_vit_tiny, tmp_path):
    path = save(timm_vit_tiny.state_dict(), tmp_path / "vit.pth")
    model = VisionTransformer(img_size=img_size, **TINY)
    report = load_pretrained(model, path)
    grid = img_size // 16
    expected = resample_abs_pos_embed(
        timm_vit_tiny.model.pos_embed.detach(), new_size=[grid, grid], num_prefix_tokens=1
    )
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    assert report.resampled == [f"pos_embed: 14x14 -> {grid}x{grid} grid (bicubic)"]


def test_rel_pos_bias_tables_resized_for_window_12_match_timm(timm_swin_tiny, tmp_path):
    """Each head's 13x13 table read at 23x23 offsets as timm does when it loads Swin weights."""
    path = save(timm_swin_tiny.state_dict(), tmp_path / "swin.safetensors")
    model = SwinTransformer(img_size=384, window_size=12, **SWIN_T)
    report = load_pretrained(model, path)
    source = timm_swin_tiny.model.state_dict()
    tables = [name for name in model.state_dict() if name.endswith("relative_position_bias_table")]
    for name in tables:
        heads = source[name].shape[1]
        expected = resize_rel_pos_bias_table(source[name], (12, 12), (23 * 23, heads))
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, atol=1e-6, rtol=0)
    assert report.resampled == [
        f"{', '.join(tables)}: 13x13 -> 23x23 table (geometric offsets, linear)"
    ]


@pytest.mark.parametrize(
    "model_cls, heads",
    [(VisionTransformer, "head.weight, head.bias"), (DistilledVisionTransformer, None)],
)
def test_other_class_count_resets_the_heads_and_says_so(
    model_cls, heads, timm_deit_tiny_distilled, tmp_path
):
    model = model_cls(num_classes=5, **TINY)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head")}
    path = save(timm_deit_tiny_distilled.state_dict(), tmp_path / "deit.pth")
    report = load_pretrained(model, path)
    heads = heads or "head.weight, head.bias, head_dist.weight, head_dist.bias"
    assert report.reset == [f"{heads}: 1000 -> 5 classes"]
    assert f"{heads}: classifier for another class count: the model's head is reset" in (
        report.ignored
    )
    assert f"reset {heads.split(', ')[0]}" in report.summary()
    for name, value in fresh.items():
        assert torch.equal(model.state_dict()[name], value)
    assert torch.equal(model.cls_token, timm_deit_tiny_distilled.model.cls_token)


def test_single_channel_model_sums_the_rgb_patch_filters(timm_vit_tiny, tmp_path):
    model = VisionTransformer(in_chans=1, **TINY)
    report = load_pretrained(model, save(timm_vit_tiny.state_dict(), tmp_path / "vit.pth"))
    rgb = timm_vit_tiny.model.patch_embed.proj.weight.detach()  # (192, 3, 16, 16)
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), rgb.sum(1, keepdim=True))
    assert report.resampled == [
        "patch_embed.proj.weight: RGB filters summed over channels for in_chans=1"
    ]
    # A gray image gives the logits the RGB model gives for it repeated over three channels.
    gray = images(channels=1)
    torch.testing.assert_close(
        logits(model, gray),
        logits(timm_vit_tiny.model, gray.expand(-1, 3, -1, -1)),
        atol=ATOL,
        rtol=0,
    )


def test_plain_vit_initialises_a_deit_from_its_class_token(timm_vit_tiny, tmp_path):
    model = DistilledVisionTransformer(**TINY)
    report = load_pretrained(model, save(timm_vit_tiny.state_dict(), tmp_path / "vit.pth"))
    assert torch.equal(model.dist_token, model.cls_token)
    assert torch.equal(model.cls_token, timm_vit_tiny.model.cls_token)
    assert torch.equal(model.pos_embed[:, 1], model.pos_embed[:, 0])
    assert torch.equal(model.pos_embed[:, 2:], timm_vit_tiny.model.pos_embed[:, 1:])
    assert torch.equal(model.head_dist.weight, model.head.weight)
    assert report.resampled == [
        "pos_embed: distillation token position copied from the class token's",
        "dist_token: copied from cls_token",
        "head_dist.weight, head_dist.bias: copied from head (the file has no distillation head)",
    ]


def test_deit_into_a_plain_vit_ignores_the_distillation_token_and_head(
    timm_deit_tiny_distilled, tmp_path
):
    model = VisionTransformer(**TINY)
    path = save(timm_deit_tiny_distilled.state_dict(), tmp_path / "deit.pth")
    report = load_pretrained(model, path)
    assert report.ignored == [
        "dist_token, head_dist.weight, head_dist.bias: "
        "distillation token/head: the model is a plain ViT"
    ]
    assert report.resampled == ["pos_embed: distillation token position dropped"]
    source_pos = timm_deit_tiny_distilled.model.pos_embed
    assert torch.equal(model.pos_embed, torch.cat([source_pos[:, :1], source_pos[:, 2:]], dim=1))


# --- Small models: containers, checkpoints and errors -----------------------------------------


def small_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kwargs
    )


def test_vit_train_checkpoint_loads_raw_weights_or_their_average(tmp_path):
    trained = small_vit(num_classes=10)
    ema = ModelEma(trained, decay=0.5, warmup=False)
    perturbed(trained, seed=8)
    ema.update(trained)  # the average now sits halfway between init and the trained weights
    path = tmp_path / "last.pt"
    save_checkpoint(
        {
            "format_version": FORMAT_VERSION,
            "model": trained.state_dict(),
            "ema": ema.state_dict(),
            "config": {"model": {"name": "vit"}},
        },
        path,
    )
    for use_ema, expected in ((False, trained), (True, ema.module)):
        model = small_vit(num_classes=10)
        report = load_pretrained(model, path, ema=use_ema)
        assert report.layout == "vit_cli"
        for name, value in expected.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    assert not torch.equal(trained.head.weight, ema.module.head.weight)


@pytest.mark.parametrize(
    "make_state",
    [
        lambda: {
            "format_version": FORMAT_VERSION,
            "model": small_vit().state_dict(),
            "config": {"model": {"name": "vit"}},
        },
        lambda: {"model": small_vit().state_dict()},
        lambda: small_vit().state_dict(),
    ],
    ids=["vit-train without trainer.ema", "official release", "bare state dict"],
)
def test_asking_for_ema_weights_a_file_lacks_is_an_error(make_state, tmp_path):
    with pytest.raises(UserError, match="no EMA weights"):
        load_pretrained(small_vit(), save(make_state(), tmp_path / "w.pth"), ema=True)


def test_official_deit_model_ema_entry_is_taken_with_ema(tmp_path):
    raw, average = small_vit(), perturbed(small_vit(), seed=9)
    path = save({"model": raw.state_dict(), "model_ema": average.state_dict()}, tmp_path / "w.pth")
    assert torch.equal(read_state_dict(path, ema=True)["head.weight"], average.head.weight)
    assert torch.equal(read_state_dict(path)["head.weight"], raw.head.weight)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    source_model = perturbed(small_vit(), seed=10)
    state = {f"module._orig_mod.{k}": v for k, v in source_model.state_dict().items()}
    model = small_vit()
    load_pretrained(model, save(state, tmp_path / "w.safetensors"))
    torch.testing.assert_close(logits(model, images(32)), logits(source_model, images(32)))


def test_unknown_layout_names_the_keys_it_could_not_place(tmp_path):
    state = {"encoder.conv1.weight": torch.ones(2), "decoder.fc.bias": torch.ones(2)}
    with pytest.raises(UserError, match=r"could not be placed: decoder\.fc\.bias"):
        load_pretrained(small_vit(), save(state, tmp_path / "w.pth"))


def test_a_key_with_no_place_in_a_known_layout_is_an_error(tmp_path):
    state = {**small_vit().state_dict(), "fc_norm.weight": torch.ones(32)}
    with pytest.raises(UserError, match=r"fit no parameter .*fc_norm\.weight"):
        load_pretrained(small_vit(), save(state, tmp_path / "w.pth"))


def test_weights_of_another_family_are_refused(timm_swin_tiny, tmp_path):
    path = save(timm_swin_tiny.state_dict(), tmp_path / "swin.pth")
    with pytest.raises(UserError, match="model=swin"):
        load_pretrained(small_vit(), path)


def test_a_shape_that_cannot_be_adapted_is_an_error(tmp_path):
    path = save(small_vit().state_dict(), tmp_path / "w.pth")
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight: file \(32, 3, 8, 8\)"):
        load_pretrained(model, path)


def test_missing_parameters_are_an_error(tmp_path):
    state = small_vit().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(UserError, match=r"missing in the file: blocks\.1\.mlp\.fc2\.bias"):
        load_pretrained(small_vit(), save(state, tmp_path / "w.pth"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nope.pth", None, "do not exist"),
        ("empty.pth", b"", "the file is empty"),
        ("garbage.pth", b"not a checkpoint", "are corrupt or not a"),
        (
            "garbage.safetensors",
            b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}",
            "are corrupt or not a",
        ),
        ("weights.npz", b"PK", "unsupported file type"),
    ],
)
def test_unreadable_files_raise_user_errors(name, content, message, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_pretrained(small_vit(), path)


def test_truncated_checkpoint_is_reported_corrupt(tmp_path):
    path = save(small_vit().state_dict(), tmp_path / "w.pth")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="are corrupt or not a"):
        load_pretrained(small_vit(), path)


def test_files_without_tensors_or_with_python_objects_are_refused(tmp_path):
    with pytest.raises(UserError, match="hold no tensors"):
        load_pretrained(small_vit(), save({"epoch": 3}, tmp_path / "w.pth"))
    pickled = {"model": small_vit().state_dict(), "args": argparse.Namespace(lr=1.0)}
    with pytest.raises(UserError, match="Python objects"):
        load_pretrained(small_vit(), save(pickled, tmp_path / "deit_checkpoint.pth"))


@pytest.mark.slow
def test_fine_tuning_a_run_at_a_new_resolution_from_the_cli(run_cli, tmp_path):
    first = run_cli(*CLI_TINY, "trainer.epochs=1", "hydra.run.dir=first")
    assert first.returncode == 0, first.stderr
    weights = f"model.pretrained={tmp_path / 'first' / 'best.pt'}"

    tuned = run_cli(*CLI_TINY, "trainer.epochs=1", "model.img_size=24", weights,
                    "hydra.run.dir=tuned")  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    log = (tmp_path / "tuned" / "train.log").read_text()
    assert "(vit_cli layout)" in log and "adapted pos_embed: 4x4 -> 6x6 grid (bicubic)" in log
    (events,) = (tmp_path / "tuned").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    assert "pretrained/text_summary" in accumulator.Tags()["tensors"]

    # A linear probe: only the head moves away from the pretrained weights.
    probe = run_cli(*CLI_TINY, "trainer.epochs=1", weights, "trainer.freeze=backbone",
                    "model.drop_path_rate=0", "hydra.run.dir=probe")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    before = torch.load(tmp_path / "first" / "best.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "probe" / "last.pt", weights_only=True)["model"]
    changed = {name for name, value in after.items() if not torch.equal(value, before[name])}
    assert changed == {"head.weight", "head.bias"}

    missing = run_cli(*CLI_TINY, "model.pretrained=nowhere.pth", "hydra.run.dir=missing")
    assert missing.returncode == 2 and "nowhere.pth do not exist" in missing.stderr
