"""vit_cli: config-driven training of Vision Transformers (ViT, DeiT, Swin) with PyTorch."""

__version__ = "0.1.0"
