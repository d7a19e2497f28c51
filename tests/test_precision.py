import logging
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.errors import UserError
from vit_cli.precision import cpu_has_bf16, resolve_precision
from vit_cli.trainer import fit

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["fp32", "amp", "bf16"])
def test_each_precision_trains_a_few_steps_with_finite_loss(compose_cfg, tmp_path, name):
    result = fit(
        compose_cfg(
            *TINY, f"precision={name}", "trainer.max_steps=4", "trainer.log_every_n_steps=1"
        ),
        tmp_path,
    )
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["state"]["step"] == 4
    assert ckpt["config"]["precision"]["chosen"] == resolve_precision(name, CPU).chosen
    assert math.isfinite(result.final_metrics["val/loss"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_amp_on_a_cpu_is_bf16_where_it_has_bf16_instructions_else_fp32_with_one_warning(
    caplog,
):
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision("amp", CPU)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert precision.name == "amp" and not precision.grad_scaler().is_enabled()
    if cpu_has_bf16():
        assert precision.autocast_dtype == torch.bfloat16 and precision.label == "amp (bf16)"
        assert warnings == []
    else:
        assert precision.autocast_dtype is None and precision.label == "amp (fp32)"
        (warning,) = warnings
        assert "no bf16 instructions" in warning and "precision=bf16 forces" in warning


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's x86 ISA cap")
def test_a_cpu_whose_bf16_instructions_onednn_may_not_use_runs_amp_in_fp32():
    # ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN to AVX2, as on a CPU without bf16 instructions.
    probe = (
        "import torch; from vit_cli.precision import cpu_has_bf16, resolve_precision; "
        "print(resolve_precision('amp', torch.device('cpu')).chosen)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fp32"]
    assert "no bf16 instructions" in done.stderr


def test_autocast_dtypes():
    assert resolve_precision("fp32", CPU).autocast_dtype is None
    with resolve_precision("bf16", CPU).autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with pytest.raises(UserError, match="fp32, amp, bf16"):
        resolve_precision("fp8", CPU)


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=7)
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    for _ in range(3):  # three finite steps advance the growth tracker
        scaler.scale(param.sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    save_checkpoint({"model": {}, "config": {}, "scaler": scaler.state_dict()}, tmp_path / "c.pt")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(tmp_path / "c.pt")["scaler"])
    assert restored.state_dict() == scaler.state_dict()
    assert restored.state_dict()["_growth_tracker"] == 3 and restored.get_scale() == 2.0**10


def test_accumulated_micro_batches_equal_one_larger_batch(compose_cfg, tmp_path):
    # No stochastic layers or augmentation, so both runs see the same numbers.
    common = [*TINY, "model.drop_path_rate=0", "trainer.max_steps=5", "trainer.label_smoothing=0"]
    fit(
        compose_cfg(*common, "data.batch_size=16", "trainer.accumulate=4"), tmp_path / "accumulated"
    )
    fit(compose_cfg(*common, "data.batch_size=64", "trainer.accumulate=1"), tmp_path / "large")
    a = load_checkpoint(tmp_path / "accumulated" / "last.pt")
    b = load_checkpoint(tmp_path / "large" / "last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 5
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5)


def test_accumulate_larger_than_the_epoch_is_rejected(compose_cfg, tmp_path):
    with pytest.raises(UserError, match="trainer.accumulate=100"):
        fit(compose_cfg(*TINY, "trainer.accumulate=100"), tmp_path)


@pytest.mark.slow
def test_compile_trains_a_tiny_model(compose_cfg, tmp_path):
    result = fit(compose_cfg(*TINY, "trainer.compile=true", "trainer.max_steps=3"), tmp_path)
    assert math.isfinite(result.final_metrics["val/loss"])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # saved unwrapped


@pytest.mark.parametrize("model_name", ["vit", "deit", "swin"])
def test_activation_checkpointing_gives_the_same_gradients(compose_cfg, model_name):
    from vit_cli.models import build_model

    cfg = compose_cfg(f"model={model_name}", "model.drop_path_rate=0")
    model = build_model(cfg.model, img_size=16, in_chans=1, num_classes=10).train()
    x = torch.randn(4, 1, 16, 16)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        out = model(x)
        loss = sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
