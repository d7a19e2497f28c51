import random

import numpy as np
import pytest
import torch

from vit_cli.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    strip_wrapper_prefixes,
    unwrap_model,
)
from vit_cli.errors import UserError
from vit_cli.models.vit import VisionTransformer


def small_vit(num_classes: int = 3) -> VisionTransformer:
    return VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=num_classes
    )


def test_save_and_load_round_trip_with_weights_only(tmp_path):
    model = small_vit()
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": model.state_dict(), "config": {"seed": 1}, "rng": rng_state()}, path)
    state = load_checkpoint(path)
    other = small_vit()
    load_model_state(other, state["model"], source=str(path))
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file is left behind


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_and_corrupt_checkpoints_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    save_checkpoint({"model": small_vit().state_dict(), "config": {}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    # The messages, not the paths in them (this test's folder has "corrupt" in its name).
    with pytest.raises(UserError, match="is corrupt or not a vit-train checkpoint"):
        load_checkpoint(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a vit-train checkpoint"):
        load_checkpoint(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(
        UserError, match=r"corrupt or not a vit-train checkpoint \(the file is empty\)"
    ):
        load_checkpoint(empty)
    text = tmp_path / "text.pt"
    text.write_text("hello world\n")
    with pytest.raises(UserError, match="corrupt or not a vit-train checkpoint"):
        load_checkpoint(text)


class Payload:
    """Any class: a weights_only load must refuse to construct it."""


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "obj": Payload()}, path)
    with pytest.raises(
        UserError, match="not a vit-train checkpoint: it holds Python objects"
    ) as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value) and "\x1b" not in str(info.value)


def test_incompatible_weights_name_the_keys_and_shapes():
    with pytest.raises(UserError) as info:
        load_model_state(
            small_vit(num_classes=3), small_vit(num_classes=5).state_dict(), source="x.pt"
        )
    message = str(info.value)
    assert "head.weight: checkpoint (5, 32) vs model (3, 32)" in message
    state = small_vit().state_dict()
    state.pop("norm.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing: norm\.weight.*unexpected: extra\.weight"):
        load_model_state(small_vit(), state, source="x.pt")


def test_wrapper_prefixes_are_stripped_and_models_unwrapped():
    state = {"module._orig_mod.head.weight": torch.zeros(1), "pos_embed": torch.zeros(1)}
    assert set(strip_wrapper_prefixes(state)) == {"head.weight", "pos_embed"}
    model = small_vit()
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model
    assert unwrap_model(wrapper) is model


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = tmp_path / "rng.pt"
    save_checkpoint({"model": {}, "config": {}, "rng": rng_state()}, path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
