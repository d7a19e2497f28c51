"""Train a torchvision CNN as a distillation teacher, on the training images of a vit_cli run.

DeiT's students learn most from convnet teachers (Touvron et al., 2021, Table 2), and
vit-train trains only transformers. This script trains a torchvision classification model
(`--arch`, e.g. resnet18) on the training split of the data that the positional Hydra
overrides compose (as for vit-train: `experiment=fashion_mnist_deit`), with the same
normalisation and training augmentation the student will see, and writes its state_dict,
atomically, to `--out`. A student then loads it through the teacher path:

    python benchmarks/train_teacher.py experiment=fashion_mnist_deit --out outputs/teachers/resnet18_fmnist.pt
    vit-train experiment=fashion_mnist_deit distill.teacher.arch=resnet18 \\
        distill.teacher.weights=outputs/teachers/resnet18_fmnist.pt

Grayscale batches are repeated to 3 channels, as the teacher path does. The recipe is the
usual one for ResNets on small images (He et al., 2016): SGD with momentum 0.9, weight decay
5e-4, lr 0.1 at batch 128 decayed by a cosine to zero. It prints the val top-1 (the test
split, unless the data holds part of train out as val) after each epoch, beside the top-1 on
the epoch's augmented training batches: a teacher whose training top-1 stays near its val
top-1 is underfit and has little to teach a student of the same accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from vit_cli.checkpoint import save_checkpoint
from vit_cli.composition import compose_train_config
from vit_cli.data import build_data
from vit_cli.evaluation import accuracy_counts, evaluate
from vit_cli.precision import resolve_precision
from vit_cli.runtime import resolve_device


class ThreeChannels(nn.Module):
    """Feeds a grayscale batch to an RGB model, as vit_cli's FrozenTeacher does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images.shape
        return self.model(images.expand(B, 3, H, W))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vit-train")
    parser.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1, help="peak lr at batch 128 (scaled)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--out", type=Path, required=True, help="where to write the state_dict")
    args = parser.parse_args(argv)

    cfg = compose_train_config(args.overrides)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    precision = resolve_precision("fp32", device)  # a teacher is trained once: no scaler
    generator = torch.Generator().manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.model.img_size or cfg.data.img_size, generator)
    if data.in_chans not in (1, 3):
        raise SystemExit(f"--arch {args.arch} takes 1 or 3 channels; the data has {data.in_chans}.")

    cnn = torchvision.models.get_model(args.arch, weights=None, num_classes=data.num_classes)
    # Channels-last convolutions train about 1.4x as fast on CPU (ResNet-18 at 28 px).
    model = ThreeChannels(cnn).to(device, memory_format=torch.channels_last)
    lr = args.lr * cfg.data.batch_size / 128
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True
    )
    steps = args.epochs * len(data.train_loader)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    print(f"{args.arch}: {sum(p.numel() for p in cnn.parameters()) / 1e6:.2f}M parameters")

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        generator.manual_seed(cfg.seed + epoch)  # each epoch's order, as vit-train draws it
        model.train()
        correct = seen = 0
        for images, targets in data.train_loader:
            images, targets = images.to(device), targets.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
            correct += accuracy_counts(logits, targets, (1,))[0]
            seen += len(targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        metrics = evaluate(model, data.val_loader, precision, device)
        minutes = (time.perf_counter() - start) / 60
        print(
            f"epoch {epoch}/{args.epochs}: train loss {loss.item():.4f} "
            f"top-1 {100 * correct / seen:.2f}% | val top-1 {metrics['acc1']:.2f}% | {minutes:.1f} min"
        )
    save_checkpoint(cnn.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
