"""``cnn``: a small VGG-style convolutional classifier, the reference for measuring samples.

Each stage is two 3x3 convolutions with GroupNorm and SiLU, then a 2x average pool (the last
stage is pooled globally). GroupNorm rather than BatchNorm: the model behaves the same in
train and eval mode and under DDP without synchronising batch statistics, and it scores a batch
of one sample the same as inside a batch of many (sample evaluation does both).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from latentgen.classifiers.base import Classifier
from latentgen.specs import ComponentConfig

__all__ = ["CNNClassifier", "ClassifierConfig"]


class ClassifierConfig(ComponentConfig):
    """Config of the built-in ``cnn`` classifier (a plugin classifier may subclass it)."""

    type: Literal["cnn"] = "cnn"
    num_classes: int = Field(ge=2, le=100_000, description="Number of classes.")
    image_size: int = Field(
        32, ge=8, le=4096, description="Side of the square images it takes (and was trained on)."
    )
    in_channels: Literal[1, 3] = Field(3, description="3 for RGB, 1 for greyscale.")
    class_names: tuple[str, ...] = Field(
        (),
        description="One name per class; empty: `latentgen train classifier` fills them from the "
        "dataset's classes (or class_0, class_1, ...).",
    )
    widths: tuple[int, ...] = Field(
        (32, 64, 128),
        min_length=1,
        max_length=8,
        description="Channels of each stage; every stage but the last halves the resolution.",
    )
    feature_dim: int = Field(
        128, ge=8, le=8192, description="Width of the penultimate layer (`features`)."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the last layer.")
    held_out_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Accuracy on held-out images, written by `latentgen train classifier` "
        "(None: not measured).",
    )

    @model_validator(mode="after")
    def _check(self) -> ClassifierConfig:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class_names for num_classes={self.num_classes}; give "
                "one name per class, or none."
            )
        if any(w < 1 or w > 4096 for w in self.widths):
            raise ValueError(f"widths must each lie in [1, 4096], got {self.widths}.")
        if self.image_size % 2 ** (len(self.widths) - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{len(self.widths) - 1} "
                f"(one halving per stage of widths={self.widths}); use fewer stages or another "
                "image_size."
            )
        return self


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        _norm(cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        _norm(cout),
        nn.SiLU(),
    )


class CNNClassifier(Classifier):
    """Stages of two 3x3 convs -> global average pool -> ``features [B, feature_dim]`` -> logits."""

    Config = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        layers: list[nn.Module] = []
        cin: int = config.in_channels
        for i, w in enumerate(config.widths):
            layers.append(_stage(cin, w))
            if i < len(config.widths) - 1:
                layers.append(nn.AvgPool2d(2))
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, config.feature_dim), nn.SiLU())
        self.drop = nn.Dropout(config.dropout)
        self.out = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: Tensor) -> Tensor:
        self.check_images(images)
        h = self.body(images)  # [B, widths[-1], S / 2**(n-1), same]
        return self.head(h.mean(dim=(2, 3)))  # [B, feature_dim]

    def logits(self, images: Tensor) -> Tensor:
        return self.out(self.drop(self.features(images)))  # [B, num_classes]
