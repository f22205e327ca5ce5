"""Page values -> raw conditions: the class palette, painted and uploaded maps, upload files.

Nothing here imports gradio: the page hands plain values (arrays, file paths, text) in, and
what comes out is exactly what ``latentgen sample -c NAME=@FILE`` would read, so the page and
the command line it prints draw the same images.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from latentgen.conditioners.base import RawInput
from latentgen.errors import InputError

__all__ = [
    "class_choices",
    "keypoint_picture",
    "label_map_from_colours",
    "label_map_from_painting",
    "palette",
    "palette_hex",
    "save_condition",
]

# Class 0 (usually background) is black; then colours far apart from each other and from black.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (255, 255, 255),
)


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, class id -> colour (the fixed list, then golden-ratio hues)."""
    out = list(_BASE_PALETTE[:n])
    k = 0
    while len(out) < n:
        k += 1
        hue = (k * 0.618033988749895) % 1.0
        light = 0.35 + 0.3 * ((k // 7) % 2)
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.9)
        colour = (round(r * 255), round(g * 255), round(b * 255))
        if colour not in out:
            out.append(colour)
    return out


def palette_hex(n: int) -> list[str]:
    """``palette(n)`` as ``#rrggbb`` strings (the canvas brush colours)."""
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in palette(n)]


def class_choices(spec: RawInput, card_names: Any = None) -> list[tuple[str, int]]:
    """Dropdown entries ``(shown text, class index)``: names from the conditioner, else the card."""
    count = spec.count or len(spec.names)
    names = list(spec.names)
    if not names and isinstance(card_names, (list, tuple)) and len(card_names) == count:
        names = [str(n) for n in card_names]
    return [(f"{i}: {names[i]}" if names else str(i), i) for i in range(count)]


def _nearest_class(
    rgb: np.ndarray[Any, Any], colours: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """Pixels ``[H, W, 3]`` -> index ``[H, W]`` of the nearest palette colour ``[K, 3]``."""
    d = ((rgb[:, :, None, :].astype(np.int32) - colours[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1)


def label_map_from_painting(
    image: np.ndarray[Any, Any], num_classes: int, size: tuple[int, int]
) -> np.ndarray[Any, Any]:
    """A painted canvas ``[h, w, 3|4]`` -> class ids ``[H, W]`` uint8/uint16 at ``size``.

    Unpainted (transparent) pixels are class 0; a painted pixel takes the class of the nearest
    palette colour (the brush's soft edges blend colours, so exact matching would refuse most
    strokes). The canvas has no size of its own: it is resized to the image size (nearest).
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"the painted map must be an RGB(A) image, got shape {arr.shape}.")
    rgb = arr[:, :, :3]
    ids = _nearest_class(rgb, np.asarray(palette(num_classes)))
    if arr.shape[2] == 4:
        ids = np.where(arr[:, :, 3] < 128, 0, ids)
    small = _id_image(ids, num_classes)
    return np.asarray(small.resize((size[1], size[0]), Image.Resampling.NEAREST))


def label_map_from_colours(image: Any, num_classes: int) -> np.ndarray[Any, Any]:
    """An uploaded colour map (PIL RGB/RGBA) -> class ids ``[H, W]``; every colour must be one of
    the palette's exactly (a colour map is not painted with soft edges)."""
    rgb = np.asarray(image.convert("RGB"))
    colours = np.asarray(palette(num_classes))
    ids = _nearest_class(rgb, colours)
    unknown = np.any(rgb != colours[ids], axis=-1)
    if unknown.any():
        found = np.unique(rgb[unknown].reshape(-1, 3), axis=0)
        shown = ", ".join(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        legend = ", ".join(f"{i} {h}" for i, h in enumerate(palette_hex(num_classes)))
        raise InputError(
            f"the segmentation map has {int(unknown.sum())} pixels in colours that are not in "
            f"the class palette ({shown}{more}). Use the palette's colours (class {legend}) "
            "or upload a greyscale or palette PNG of class ids."
        )
    return np.asarray(_id_image(ids, num_classes))


def _id_image(ids: np.ndarray[Any, Any], num_classes: int) -> Any:
    """Class ids ``[H, W]`` -> a greyscale PIL image that ``read_image`` gives back unchanged."""
    from PIL import Image

    if num_classes <= 256:
        return Image.fromarray(ids.astype(np.uint8), mode="L")
    return Image.fromarray(ids.astype(np.uint16))  # 16-bit greyscale PNG


def save_condition(kind: str, value: Any, folder: Path, name: str, num_classes: int = 0) -> str:
    """Write one condition into ``folder`` as the command line reads it; returns ``-c``'s VALUE.

    ``value`` is a class index ("class"), class ids ``[H, W]`` ("label_map"), an uploaded
    file's path ("image", or any kind given as a file), or JSON text ("keypoints", "value").
    """
    if kind == "class":
        return str(int(value))
    if kind == "label_map" and isinstance(value, np.ndarray):
        path = folder / f"cond-{name}.png"
        _id_image(value, num_classes).save(path)
        return f"@{path}"
    if isinstance(value, (str, os.PathLike)) and kind != "value" and Path(value).is_file():
        src = Path(value)
        path = folder / f"cond-{name}{src.suffix.lower()}"
        shutil.copyfile(src, path)
        return f"@{path}"
    text = str(value).strip()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if kind == "keypoints":
            raise InputError(
                f"condition '{name}': the keypoints are not valid JSON ({e.msg} at line "
                f"{e.lineno} column {e.colno}); write [[x, y, visibility], ...] with x, y in "
                "[0, 1]."
            ) from None
        return text  # a bare word, as `-c name=shirt` passes it
    if kind == "keypoints":
        path = folder / f"cond-{name}.json"
        path.write_text(text + "\n")
        return f"@{path}"
    return text


def keypoint_picture(points: Any, side: int, count: int) -> Any:
    """A ``side`` x ``side`` picture of keypoints ``[[x, y, v], ...]`` (x, y in [0, 1]): one
    numbered dot per visible keypoint, coloured as the palette's classes 1, 2, ..."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    colours = palette(count + 1)[1:]
    r = max(3, side // 40)
    for i, p in enumerate(points if isinstance(points, list) else []):
        try:
            x, y, v = float(p[0]) * side, float(p[1]) * side, float(p[2])
        except (TypeError, ValueError, IndexError):
            continue  # not a keypoint: the conditioner names the problem when it is used
        if v <= 0 or i >= count:
            continue
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colours[i], outline=(0, 0, 0))
        draw.text((x + r + 1, y - r), str(i), fill=(0, 0, 0))
    return image
