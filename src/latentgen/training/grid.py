"""Progress pictures: rows of image batches pasted into one PNG-able image."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["image_grid"]


def image_grid(rows: list[Tensor]) -> Image:
    """Rows of image batches ``[n, C, H, W]`` in [-1, 1] -> one PIL image (a row per batch)."""
    from PIL import Image as PILImage

    from latentgen.data.base import to_pil

    rows = [r.detach().float().cpu() for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2], rows[0].shape[3]
    canvas = PILImage.new("RGB", (n * w, len(rows) * h))
    for i, row in enumerate(rows):
        for j, img in enumerate(to_pil(row)):
            canvas.paste(img.convert("RGB"), (j * w, i * h))
    return canvas
