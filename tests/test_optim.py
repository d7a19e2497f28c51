import pytest
import torch

from vit_cli.components import build_components
from vit_cli.config import OptimizerConfig, SchedulerConfig, validate
from vit_cli.errors import UserError
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.models.swin import SwinTransformer
from vit_cli.models.vit import VisionTransformer, vit_layer_id
from vit_cli.optim import (
    build_optimizer,
    build_scheduler,
    freeze,
    layer_ids,
    lr_factor,
    param_groups,
)
from vit_cli.resume import RESUME_MUST_MATCH
from vit_cli.runtime import Runtime

VIT_SIZES = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def small_vit() -> VisionTransformer:
    return VisionTransformer(**VIT_SIZES)


def small_deit() -> DistilledVisionTransformer:
    return DistilledVisionTransformer(**VIT_SIZES)


def small_swin() -> SwinTransformer:
    # Stages of 1, 2 and 1 blocks, with patch merging after the first two; ape adds the
    # absolute position embedding.
    return SwinTransformer(
        img_size=16, patch_size=2, embed_dim=8, depths=(1, 2, 1), num_heads=(1, 1, 1),
        window_size=2, num_classes=3, ape=True,
    )  # fmt: skip


def names_of(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def group_names(model: torch.nn.Module, group: dict) -> set[str]:
    names = names_of(model)
    return {names[id(p)] for p in group["params"]}


def group_scales(model: torch.nn.Module, optimizer: torch.optim.Optimizer, expected) -> list:
    """The scale `expected(name)` shared by every parameter of each group, group by group."""
    scales = []
    for group in optimizer.param_groups:
        in_group = {expected(name) for name in group_names(model, group)}
        assert len(in_group) == 1, f"a group mixes lr scales {in_group}"
        scales.append(in_group.pop())
    return scales


def expected_vit_layer(name: str) -> int:
    """The layers of `small_vit` (depth 2), written out: L = 3."""
    if name in ("cls_token", "dist_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks.0."):
        return 1
    if name.startswith("blocks.1."):
        return 2
    assert name.startswith(("norm.", "head.", "head_dist.")), name
    return 3


def test_biases_norms_position_embedding_and_cls_token_take_no_weight_decay():
    model = small_vit()
    decay, no_decay = param_groups(model, weight_decay=0.05, lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "norm.bias",
        "head.bias",
        "blocks.0.attn.qkv.bias",
    } <= no_decay_names
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decay_names
    assert all(p.ndim > 1 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_without_layer_decay_or_head_scale_the_two_groups_are_unchanged():
    model = small_vit()
    params = list(model.named_parameters())
    skip = {"pos_embed", "cls_token"}
    decay = [p for n, p in params if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in params if p.ndim <= 1 or n in skip]
    before = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01, fused=True,
    )  # fmt: skip
    now = build_optimizer(OptimizerConfig(lr=0.01), model)
    assert now.state_dict()["param_groups"] == before.state_dict()["param_groups"]
    for a, b in zip(now.param_groups, before.param_groups, strict=True):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


@pytest.mark.parametrize(("name", "cls"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer(name, cls):
    opt = build_optimizer(OptimizerConfig(name=name, lr=0.01), small_vit())
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.01


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(UserError, match="adamw, sgd"):
        build_optimizer(OptimizerConfig(name="lion"), small_vit())


def test_warmup_is_linear_then_cosine_reaches_min_lr():
    factors = [
        lr_factor(s, warmup_steps=10, total_steps=110, min_factor=0.01, cosine=True)
        for s in range(110)
    ]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the decay
    assert lr_factor(110, 10, 110, 0.01, True) == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_a_warmup_as_long_as_the_run_is_warned_about(caplog):
    opt = build_optimizer(OptimizerConfig(lr=1.0), small_vit())
    build_scheduler(SchedulerConfig(warmup_epochs=5), opt, 1.0, steps_per_epoch=4, total_steps=8)
    assert "scheduler.warmup_epochs=5 spans the whole run (8 steps)" in caplog.text
    caplog.clear()
    build_scheduler(SchedulerConfig(warmup_epochs=1), opt, 1.0, steps_per_epoch=4, total_steps=8)
    assert caplog.text == ""


def test_scheduler_steps_per_optimizer_step():
    model = small_vit()
    opt = build_optimizer(OptimizerConfig(lr=1.0), model)
    sched = build_scheduler(
        SchedulerConfig(warmup_epochs=1, min_lr=0.0), opt, 1.0, steps_per_epoch=4, total_steps=12
    )
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[-1] < 0.05
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_layer_decay_scales_every_group_lr_at_every_scheduler_step(name):
    model = small_vit()
    lr, decay, min_lr = 0.1, 0.5, 1e-3
    opt = build_optimizer(OptimizerConfig(name=name, lr=lr, layer_decay=decay), model)
    sched = build_scheduler(
        SchedulerConfig(warmup_epochs=1, min_lr=min_lr), opt, lr, steps_per_epoch=4,
        total_steps=12,
    )  # fmt: skip
    scales = group_scales(model, opt, lambda n: decay ** (3 - expected_vit_layer(n)))
    assert sorted(set(scales), reverse=True) == [1.0, 0.5, 0.25, 0.125]
    assert scales[0] == 1.0  # group 0, which the loop logs as the lr, is unscaled
    for step in range(14):  # past the end: the lr stays at min_lr times each group's scale
        factor = lr_factor(step, 4, 12, min_lr / lr, cosine=True)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [lr * factor * s for s in scales]
        )
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([min_lr * s for s in scales])


def test_vit_and_deit_layers_cover_every_parameter():
    for model in (small_vit(), small_deit()):
        ids, last = layer_ids(model)
        assert last == 3 and set(ids) == set(names_of(model).values())
        assert ids == {name: expected_vit_layer(name) for name in ids}
    assert layer_ids(small_deit())[0]["dist_token"] == 0
    assert layer_ids(small_deit())[0]["head_dist.weight"] == 3


def test_swin_layers_count_blocks_across_stages_and_merging_joins_its_stage():
    model = small_swin()
    ids, last = layer_ids(model)
    assert last == 1 + 2 + 1 + 1 and set(ids) == set(names_of(model).values())
    expected = {
        "absolute_pos_embed": 0,
        "patch_embed.proj.weight": 0,
        "patch_embed.norm.weight": 0,
        "layers.0.blocks.0.attn.relative_position_bias_table": 1,
        "layers.0.blocks.0.mlp.fc2.weight": 1,
        "layers.0.downsample.reduction.weight": 1,  # the last block before it: stage 0's
        "layers.1.blocks.0.norm1.weight": 2,
        "layers.1.blocks.1.attn.qkv.weight": 3,
        "layers.1.downsample.norm.bias": 3,
        "layers.2.blocks.0.attn.proj.weight": 4,
        "norm.weight": 5,
        "head.weight": 5,
        "head.bias": 5,
    }
    assert {name: ids[name] for name in expected} == expected
    # Deeper parameters never get a lower layer.
    order = [ids[name] for name in names_of(model).values()]
    assert order == sorted(order)


@pytest.mark.parametrize("make", [small_vit, small_deit, small_swin])
def test_layer_decay_gives_the_head_the_lr_and_the_embeddings_decay_to_the_depth(make):
    model = make()
    decay = 0.65
    _, last = layer_ids(model)
    opt = build_optimizer(OptimizerConfig(lr=1.0, layer_decay=decay), model)
    lr_of = {n: g["lr"] for g in opt.param_groups for n in group_names(model, g)}
    assert set(lr_of) == set(names_of(model).values())
    assert lr_of["head.weight"] == lr_of["head.bias"] == lr_of["norm.weight"] == 1.0
    embeddings = [n for n in lr_of if n.startswith("patch_embed.") or n in ("pos_embed",
                  "cls_token", "dist_token", "absolute_pos_embed")]  # fmt: skip
    assert embeddings and all(lr_of[n] == pytest.approx(decay**last) for n in embeddings)


def test_a_parameter_without_a_layer_rule_is_named():
    with pytest.raises(UserError, match="'mask_token'.*optimizer.layer_decay=null"):
        vit_layer_id("mask_token", depth=2)
    with pytest.raises(UserError, match="supports the vit, deit and swin models, not Linear"):
        build_optimizer(OptimizerConfig(layer_decay=0.65), torch.nn.Linear(2, 2))


def test_head_lr_scale_multiplies_only_the_heads():
    model = small_deit()
    opt = build_optimizer(OptimizerConfig(lr=0.01, head_lr_scale=10.0), model)
    lr_of = {n: g["lr"] for g in opt.param_groups for n in group_names(model, g)}
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert {n: lr_of[n] for n in heads} == pytest.approx(dict.fromkeys(heads, 0.1))
    assert all(lr_of[n] == 0.01 for n in set(lr_of) - heads)
    assert opt.param_groups[0]["lr"] == 0.01  # group 0, which the loop logs as the lr


def test_head_lr_scale_multiplies_the_head_layer_under_layer_decay():
    model = small_vit()
    opt = build_optimizer(OptimizerConfig(lr=1.0, layer_decay=0.5, head_lr_scale=3.0), model)
    lr_of = {n: g["lr"] for g in opt.param_groups for n in group_names(model, g)}
    assert lr_of["head.weight"] == 3.0 and lr_of["norm.weight"] == 1.0
    assert lr_of["blocks.1.mlp.fc1.weight"] == 0.5 and lr_of["pos_embed"] == 0.125


@pytest.mark.parametrize("make", [small_vit, small_deit, small_swin])
def test_weight_decay_exclusions_hold_under_layer_decay(make):
    model = make()
    skip = model.no_weight_decay()
    cfg = OptimizerConfig(weight_decay=0.05, layer_decay=0.65, head_lr_scale=2.0)
    opt = build_optimizer(cfg, model)
    params = dict(model.named_parameters())
    seen = []
    for group in opt.param_groups:
        names = group_names(model, group)
        excluded = {params[n].ndim <= 1 or n.split(".")[-1] in skip for n in names}
        assert excluded == {group["weight_decay"] == 0.0}
        seen += names
    assert sorted(seen) == sorted(params)
    assert len(opt.param_groups) == len({(g["lr"], g["weight_decay"]) for g in opt.param_groups})


@pytest.mark.parametrize("make", [small_vit, small_deit, small_swin])
def test_freezing_the_backbone_trains_only_the_heads(make):
    model = make()
    freeze(model, "backbone")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in names_of(model).values() if n.startswith(("head.", "head_dist."))}
    assert trainable == heads and heads
    opt = build_optimizer(OptimizerConfig(lr=0.1), model)
    assert {n for g in opt.param_groups for n in group_names(model, g)} == heads
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 16, 16)).logsumexp(dim=1).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == heads


def test_freeze_names_the_valid_values():
    with pytest.raises(UserError, match="trainer.freeze='blocks'.*null, backbone"):
        freeze(small_vit(), "blocks")


def test_optimizer_round_trip_keeps_the_per_group_lrs(tmp_path):
    cfg = OptimizerConfig(lr=0.1, layer_decay=0.5, head_lr_scale=2.0)
    sched_cfg = SchedulerConfig(warmup_epochs=1, min_lr=1e-3)

    def build(seed: int):
        torch.manual_seed(seed)
        model = small_deit()
        opt = build_optimizer(cfg, model)
        return model, opt, build_scheduler(sched_cfg, opt, cfg.lr, 4, total_steps=20)

    model, opt, sched = build(0)
    images = torch.randn(2, 3, 16, 16)
    for _ in range(6):
        opt.zero_grad()
        model(images).logsumexp(dim=1).mean().backward()
        opt.step()
        sched.step()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        tmp_path / "last.pt",
    )
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    resumed, opt2, sched2 = build(1)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for _ in range(4):  # both runs go on with the same lrs and weights
        for m, o, s in ((model, opt, sched), (resumed, opt2, sched2)):
            o.zero_grad()
            m(images).logsumexp(dim=1).mean().backward()
            o.step()
            s.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_fused_adamw_on_the_cpu_matches_the_reference_update():
    torch.manual_seed(0)
    fused_model, loop_model = small_vit(), small_vit()
    loop_model.load_state_dict(fused_model.state_dict())
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(cfg, fused_model)
    loop = torch.optim.AdamW(
        param_groups(loop_model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=tuple(cfg.betas),
        eps=cfg.eps, foreach=False,
    )  # fmt: skip
    assert fused.defaults["fused"]
    images = torch.randn(4, 3, 16, 16)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            model(images).logsumexp(dim=1).mean().backward()
            optimizer.step()
    # Within 1% of one step (lr 1e-2): the kernels round differently, and Adam divides
    # near-zero gradients by their own tiny second moments.
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.layer_decay=0", r"optimizer.layer_decay=0.0 .* null or in \(0, 1\]"),
        ("optimizer.layer_decay=1.5", r"optimizer.layer_decay=1.5 .* null or in \(0, 1\]"),
        ("optimizer.head_lr_scale=0", "optimizer.head_lr_scale=0.0 .* positive"),
        ("trainer.freeze=head", "trainer.freeze=head .* null or one of backbone"),
    ],
)
def test_fine_tuning_values_out_of_range_are_rejected_naming_the_key(
    compose_cfg, override, message
):
    with pytest.raises(UserError, match=message):
        validate(compose_cfg(override))


def test_fine_tuning_defaults_are_off_and_valid_values_pass(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.optimizer.layer_decay, cfg.optimizer.head_lr_scale) == (None, 1.0)
    assert cfg.trainer.freeze is None
    validate(compose_cfg("optimizer.layer_decay=1", "trainer.freeze=backbone"))
    validate(
        compose_cfg("optimizer=sgd", "optimizer.layer_decay=0.65", "optimizer.head_lr_scale=10")
    )
    assert "trainer.freeze" in RESUME_MUST_MATCH


def test_the_run_freezes_the_backbone_before_ddp_wraps_the_model(compose_cfg, monkeypatch):
    cfg = compose_cfg(
        "model.embed_dim=16", "model.depth=2", "model.num_heads=2", "trainer.freeze=backbone",
        "optimizer.layer_decay=0.65", "data=fake", "data.train_size=64", "data.val_size=16",
    )  # fmt: skip
    runtime = Runtime(torch.device("cpu"))
    trainable_when_wrapped = []

    def wrap(self, module):
        trainable_when_wrapped.extend(n for n, p in module.named_parameters() if p.requires_grad)
        return module

    monkeypatch.setattr(Runtime, "wrap", wrap)  # a frozen dataclass: patched on the class
    c = build_components(cfg, runtime)
    assert trainable_when_wrapped == ["head.weight", "head.bias"]
    optimized = {id(p) for g in c.training.updater.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(c.model.head.weight), id(c.model.head.bias)}
