"""The one reader of users' image files: datasets, ``reconstruct`` and ``-c name=@file`` use it.

It turns what Pillow decodes into what latentgen expects, where ``Image.convert`` alone does
not: a 16-bit greyscale PNG (Pillow mode ``I;16``) converted to ``L`` clips every value above
255 to white, so 16-bit values are scaled to 8 bits here. Pillow itself already keeps the high
byte of 16-bit colour PNGs (RGB, RGBA, grey+alpha); greyscale uses the same high byte, so one
dataset of mixed files is scaled one way. Alpha is dropped (torchvision's ``convert("RGB")``
does the same); 1-bit and palette images expand to their grey or colour values.

Images larger than ``LATENTGEN_MAX_IMAGE_PIXELS`` pixels (default Pillow's own refusal
threshold, 178,956,970 = 2 x ``PIL.Image.MAX_IMAGE_PIXELS``) are refused before decoding, as a
guard against decompression bombs; set the variable to a larger number, or to 0 for no limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentgen.errors import DataError, InputError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "MAX_PIXELS_ENV", "max_image_pixels", "read_image"]

MAX_PIXELS_ENV = "LATENTGEN_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485  # where Pillow raises DecompressionBombError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_PIL_LIMIT = threading.Lock()  # Pillow's limit is a module global: swap it under a lock


def max_image_pixels() -> int | None:
    """The pixel limit from ``$LATENTGEN_MAX_IMAGE_PIXELS`` (None: no limit)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise InputError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a whole number; set it to the largest image size "
            "in pixels to read (e.g. 400000000), or 0 for no limit."
        ) from None
    if value < 0:
        raise InputError(f"{MAX_PIXELS_ENV}={raw!r} must be >= 0 (0 means no limit).")
    return value or None


@contextmanager
def _no_pillow_limit() -> Iterator[None]:
    # Pillow checks its own global limit inside Image.open, before we can see the size; we
    # apply ours (configurable per process, with a message that says how) on the header instead.
    from PIL import Image

    with _PIL_LIMIT:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_8bit(im: Any) -> Any:
    """16-bit greyscale -> ``L`` (the high byte); other modes pass through unchanged."""
    from PIL import Image

    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.uint16)  # [H, W], native byte order
        return Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    if im.mode in ("I", "F"):
        raise InputError(
            f"32-bit {'integer' if im.mode == 'I' else 'float'} images have no fixed white "
            "level to scale from; save the image as an 8- or 16-bit PNG."
        )
    return im


def read_image(
    path: str | os.PathLike[str],
    mode: Literal["RGB", "L"] | None = None,
    *,
    max_pixels: int | Literal["env"] | None = "env",
) -> Any:
    """Read an image file as a PIL image; ``mode`` "RGB" or "L" converts with 16-bit scaling.

    ``mode=None`` keeps the decoded image as it is (a palette segmentation map keeps its
    indices, a 16-bit depth map its 16 bits): what a spatial conditioner receives.
    ``max_pixels`` defaults to ``$LATENTGEN_MAX_IMAGE_PIXELS``; None reads any size.

    Raises:
        DataError: the file is missing, is not an image Pillow can decode, or is too large.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    limit = max_image_pixels() if max_pixels == "env" else max_pixels
    try:
        with _no_pillow_limit():
            im = Image.open(path)
        with im:
            w, h = im.size
            if limit is not None and w * h > limit:
                raise DataError(
                    f"image {path} is {w}x{h} = {w * h:,} pixels, above the limit of "
                    f"{limit:,} that guards against decompression bombs. If you trust the file, "
                    f"raise the limit, e.g. {MAX_PIXELS_ENV}={w * h} (0 = no limit), or "
                    "downscale it first."
                )
            im.load()
            out = im if mode is None else _to_8bit(im)
            if mode is not None and out.mode != mode:
                out = out.convert(mode)
            return out.copy() if out is im else out
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, InputError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"image {path} does not exist.") from None
        raise DataError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file "
            "(PNG, JPEG, BMP, WebP, GIF or TIFF)."
        ) from None
