"""vit_cli: config-driven training of Vision Transformers (ViT, DeiT, Swin) with PyTorch.

Inference from Python:

    model, transform, class_names = vit_cli.load_model("outputs/.../best.pt")
    top = vit_cli.predict(model, [Image.open("digit.png")], transform, class_names, topk=3)

A model to fine-tune from pretrained weights (timm, official DeiT/Swin, torchvision, vit-train):

    model = vit_cli.create_model("deit_small", pretrained="deit_small.pth", num_classes=5)

Where a model looks (attention rollout for ViT and DeiT, Grad-CAM for Swin):

    maps = vit_cli.attention_maps(model, transform(images)).maps  # (B, H, W) in [0, 1]
"""

__version__ = "0.1.0"

__all__ = ["attention_maps", "create_model", "load_model", "predict"]
_MODULES = {
    "attention_maps": "attention",
    "create_model": "models.factory",
    "load_model": "inference",
    "predict": "inference",
}


def __getattr__(name: str):
    # torch loads on first use, so that `import vit_cli` (and the CLIs' --help) stays fast.
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"vit_cli.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'vit_cli' has no attribute {name!r}")
