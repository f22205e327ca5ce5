"""The Conditioner contract: a raw condition (label, map, pose) -> ``Conditioning`` tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from latentgen.components import Component

__all__ = [
    "INPUT_KINDS",
    "Conditioner",
    "Conditioning",
    "InputKind",
    "RawInput",
    "concat_conditionings",
]

# What a raw condition is, for front ends (``latentgen serve``) that must offer a control for it:
# "class" a class label, "label_map" a map of class ids, "image" a picture or greyscale map,
# "keypoints" a list of [x, y, visibility], "value" anything else (JSON, as the CLI's -c parses).
InputKind = Literal["class", "label_map", "image", "keypoints", "value"]
INPUT_KINDS: tuple[InputKind, ...] = ("class", "label_map", "image", "keypoints", "value")


@dataclass
class Conditioning:
    """Tokens a prior is conditioned on.

    Attributes:
        tokens: ``[B, n]`` long in ``[0, vocab_size)``; for spatial conditions ``n = hc * wc``
            in row-major order.
        vocab_size: size of the conditioner's own vocabulary (the prior embeds it separately).
        grid: ``(hc, wc)`` for spatial conditions, so a sliding window can crop them; else None.
        drop: ``[B]`` bool, True where the condition is replaced by the prior's learned null
            embedding (classifier-free guidance and condition dropout). None means keep all.
    """

    tokens: Tensor
    vocab_size: int
    grid: tuple[int, int] | None = None
    drop: Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"Conditioning.tokens must be [B, n], got {tuple(self.tokens.shape)}")
        if self.grid is not None and self.grid[0] * self.grid[1] != self.tokens.shape[1]:
            raise ValueError(
                f"Conditioning grid {self.grid} does not match {self.tokens.shape[1]} tokens"
            )

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    def null(self) -> Conditioning:
        """The same shape with every row dropped (the unconditional branch of CFG)."""
        drop = torch.ones(self.batch_size, dtype=torch.bool, device=self.tokens.device)
        return replace(self, drop=drop)

    def with_drop(self, drop: Tensor) -> Conditioning:
        return replace(self, drop=drop)

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated ``n`` times (for several samples per condition)."""
        drop = None if self.drop is None else self.drop.repeat_interleave(n, 0)
        return replace(self, tokens=self.tokens.repeat_interleave(n, 0), drop=drop)

    def to(self, device: torch.device | str) -> Conditioning:
        drop = None if self.drop is None else self.drop.to(device)
        return replace(self, tokens=self.tokens.to(device), drop=drop)


@dataclass(frozen=True)
class RawInput:
    """What raw input a conditioner takes: enough for a UI to offer the right control.

    Attributes:
        kind: one of ``INPUT_KINDS``.
        count: number of classes ("class", "label_map") or keypoints ("keypoints"), if known.
        names: class names ("class", "label_map"), in label order; empty when unnamed.
        channels: "image" only: 1 for a greyscale map, 3 for a colour image, None for either.
    """

    kind: InputKind
    count: int | None = None
    names: tuple[str, ...] = ()
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"RawInput.kind must be one of {INPUT_KINDS}, got {self.kind!r}")


def concat_conditionings(items: list[Conditioning]) -> Conditioning:
    """The rows of ``items`` (one condition, alike in vocabulary and grid) in one batch."""
    first = items[0]
    if any(c.vocab_size != first.vocab_size or c.grid != first.grid for c in items):
        raise ValueError("concat_conditionings: the items differ in vocab_size or grid")
    drop = None
    if any(c.drop is not None for c in items):
        drop = torch.cat(
            [
                c.drop if c.drop is not None else c.tokens.new_zeros(c.batch_size, dtype=torch.bool)
                for c in items
            ]
        )
    tokens = torch.cat([c.tokens for c in items])
    return Conditioning(tokens=tokens, vocab_size=first.vocab_size, grid=first.grid, drop=drop)


class Conditioner(Component, nn.Module, ABC):
    """Turns one kind of raw condition into tokens in the conditioner's own vocabulary."""

    kind: ClassVar[str] = "conditioner"
    # The raw input's kind (see ``RawInput``); a plugin that sets nothing gets a JSON text box.
    input_kind: ClassVar[InputKind] = "value"
    input_channels: ClassVar[int | None] = None  # "image" only: 1 grey, 3 colour, None either

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Size of this conditioner's token vocabulary."""

    @abstractmethod
    def encode(self, raw: Any) -> Conditioning:
        """Raw condition for a batch -> ``Conditioning`` with ``tokens [B, n]``."""

    @property
    def num_tokens(self) -> int | None:
        """Tokens per sample that ``encode`` emits (``Conditioning.num_tokens``): 1 by default.

        The pipeline checks it against the prior's ``ConditionSlot.num_tokens``. A conditioner
        whose count follows the size of its raw input (a spatial map) returns None; its
        ``Conditioning`` is then checked when it is made.
        """
        return 1

    @property
    def raw_input(self) -> RawInput:
        """The raw input this conditioner takes, from ``input_kind`` and its config.

        ``count`` and ``names`` come from the config's ``num_classes`` / ``num_keypoints`` and
        ``class_names`` fields when it has them; override for anything else.
        """
        cfg = self.config
        field = "num_keypoints" if self.input_kind == "keypoints" else "num_classes"
        count = getattr(cfg, field, None)
        names = getattr(cfg, "class_names", None) or ()
        return RawInput(
            kind=self.input_kind,
            count=int(count) if isinstance(count, int) else None,
            names=tuple(str(n) for n in names),
            channels=self.input_channels if self.input_kind == "image" else None,
        )

    def forward(self, raw: Any) -> Conditioning:
        return self.encode(raw)
