"""The ``Classifier`` interface: a registered image classifier that measures samples.

A classifier is a component like a tokenizer: built from its config, saved and loaded with
``latentgen.artifact``. Sample evaluation (class accuracy, KID/FID in its feature space) and
rejection sampling only call ``features``, ``logits`` and ``probs`` and read ``num_classes``,
``image_size``, ``in_channels`` and ``class_names``, so a plugin's classifier works there too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from latentgen.components import Component
from latentgen.errors import InputError

__all__ = ["Classifier"]


class Classifier(Component, nn.Module, ABC):
    """Images ``[B, C, S, S]`` in [-1, 1] -> class logits; ``features`` is the penultimate layer.

    The config must carry ``num_classes``, ``image_size``, ``in_channels``, ``class_names`` and
    ``held_out_accuracy`` (``latentgen.classifiers.ClassifierConfig`` has them; a plugin may
    subclass it).
    """

    kind: ClassVar[str] = "classifier"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def num_classes(self) -> int:
        """Number of classes the logits cover."""
        return int(self.config.num_classes)

    @property
    def image_size(self) -> int:
        """Side of the square images it was trained on."""
        return int(self.config.image_size)

    @property
    def in_channels(self) -> int:
        """Channels of the images it takes (3 RGB, 1 grey)."""
        return int(self.config.in_channels)

    @property
    def class_names(self) -> tuple[str, ...]:
        """One name per class (``class_0``, ... when the training data named none)."""
        names = tuple(self.config.class_names or ())
        return names if names else tuple(f"class_{i}" for i in range(self.num_classes))

    @property
    def held_out_accuracy(self) -> float | None:
        """Accuracy on held-out images measured when it was trained (None: not measured)."""
        acc = self.config.held_out_accuracy
        return None if acc is None else float(acc)

    def check_images(self, images: Tensor) -> None:
        """An ``InputError`` naming the fix unless ``images`` is ``[B, in_channels, S, S]``."""
        want = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != want:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(
                f"this classifier takes images [B, {want[0]}, {want[1]}, {want[2]}] in [-1, 1], "
                f"got {got}. Resize the images to {want[1]}x{want[2]} (or train a classifier on "
                f"{'RGB' if want[0] == 3 else 'greyscale'} images of your size with `latentgen "
                "train classifier`)."
            )
        if not images.is_floating_point():
            raise InputError(
                f"classifier images must be float in [-1, 1], got {images.dtype}; convert uint8 "
                "pixels with x / 127.5 - 1."
            )

    @abstractmethod
    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, D]`` (the space KID/FID are measured in)."""

    @abstractmethod
    def logits(self, images: Tensor) -> Tensor:
        """Unnormalised class scores ``[B, num_classes]``."""

    def probs(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, num_classes]`` (softmax of ``logits``)."""
        return torch.softmax(self.logits(images).float(), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """Same as ``logits`` (so DDP and ``module(x)`` work)."""
        return self.logits(images)
