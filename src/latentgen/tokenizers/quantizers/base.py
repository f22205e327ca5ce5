"""The Quantizer contract: latents ``[B, D, h, w]`` -> nearest codes and their vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from latentgen.components import Component
from latentgen.staged_state import StagedState

__all__ = ["Quantizer", "QuantizerOutput"]


@dataclass
class QuantizerOutput:
    """Attributes:
    z_q: quantized latents ``[B, D, h, w]`` (straight-through: gradients reach the encoder).
    indices: codes ``[B, h, w]`` long.
    loss: scalar quantizer loss (codebook + beta * commitment, KL, ...); 0 when none.
    stats: scalar diagnostics of this batch (perplexity, ...).
    """

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)


class Quantizer(Component, nn.Module, StagedState, ABC):
    """Maps encoder outputs to a finite codebook.

    State that a training forward changes outside the optimizer (EMA sums, k-means init,
    dead-code counters, usage counts, an annealing step) follows the ``StagedState`` protocol
    (``latentgen.staged_state``): write it with ``self.stage(name, value)`` and read it with
    ``self.staged(name)`` / ``self.current(name)``. The trainer then applies it only when the
    step passes its NaN guard, so a skipped batch leaves the quantizer exactly as it was.
    """

    kind: ClassVar[str] = "quantizer"

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Number of codes K."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Channels D of the latents this quantizer takes and returns."""

    @abstractmethod
    def forward(self, z: Tensor) -> QuantizerOutput:
        """``[B, D, h, w]`` -> ``QuantizerOutput``."""

    @abstractmethod
    def embed(self, indices: Tensor) -> Tensor:
        """codes ``[B, h, w]`` -> latents ``[B, D, h, w]`` (the decoder's input)."""

    def usage(self) -> dict[str, float]:
        """Codebook usage counted since ``reset_usage``: usage fraction, perplexity, dead codes.

        Quantizers that keep a ``usage_counter`` (``quantizers.common.UsageCounter``) get this
        for free; others return ``{}`` unless they override it.
        """
        counter = getattr(self, "usage_counter", None)
        return dict(counter.summary()) if counter is not None else {}

    def reset_usage(self) -> None:
        """Start a new counting pass (e.g. at the start of an evaluation)."""
        counter = getattr(self, "usage_counter", None)
        if counter is not None:
            counter.reset()
