"""A large image from a segmentation map, with the map written beside it.

The paper's headline use of the sliding window (Esser et al., arXiv 2012.09841, Fig. 3): a
prior trained on small windows paints an image of any size from a semantic layout. Here the
layout can be a user's map or ``shapes_scene``, a mosaic of the built-in shapes data's maps;
``generate_from_segmentation`` draws the image with the sliding window, decodes it in tiles
(``Pipeline.decode``) and writes the image and a coloured picture of the map, each atomically.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from latentgen.errors import InputError
from latentgen.files import atomic_write_bytes

__all__ = ["colour_segmentation", "generate_from_segmentation", "shapes_scene"]

# Class 0 (the shapes' background) dark grey, then well-separated hues.
_PALETTE = np.array(
    [
        [40, 40, 40], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
        [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
        [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200],
        [128, 0, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip


def colour_segmentation(ids: Tensor) -> Image.Image:
    """Class ids ``[H, W]`` -> an RGB picture, one fixed colour per class (16, then repeated)."""
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise InputError(
            f"a segmentation map must be an integer tensor [H, W] of class ids, got "
            f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}."
        )
    return Image.fromarray(_PALETTE[ids.cpu().numpy() % len(_PALETTE)])


def shapes_scene(
    size: tuple[int, int] | int, cell: int = 32, seed: int = 0, num_classes: int = 6
) -> Tensor:
    """A ``size`` segmentation map ``[H, W]`` tiled with maps of the shapes data, one per cell.

    Each ``cell x cell`` block is the map of one rendered shapes item (the size a shapes prior
    is trained on), so every window of the sliding window sees a layout like its training data.
    """
    from latentgen.data.shapes import ShapesConfig, ShapesDataset

    h, w = (size, size) if isinstance(size, int) else size
    if h % cell or w % cell or h < cell or w < cell:
        raise InputError(
            f"the scene is {h}x{w} pixels, not a multiple of the {cell}-pixel cell; use e.g. "
            f"{max(cell, h // cell * cell)}x{max(cell, w // cell * cell)}."
        )
    rows, cols = h // cell, w // cell
    data = ShapesDataset(
        ShapesConfig(size=rows * cols, image_size=cell, seed=seed, num_classes=num_classes)
    )
    maps = torch.stack([data[i]["segmentation"] for i in range(rows * cols)])  # [n, cell, cell]
    # [rows, cols, cell, cell] -> [rows, cell, cols, cell] -> [H, W]
    return maps.view(rows, cols, cell, cell).permute(0, 2, 1, 3).reshape(h, w)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def generate_from_segmentation(
    pipe: Any,
    ids: Tensor,
    out: str | os.PathLike[str],
    *,
    name: str = "segmentation",
    window: Literal["cached", "exact"] = "cached",
    band: Literal["bottom", "middle"] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **conditions: Any,
) -> tuple[Path, Path]:
    """Generate one image of the map's size from ``ids [H, W]``; write it and the map.

    ``pipe`` is a ``Pipeline`` with a segmentation conditioner called ``name``; other
    conditions it needs (e.g. ``label=[3]``) go in ``conditions``. A map larger than the
    prior's window is drawn with the ``window`` mode of the sliding window (``band``: the
    cached window's ``window_band``; None keeps the pipeline's). Writes ``out``
    (PNG) and ``<stem>-map.png`` beside it; returns both paths. Nothing is written if
    generation fails.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: the output must be a .png file.")
    if name not in pipe.conditioners:
        raise InputError(
            f"the pipeline has no conditioner {name!r} (it has {sorted(pipe.conditioners)}); "
            "pass name= the segmentation conditioner's name."
        )
    if window not in ("cached", "exact"):
        raise InputError(f"window must be 'cached' or 'exact', got {window!r}.")
    update: dict[str, Any] = {"window": window}
    if band is not None:
        update["window_band"] = band
    sampler = pipe.sampler.model_validate({**pipe.sampler.model_dump(), **update})
    images = pipe(
        1,
        sampler=sampler,
        generator=generator,
        progress=progress,
        **{name: ids},
        **conditions,
    )
    map_path = out.with_name(f"{out.stem}-map.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(map_path, _png_bytes(colour_segmentation(ids)))
    atomic_write_bytes(out, _png_bytes(images[0]))
    return out, map_path
