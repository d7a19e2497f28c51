import pytest
import torch

from vit_cli.config import OptimizerConfig, SchedulerConfig
from vit_cli.errors import UserError
from vit_cli.models.vit import VisionTransformer
from vit_cli.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def small_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )


def test_biases_norms_position_embedding_and_cls_token_take_no_weight_decay():
    model = small_vit()
    decay, no_decay = param_groups(model, weight_decay=0.05)
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


def test_fused_adamw_on_the_cpu_matches_the_reference_update():
    torch.manual_seed(0)
    fused_model, loop_model = small_vit(), small_vit()
    loop_model.load_state_dict(fused_model.state_dict())
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.05)
    fused = build_optimizer(cfg, fused_model)
    loop = torch.optim.AdamW(
        param_groups(loop_model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
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
