import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY
from vit_cli.checkpoint import load_checkpoint, save_checkpoint
from vit_cli.components import build_components
from vit_cli.config import TeacherConfig
from vit_cli.errors import UserError
from vit_cli.evaluation import evaluate
from vit_cli.losses import DistillationLoss, hard_distillation_loss, soft_distillation_loss
from vit_cli.models.deit import DistilledVisionTransformer
from vit_cli.precision import resolve_precision
from vit_cli.runtime import Runtime
from vit_cli.teacher import build_teacher


def small_deit(**kw) -> DistilledVisionTransformer:
    return DistilledVisionTransformer(
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kw,
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_returns_the_average_of_the_two_heads_in_train_and_eval_mode(mode):
    torch.manual_seed(0)
    model = small_deit().train(mode == "train")
    x = torch.randn(3, 1, 16, 16)
    cls_logits, dist_logits = model.forward_heads(x)
    assert cls_logits.shape == dist_logits.shape == (3, 10)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)  # two distinct heads


def test_with_both_heads_on_forward_returns_each_heads_logits_and_the_prediction_stays():
    torch.manual_seed(0)
    model = small_deit().eval()
    x = torch.randn(3, 1, 16, 16)
    prediction = model(x)
    model.set_both_heads(True)
    for a, b in zip(model(x), model.forward_heads(x), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), prediction)
    model.set_both_heads(False)
    torch.testing.assert_close(model(x), prediction)


def test_the_run_turns_both_heads_on_before_ddp_wraps_the_student(compose_cfg, monkeypatch):
    cfg = compose_cfg(
        "model=deit", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "trainer.ema.decay=0.9", "data=fake", "data.train_size=32", "data.val_size=8",
    )  # fmt: skip
    heads_when_wrapped = []

    def wrap(self, module):
        heads_when_wrapped.append(module.both_heads)
        return module

    monkeypatch.setattr(Runtime, "wrap", wrap)  # a frozen dataclass: patched on the class
    c = build_components(cfg, Runtime(torch.device("cpu")))
    assert heads_when_wrapped == [True]
    assert c.training.model is c.model and c.eval_model is c.model
    assert c.ema_eval_model.both_heads  # the weight average is scored head by head too


def test_val_of_a_student_with_both_heads_on_scores_each_head_and_their_average():
    torch.manual_seed(0)
    model = small_deit()
    images, targets = torch.randn(12, 1, 16, 16), torch.arange(12) % 10
    loader = [(images[:8], targets[:8]), (images[8:], targets[8:])]
    precision = resolve_precision("fp32", torch.device("cpu"))
    prediction = evaluate(model, loader, precision, torch.device("cpu"))
    assert "acc1_cls" not in prediction
    model.set_both_heads(True)
    both = evaluate(model, loader, precision, torch.device("cpu"))
    assert both["acc1"] == prediction["acc1"] and both["loss"] == pytest.approx(prediction["loss"])
    cls_logits, dist_logits = model.eval().forward_heads(images)
    for key, logits in (("acc1_cls", cls_logits), ("acc1_dist", dist_logits)):
        assert both[key] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean())


def test_a_process_without_val_batches_still_reports_the_heads():
    torch.manual_seed(0)
    model = small_deit()
    model.set_both_heads(True)
    loader = [(torch.randn(4, 1, 16, 16), torch.arange(4))]
    precision, cpu = resolve_precision("fp32", torch.device("cpu")), torch.device("cpu")
    sent = []  # what the process that scored the batch adds to the sums

    def keep(sums: torch.Tensor) -> torch.Tensor:
        sent.append(sums.clone())
        return sums

    scored = evaluate(model, loader, precision, cpu, reduce=keep)
    idle = evaluate(model, [], precision, cpu, reduce=lambda sums: sums + sent[0])
    assert idle == scored and "acc1_dist" in idle


def test_position_embedding_covers_cls_dist_and_patches():
    model = small_deit()
    assert model.pos_embed.shape == (1, 2 + 16, 32)
    assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 18, 32)
    assert "dist_token" in model.no_weight_decay()


@pytest.mark.parametrize(
    ("embed_dim", "heads", "params"),
    # DeiT Table 1 sizes (5M / 22M / 86M) plus the dist token, its position and its head.
    [(192, 3, 5_910_800), (384, 6, 22_436_432), (768, 12, 87_338_192)],
)
def test_distilled_deit_parameter_counts(embed_dim, heads, params):
    model = DistilledVisionTransformer(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=heads
    )
    assert sum(p.numel() for p in model.parameters()) == params


def test_soft_loss_equals_kl_definition_times_tau_squared():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.5, 1.5]])
    tau = 2.0
    p_t = F.softmax(teacher / tau, dim=1)
    p_s = F.softmax(student / tau, dim=1)
    kl_per_sample = (p_t * (p_t.log() - p_s.log())).sum(dim=1)
    expected = tau**2 * kl_per_sample.mean()
    torch.testing.assert_close(soft_distillation_loss(student, teacher, tau), expected)
    assert soft_distillation_loss(teacher, teacher, tau).abs() < 1e-7


def test_hard_loss_is_cross_entropy_against_teacher_argmax():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.5, 1.5]])  # argmax: 1, 0
    log_p = F.log_softmax(student, dim=1)
    expected = -(log_p[0, 1] + log_p[1, 0]) / 2
    torch.testing.assert_close(hard_distillation_loss(student, teacher), expected)


def test_training_loss_mixes_base_and_distillation_with_alpha():
    torch.manual_seed(0)
    images = torch.randn(4, 1, 16, 16)
    targets = torch.tensor([0, 1, 2, 3])
    cls_logits, dist_logits = torch.randn(4, 10), torch.randn(4, 10)
    teacher = small_deit().eval()
    loss_fn = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, kind="hard", alpha=0.3)
    loss, logits, parts = loss_fn(images, (cls_logits, dist_logits), targets)
    base = F.cross_entropy(cls_logits, targets)
    distill = F.cross_entropy(dist_logits, teacher(images).argmax(dim=1))
    torch.testing.assert_close(loss, 0.7 * base + 0.3 * distill)
    torch.testing.assert_close(parts["loss_distill"], distill)
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)  # what it predicts


def test_without_teacher_both_heads_learn_the_labels():
    cls_logits, dist_logits = torch.randn(4, 10), torch.randn(4, 10)
    targets = torch.tensor([0, 1, 2, 3])
    loss, _, parts = DistillationLoss(torch.nn.CrossEntropyLoss(), None, alpha=0.5)(
        None, (cls_logits, dist_logits), targets
    )
    expected = 0.5 * F.cross_entropy(cls_logits, targets) + 0.5 * F.cross_entropy(
        dist_logits, targets
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"loss_base", "loss_distill"}


def test_unknown_distill_type_is_rejected():
    with pytest.raises(UserError, match="none, soft, hard"):
        DistillationLoss(torch.nn.CrossEntropyLoss(), None, kind="medium")


def fake_vit_train_checkpoint(path, num_classes=10, in_chans=1, img_size=16):
    from vit_cli.models.vit import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=4,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    config = {
        "model": {
            "name": "vit",
            "img_size": None,
            "patch_size": 4,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
        }
    }
    data = {
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": img_size,
        "class_names": [],
    }
    save_checkpoint({"model": model.state_dict(), "config": config, "data": data}, path)
    return model


def test_checkpoint_teacher_is_frozen_in_eval_and_resizes_the_batch(tmp_path):
    original = fake_vit_train_checkpoint(tmp_path / "teacher.pt", img_size=16).eval()
    teacher = build_teacher(
        TeacherConfig(checkpoint=str(tmp_path / "teacher.pt")), num_classes=10, in_chans=1
    )
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(teacher(x), original(x))
    assert teacher(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # resized to its 16x16


def test_teacher_with_other_class_count_is_rejected(tmp_path):
    fake_vit_train_checkpoint(tmp_path / "teacher.pt", num_classes=7)
    with pytest.raises(UserError, match="predicts 7 classes but the data has 10"):
        build_teacher(
            TeacherConfig(checkpoint=str(tmp_path / "teacher.pt")), num_classes=10, in_chans=1
        )


def test_missing_teacher_file_is_rejected(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_teacher(
            TeacherConfig(checkpoint=str(tmp_path / "none.pt")), num_classes=10, in_chans=1
        )
    with pytest.raises(UserError, match="does not exist"):
        build_teacher(TeacherConfig(arch="resnet18", weights=str(tmp_path / "none.pt")), 10, 1)


def test_wrong_architecture_name_is_rejected():
    with pytest.raises(UserError, match="resnt18.*not a torchvision classification model"):
        build_teacher(TeacherConfig(arch="resnt18", weights="x.pt"), num_classes=10, in_chans=1)
    with pytest.raises(UserError, match="needs distill.teacher.weights"):
        build_teacher(TeacherConfig(arch="resnet18"), num_classes=10, in_chans=1)


def test_torchvision_teacher_from_local_weights(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pt")
    teacher = build_teacher(
        TeacherConfig(arch="resnet18", weights=str(tmp_path / "resnet18.pt")), 10, in_chans=1
    )
    gray = torch.randn(2, 1, 32, 32)
    # The teacher runs channels-last (faster convolutions) and predicts what the model does.
    assert teacher.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher(gray), resnet(gray.expand(2, 3, 32, 32)))
    with pytest.raises(
        UserError, match=r"100 classes.*fc.weight: checkpoint \(10, 512\) vs model \(100, 512\)"
    ):
        build_teacher(
            TeacherConfig(arch="resnet18", weights=str(tmp_path / "resnet18.pt")), 100, in_chans=1
        )


def test_teacher_needs_a_two_headed_student(compose_cfg, tmp_path):
    from vit_cli.trainer import fit

    fake_vit_train_checkpoint(tmp_path / "teacher.pt")
    cfg = compose_cfg(*TINY, f"distill.teacher.checkpoint={tmp_path / 'teacher.pt'}")
    with pytest.raises(UserError, match="no distillation head"):
        fit(cfg, tmp_path / "run")


@pytest.mark.slow
def test_train_a_vit_teacher_then_distil_a_deit_from_its_checkpoint(run_cli, tmp_path):
    teacher_run = run_cli(*TINY, "trainer.epochs=3", "hydra.run.dir=teacher")
    assert teacher_run.returncode == 0, teacher_run.stderr
    teacher_ckpt = tmp_path / "teacher" / "best.pt"
    student_args = [
        "model=deit",
        *TINY,
        f"distill.teacher.checkpoint={teacher_ckpt}",
        "distill.type=hard",
    ]
    student = run_cli(*student_args, "hydra.run.dir=student")
    assert student.returncode == 0, student.stderr
    run_dir = tmp_path / "student"
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "teacher/val_acc1",
        "train/loss_base",
        "train/loss_distill",
        "val/acc1_cls",
        "val/acc1_dist",
    } <= tags
    (teacher_acc,) = events.Scalars("teacher/val_acc1")
    assert teacher_acc.value == pytest.approx(
        load_checkpoint(teacher_ckpt)["metrics"]["val/acc1"], abs=1e-4
    )
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["config"]["distill"]["type"] == "hard"
    assert ckpt["config"]["distill"]["teacher"]["checkpoint"] == str(teacher_ckpt)
    assert math.isfinite(ckpt["metrics"]["train/loss_distill"])

    # Resume reloads the teacher from its path and finishes the same training.
    resumed = run_cli(
        *student_args,
        "trainer.epochs=3",
        f"trainer.resume={run_dir / 'last.pt'}",
        "hydra.run.dir=resumed",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "teacher (hard distillation)" in (tmp_path / "resumed" / "train.log").read_text()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["epoch"] == 3
