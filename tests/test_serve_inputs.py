"""The raw-input declaration of conditioners (``Conditioner.raw_input``), which the page reads."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from latentgen import registry
from latentgen.conditioners.base import Conditioner, Conditioning, RawInput
from latentgen.specs import ComponentConfig


@pytest.mark.parametrize(
    ("config", "want"),
    [
        (
            {"type": "class_label", "num_classes": 3, "class_names": ["a", "b", "c"]},
            RawInput("class", count=3, names=("a", "b", "c")),
        ),
        ({"type": "class_label", "num_classes": 4}, RawInput("class", count=4)),
        ({"type": "segmentation", "num_classes": 5}, RawInput("label_map", count=5)),
        ({"type": "depth"}, RawInput("image", channels=1)),
        ({"type": "edges"}, RawInput("image")),
        ({"type": "low_resolution"}, RawInput("image", channels=3)),
        ({"type": "pose", "num_keypoints": 7}, RawInput("keypoints", count=7)),
    ],
)
def test_builtin_conditioners_declare_their_raw_input(config, want):
    assert registry.build("conditioner", config).raw_input == want


class _PlainConfig(ComponentConfig):
    type: Literal["tests.plain"] = "tests.plain"


class _Plain(Conditioner):
    """A plugin conditioner that declares nothing about its input."""

    Config = _PlainConfig
    vocab_size = 2

    def encode(self, raw):
        return Conditioning(tokens=torch.as_tensor(raw).long().reshape(-1, 1) % 2, vocab_size=2)


def test_a_conditioner_that_declares_nothing_takes_a_value():
    assert _Plain(_PlainConfig()).raw_input == RawInput("value")


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        RawInput("colour")  # type: ignore[arg-type]
