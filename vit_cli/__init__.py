"""vit_cli: config-driven training of Vision Transformers (ViT, DeiT, Swin) with PyTorch.

Inference from Python:

    model, transform, class_names = vit_cli.load_model("outputs/.../best.pt")
    top = vit_cli.predict(model, [Image.open("digit.png")], transform, class_names, topk=3)
"""

__version__ = "0.1.0"

__all__ = ["load_model", "predict"]


def __getattr__(name: str):
    # torch loads on first use, so that `import vit_cli` (and the CLIs' --help) stays fast.
    if name in __all__:
        from vit_cli import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'vit_cli' has no attribute {name!r}")
