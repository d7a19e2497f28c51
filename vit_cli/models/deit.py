"""DeiT: a Vision Transformer with a distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021. A second learned token, with its own position embedding and its own
linear head, is appended after the class token. The class head learns from the labels and
the distillation head from a teacher, so training asks for both (`forward_heads`); the
model predicts with the average of their softmax inputs, as in the paper (`forward`, in
train and eval mode alike).
"""

from __future__ import annotations

import torch
from torch import nn

from vit_cli.models.vit import VisionTransformer


class DistilledVisionTransformer(VisionTransformer):
    num_prefix_tokens = 2

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
        nn.init.zeros_(self.head_dist.bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

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


class BothHeads(nn.Module):
    """A DeiT student whose `forward` returns both heads' logits (`forward_heads`).

    Distillation trains through this view: DistributedDataParallel and torch.compile wrap a
    module's `forward`, so the call that training makes has to be one.
    """

    def __init__(self, student: DistilledVisionTransformer) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_heads(x)
