"""What `load_pretrained` tells about a load: every parameter loaded, adapted or reset, and
every key of the file used or ignored, with why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What `load_pretrained` did with each parameter of the model and each key of the file."""

    source: str  # the file path
    layout: str  # whose names the file uses: "vit_cli", "timm", "torchvision", ...
    loaded: list[str] = field(default_factory=list)  # our names, loaded as they were
    resampled: list[str] = field(default_factory=list)  # "names: how they were adapted"
    reset: list[str] = field(default_factory=list)  # "names: why left at initialisation"
    ignored: list[str] = field(default_factory=list)  # "source keys: why not used"

    def summary(self) -> str:
        lines = [
            f"Pretrained weights {self.source} ({self.layout} layout): "
            f"{len(self.loaded)} tensors loaded as they were"
        ]
        for label, entries in (
            ("adapted", self.resampled),
            ("reset", self.reset),
            ("ignored", self.ignored),
        ):
            lines += [f"  {label} {_abbreviated(entry)}" for entry in entries]
        return "\n".join(lines)


def _abbreviated(entry: str, shown: int = 2) -> str:
    names, why = entry.rsplit(": ", 1)
    names = names.split(", ")
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return f"{', '.join(names[:shown])}{more}: {why}"


def first_few(items: list[str], shown: int = 6) -> str:
    """ "a, b, c (+4 more)": the start of a list of names, for a message."""
    more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def grouped(why_by_name: dict[str, str]) -> list[str]:
    """{"head.weight": w, "head.bias": w} -> ["head.weight, head.bias: w"], in first-seen order."""
    names_by_why: dict[str, list[str]] = {}
    for name, why in why_by_name.items():
        names_by_why.setdefault(why, []).append(name)
    return [f"{', '.join(names)}: {why}" for why, names in names_by_why.items()]
