"""Vision Transformer.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021. The image is cut into patches, each patch is linearly embedded, a
learned class token is prepended, learned position embeddings are added, and a stack of
pre-norm transformer blocks is read out from the class token by a linear head (the
fine-tuning head of the paper; parameter names follow the common timm layout so that
pretrained weights can be mapped onto them).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_cli.models.layers import (
    Block,
    PatchEmbed,
    init_linear_trunc_normal,
    stochastic_depth_rates,
)


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if depth < 1 or num_classes < 1:
            raise ValueError(f"depth ({depth}) and num_classes ({num_classes}) must be positive")
        self.num_classes = num_classes
        self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    norm_layer=norm_layer,
                )
                for rate in stochastic_depth_rates(drop_path_rate, depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        self.grad_checkpointing = False

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_trunc_normal)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during backward, trading compute for memory."""
        self.grad_checkpointing = enable

    def prefix_tokens(self, batch_size: int) -> torch.Tensor:
        """Tokens placed before the patches; DeiT adds its distillation token here."""
        return self.cls_token.expand(batch_size, -1, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat([self.prefix_tokens(B), x], dim=1)  # (B, prefix + N, D)
        x = self.pos_drop(x + self.pos_embed)
        if self.grad_checkpointing and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x[:, 0]))  # class token -> (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
