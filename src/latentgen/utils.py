"""Small helpers shared across latentgen."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["image_grid"]


def image_grid(images: Sequence[Any], nrow: int | None = None, pad: int = 2) -> Any:
    """Paste PIL images (all the same size) into one grid image, ``nrow`` per row."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid
