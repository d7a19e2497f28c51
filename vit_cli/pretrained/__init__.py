"""Pretrained weights from other projects' layouts, placed onto our models.

Build the target model with its own config first, then `load_pretrained(model, path)`: the
file's layout is told from its keys, its names are mapped onto ours, and every parameter of
the model ends up loaded, adapted or reset, with a `LoadReport` that says which and why.
Anything it cannot account for is a UserError, never a silent `strict=False`.

The package is split by concern: reading the file (`files`), the layouts' shared pieces
(`layouts`), placing the weights (`placing`), resizing position embeddings and bias tables
(`resample`) and the report (`report`). What differs between model families lives beside
each model (vit_cli/models/<family>.py), which the loader asks:

- `pretrained_layout(keys, container, source)`: the `Layout` of the file's keys (timm,
  official releases, torchvision, our own runs), or a UserError naming whose weights they
  are;
- `pretrained_fit(name, target, weights, source)`: the family's own adaptation of one
  parameter (a resampled position embedding, a distillation token copied from the class
  token), or None for the rules every family shares;
- `pretrained_ignored(name)`: why a key of the file that fits no parameter may go unused
  (a buffer the model rebuilds), or None;
- `classifiers`: the names of its head(s), reset for another class count.
"""

from vit_cli.pretrained.files import read_state_dict, read_weights
from vit_cli.pretrained.layouts import OUR_NAMES, Layout, renamer
from vit_cli.pretrained.placing import (
    Fit,
    fitted,
    head_fit,
    load_pretrained,
    place_weights,
    square_side,
)
from vit_cli.pretrained.report import LoadReport, first_few
from vit_cli.pretrained.resample import resample_pos_embed_grid, resize_rel_pos_bias_table

__all__ = [
    "OUR_NAMES",
    "Fit",
    "Layout",
    "LoadReport",
    "first_few",
    "fitted",
    "head_fit",
    "load_pretrained",
    "place_weights",
    "read_state_dict",
    "read_weights",
    "renamer",
    "resample_pos_embed_grid",
    "resize_rel_pos_bias_table",
    "square_side",
]
