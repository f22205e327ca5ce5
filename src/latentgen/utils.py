"""Small helpers shared across latentgen."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentgen.errors import SpecError

__all__ = ["image_grid", "read_config_text"]


def read_config_text(path: Path, what: str = "config") -> str:
    """The text of a YAML/JSON file; a missing, unreadable or binary file is a ``SpecError``."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{what} file {path} is not a text file (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start} is not UTF-8): give a YAML or JSON {what} file here, not an image, "
            "archive or checkpoint."
        ) from None
    except OSError as e:
        raise SpecError(f"cannot read {what} file {path}: {e.strerror or e}") from None


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
