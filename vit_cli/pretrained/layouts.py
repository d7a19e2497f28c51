"""Layouts: how another project names a model family's weights, renamed onto our names.

Each model family tells its layouts from a file's keys, beside its model
(`pretrained_layout` in vit_cli/models/<family>.py); these are the pieces they share.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

Rename = Callable[[str], str]


def renamer(*rules: tuple[str, str | Callable[[re.Match], str]]) -> Rename:
    """A renamer that rewrites a key's prefix with the first rule whose pattern matches it."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            if pattern.match(key):
                return pattern.sub(repl, key, count=1)
        return key

    return rename


OUR_NAMES = renamer()


@dataclass(frozen=True)
class Layout:
    name: str  # whose names the file uses, for the report: "timm", "torchvision", ...
    weights: str  # whose weights they are, for messages: "ViT/DeiT", "Swin"
    pick: str  # the models that read them, for messages: "model=swin"
    rename: Rename
