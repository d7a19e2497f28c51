"""DeiT: a Vision Transformer with a distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021. A second learned token, with its own position embedding and its own
linear head, is appended after the class token. The class head learns from the labels and
the distillation head from a teacher, so training asks for both (`set_both_heads`); the
model predicts with the average of their softmax inputs, as in the paper (`forward`, in
train and eval mode alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vit_cli.models import ModelFamily
from vit_cli.models.vit import VisionTransformer, ViTConfig
from vit_cli.pretrained import Fit, head_fit


@dataclass
class DeiTConfig(ViTConfig):
    name: str = "deit"
    # False: a plain ViT trained with the DeiT recipe (no distillation token).
    distilled: bool = True


def build(cfg: DeiTConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    model_cls = DistilledVisionTransformer if cfg.distilled else VisionTransformer
    return model_cls(**cfg.model_kwargs(img_size, in_chans, num_classes))


class DistilledVisionTransformer(VisionTransformer):
    num_prefix_tokens = 2
    classifiers = ("head", "head_dist")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)
        self.both_heads = False

    def set_both_heads(self, enable: bool = True) -> None:
        """Make `forward` return both heads' logits (class, distillation), in train and eval
        mode: what distillation trains and val scores head by head.

        Set it before DistributedDataParallel or torch.compile wraps the model: they wrap
        `forward`, so the forward they see has to be the one training calls.
        """
        self.both_heads = enable

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def pretrained_fit(
        self, name: str, target: torch.Tensor, weights: dict[str, torch.Tensor], source: str
    ) -> Fit | None:
        """A file without a distillation token or head (a plain ViT's) starts them as the
        class token and (for the same classes) the class head, so that both heads start as
        one classifier."""
        value = weights.get(name)
        if name == "dist_token" and value is None and "cls_token" in weights:
            return Fit("adapted", weights["cls_token"], "copied from cls_token")
        if name.startswith("head_dist.") and (value is None or value.shape != target.shape):
            head = weights.get(name.replace("head_dist.", "head."))
            return head_fit(
                name, head, target, "copied from head (the file has no distillation head)"
            )
        return super().pretrained_fit(name, target, weights, source)

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        cls = self.cls_token.expand(batch_size, -1, -1)  # (B, 1, D)
        dist = self.dist_token.expand(batch_size, -1, -1)  # (B, 1, D)
        return torch.cat([cls, dist], dim=1)  # (B, 2, D)

    def split_heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-head and distillation-head logits, each (B, num_classes), from the features."""
        features = self.head_drop(features)
        return self.head(features[:, 0]), self.head_dist(features[:, 1])

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads' logits for images x: what distillation trains."""
        return self.split_heads(self.forward_features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = self.split_heads(features)
        return (cls_logits + dist_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.both_heads:
            return self.forward_heads(x)
        return self.forward_head(self.forward_features(x))


FAMILY = ModelFamily(schema=DeiTConfig, build=build)
