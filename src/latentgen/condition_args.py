"""``-c NAME=VALUE`` values as the command line reads them; ``latentgen serve`` reads its saved
conditions with the same code, so that the command line it prints draws the same images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latentgen.errors import InputError

__all__ = ["parse_condition", "read_condition_file"]


def parse_condition(value: str) -> Any:
    """A condition value: JSON (``3``, ``[3, 7]``, ``"shirt"``), a bare string, or ``@FILE``.

    ``@FILE`` reads a ``.json`` file, a ``.npy`` array (no pickles), a text file with one value
    per line, or an image (returned as a PIL image, for spatial conditioners).
    """
    if value.startswith("@"):
        return read_condition_file(Path(value[1:]))
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_condition_file(path: Path) -> Any:
    """One ``@FILE`` condition; ``InputError`` when it is missing or cannot be parsed."""
    if not path.is_file():
        raise InputError(f"condition file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(path.read_text())
        if suffix == ".npy":
            import numpy as np
            import torch

            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"):
            from latentgen.data.images import read_image

            return read_image(path)  # as decoded: palette indices and 16-bit depth kept
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return [parse_condition(ln) for ln in lines]
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read condition file {path}: {e}") from None
