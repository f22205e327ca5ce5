"""The dataset contract: a map-style torch dataset of dicts with an ``image`` in [-1, 1]."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from latentgen.components import Component

__all__ = ["ImageDataset", "to_pil", "to_tensor"]


class ImageDataset(Component, Dataset[dict[str, Any]], ABC):
    """Map-style dataset; item ``i`` is a dict with at least ``"image"``: float ``[C, H, W]``.

    Paired conditions ride along under their own keys (``"label"``, ``"segmentation"``,
    ``"depth"``, ``"pose"``) so any conditioner finds its data without extra plumbing.
    """

    kind: ClassVar[str] = "dataset"

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, Any]: ...


def to_tensor(image: Any) -> Tensor:
    """PIL image or HWC uint8 array -> float ``[C, H, W]`` in [-1, 1]."""
    arr = np.array(image)  # a writable copy: torch refuses read-only numpy memory
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise TypeError(f"to_tensor expects uint8 pixels, got {arr.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def to_pil(images: Tensor) -> list[Any]:
    """Float ``[B, C, H, W]`` in [-1, 1] -> list of PIL images (RGB or L)."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    out = []
    for img in x:
        arr = img.permute(1, 2, 0).numpy()
        out.append(Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]))
    return out
