"""data=fake: random images from torchvision's FakeData, for smoke tests and throughput."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vit_cli.config import Check, DataConfig, at_least
from vit_cli.data import DataSource

if TYPE_CHECKING:
    from vit_cli.data._shared import Splits


@dataclass
class FakeConfig(DataConfig):
    name: str = "fake"
    # The classes the random labels are drawn from.
    num_classes: int = 10
    # Images in each synthetic split.
    train_size: int = 1024
    val_size: int = 256

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            at_least("data.train_size", self.train_size, 1),
            at_least("data.val_size", self.val_size, 1),
        ]


def build(cfg: FakeConfig, img_size: int) -> Splits:
    from torchvision import datasets

    from vit_cli.augment import image_transform
    from vit_cli.data._shared import Splits

    shape = (cfg.in_chans, img_size, img_size)
    train_tf = image_transform(img_size, cfg.in_chans, cfg.augment, train=True)
    val_tf = image_transform(img_size, cfg.in_chans, cfg.augment, train=False)
    train = datasets.FakeData(cfg.train_size, shape, cfg.num_classes, train_tf, random_offset=0)
    # A distinct offset keeps the val images different from the train images.
    val = datasets.FakeData(
        cfg.val_size, shape, cfg.num_classes, val_tf, random_offset=cfg.train_size
    )
    return Splits(train, val, [str(c) for c in range(cfg.num_classes)])


SOURCE = DataSource(schema=FakeConfig, build=build)
