"""Class-label conditioning: one token per image, in a vocabulary of ``num_classes`` labels.

The label ``-1`` (``UNLABELLED``) marks an image without a label: its row comes back dropped
(``Conditioning.drop``), so a prior trained on partly labelled data learns those images with
its null label, the same null that classifier-free guidance and condition dropout use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from latentgen.conditioners.base import Conditioner, Conditioning
from latentgen.errors import InputError
from latentgen.specs import ComponentConfig

__all__ = ["UNLABELLED", "ClassLabelConditioner", "ClassLabelConfig"]

#: The label of an unlabelled image: the prior's null label stands in for it.
UNLABELLED = -1


class ClassLabelConfig(ComponentConfig):
    """Config of ``class_label``."""

    type: Literal["class_label"] = "class_label"
    num_classes: int = Field(ge=1, le=1_000_000, description="Number of class labels.")
    class_names: tuple[str, ...] | None = Field(
        None, description="Optional names, so labels can be given as strings ('shirt')."
    )


class ClassLabelConditioner(Conditioner):
    """Labels (ints, names, or a tensor) -> ``tokens [B, 1]`` in ``[0, num_classes)``.

    A label of ``-1`` (``UNLABELLED``) gives a dropped row: the prior's null label.
    """

    Config = ClassLabelConfig
    input_kind = "class"

    def __init__(self, config: ClassLabelConfig) -> None:
        super().__init__(config)
        if config.class_names is not None and len(config.class_names) != config.num_classes:
            raise InputError(
                f"class_label: {len(config.class_names)} class_names for num_classes="
                f"{config.num_classes}; give exactly one name per class."
            )

    @property
    def vocab_size(self) -> int:
        return int(self.config.num_classes)

    def _index(self, label: Any) -> int:
        if isinstance(label, str):
            names = self.config.class_names or ()
            if label not in names:
                raise InputError(
                    f"unknown class name {label!r}; known: {', '.join(names) or '(no names set)'}."
                )
            return names.index(label)
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            if isinstance(label, np.generic):
                label = label.item()  # show 0.5, not np.float64(0.5)
            hint = ""
            if isinstance(label, float):
                hint = (
                    f" (a float: write {int(label)} if you meant that class)"
                    if label.is_integer()
                    else " (a float: labels are class indices 0, 1, 2, ...)"
                )
            raise InputError(f"a class label must be an int or a class name, got {label!r}{hint}.")
        return int(label)

    def encode(self, raw: int | str | Sequence[int | str] | Tensor) -> Conditioning:
        if isinstance(raw, Tensor):
            if raw.is_floating_point() or raw.dim() > 1:
                raise InputError(
                    f"labels must be an integer tensor [B], got {raw.dtype} {tuple(raw.shape)}."
                )
            labels = raw.reshape(-1).long()
        else:
            if isinstance(raw, (int, str, np.integer, float, np.floating)):
                items: list[Any] = [raw]  # one label; _index refuses floats by name
            else:
                try:
                    items = list(raw)
                except TypeError:
                    raise InputError(
                        "labels must be an int, a class name, a list of them or an integer "
                        f"tensor [B], got {type(raw).__name__}: {raw!r}."
                    ) from None
            labels = torch.tensor([self._index(x) for x in items], dtype=torch.long)
        if labels.numel() == 0:
            raise InputError("no labels given: pass at least one, e.g. label=[3].")
        unlabelled = labels == UNLABELLED  # [B]
        known = labels[~unlabelled]
        if known.numel() and (int(known.min()) < 0 or int(known.max()) >= self.vocab_size):
            bad = int(known.min()) if int(known.min()) < 0 else int(known.max())
            raise InputError(
                f"label {bad} is outside [0, {self.vocab_size}); this conditioner has "
                f"num_classes={self.vocab_size} (and -1 marks an unlabelled image)."
            )
        tokens = labels.masked_fill(unlabelled, 0)[:, None]  # [B, 1]
        drop = unlabelled if bool(unlabelled.any()) else None
        return Conditioning(tokens=tokens, vocab_size=self.vocab_size, drop=drop)
