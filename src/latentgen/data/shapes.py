"""Synthetic "shapes": seeded images with paired label, segmentation, depth and pose.

Every item is rendered from its own seed (``seed + index``), so item ``i`` is the same in any
order, on any machine, at any resolution, and no download is needed. Each image shows one main
shape (its class is the label) in front of up to two smaller distractors, on a gradient
background. The paired conditions are exact by construction:

- ``label``: class of the main shape (``CLASSES``); shapes turn freely except squares and
  diamonds, which stay within 10 degrees of upright (a diamond is a square on its corner);
- ``segmentation``: ``[H, W]`` long, 0 = background, ``c + 1`` = a pixel of a class-``c`` shape;
- ``depth``: ``[1, H, W]`` in [-1, 1] (-1 near, 1 far), background a tilted far plane;
- ``pose``: ``[5, 3]`` keypoints (x, y in [0, 1], visibility) of the main shape: centre and the
  four corners of its rotated bounding square.

With ``scene_fraction`` > 0, that fraction of the items are instead windows cut from a 2x2
mosaic of items (the layout ``conditioners.scene.shapes_scene`` makes at any size), at an
offset that is a multiple of ``scene_align`` pixels. Such a window has no one main shape: its
label is -1 (unlabelled, the prior's null label) and its pose keypoints are all invisible. A
prior trained on them has seen what a sliding window sees inside a large scene.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from latentgen.data.base import ImageDataset
from latentgen.specs import ComponentConfig

__all__ = ["CLASSES", "ShapesConfig", "ShapesDataset", "render_scene_window", "render_shapes"]

CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")
_UPRIGHT = ("square", "diamond")  # classes drawn near upright (see render_shapes)
NUM_KEYPOINTS = 5


class ShapesConfig(ComponentConfig):
    """Config of the built-in ``shapes`` dataset."""

    type: Literal["shapes"] = "shapes"
    size: int = Field(1024, ge=1, le=10_000_000, description="Number of items.")
    image_size: int = Field(32, ge=8, le=4096, description="Height and width in pixels.")
    num_classes: int = Field(
        len(CLASSES), ge=1, le=len(CLASSES), description=f"Use the first n of {CLASSES}."
    )
    max_distractors: int = Field(2, ge=0, le=8, description="Smaller shapes behind the main one.")
    seed: int = Field(0, ge=0, description="Item i is rendered from seed + i.")
    scene_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of items that are a window cut from a 2x2 mosaic of items "
        "(label -1: unlabelled), so a prior learns the layouts a sliding window sees in a scene.",
    )
    scene_align: int = Field(
        4,
        ge=1,
        description="A scene window's offset is a multiple of this many pixels: the tokenizer's "
        "downsample factor, so the window's codes line up with the scene's.",
    )


def _inside(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of a unit shape in its own rotated frame (u, v in about [-1, 1])."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if kind == "triangle":
        return (v <= 0.7) & (v >= -0.9 + 2 * np.abs(u) * 0.95 - 0.2)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.35)
    raise ValueError(kind)


def render_shapes(index: int, config: ShapesConfig) -> dict[str, Any]:
    """Render item ``index``: the image in [-1, 1] and its paired conditions (see module doc)."""
    rng = np.random.default_rng(config.seed + index)
    n = config.image_size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx = (xx + 0.5) / n
    yy = (yy + 0.5) / n

    # Background: a colour gradient and a tilted far depth plane.
    c0, c1 = rng.uniform(0.0, 0.6, 3), rng.uniform(0.0, 0.6, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5  # [H, W]
    image = c0[:, None, None] * (1 - t) + c1[:, None, None] * t  # [3, H, W]
    depth = 0.9 + 0.1 * t
    seg = np.zeros((n, n), dtype=np.int64)

    label = int(rng.integers(config.num_classes))
    n_distract = int(rng.integers(config.max_distractors + 1))
    # Painter's order: distractors first (far), the main shape last (near).
    shapes = [(int(rng.integers(config.num_classes)), False) for _ in range(n_distract)]
    shapes.append((label, True))
    keypoints = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    for k, (cls, main) in enumerate(shapes):
        radius = rng.uniform(0.22, 0.32) if main else rng.uniform(0.08, 0.16)
        cx, cy = rng.uniform(radius, 1 - radius, 2)
        rot = rng.uniform(0, 2 * math.pi)
        if CLASSES[cls] in _UPRIGHT:
            # A square turned by 45 degrees is a diamond: these two keep within +-10 degrees of
            # upright (a square sits on a side, a diamond on a corner), or no one could tell
            # them apart. Same draw as the others, so every other item renders unchanged.
            rot = (rot % (math.pi / 2)) / 4.5 - math.pi / 18  # in [-10, 10) degrees
        cos, sin = math.cos(rot), math.sin(rot)
        dx, dy = (xx - cx) / radius, (yy - cy) / radius
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        mask = _inside(CLASSES[cls], u, v)
        colour = rng.uniform(0.45, 1.0, 3)
        shade = 1.0 - 0.25 * np.clip(u * 0.5 + v * 0.5, -1, 1)  # a little light from one side
        image = np.where(mask[None], colour[:, None, None] * shade[None], image)
        d = (0.15 if main else 0.5 + 0.1 * k) + 0.05 * v
        depth = np.where(mask, d, depth)
        seg = np.where(mask, cls + 1, seg)
        if main:
            corners = [(0.0, 0.0), (-1, -1), (1, -1), (1, 1), (-1, 1)]
            for j, (a, b) in enumerate(corners):
                px = cx + radius * (cos * a - sin * b)
                py = cy + radius * (sin * a + cos * b)
                vis = float(0 <= px <= 1 and 0 <= py <= 1)
                keypoints[j] = (np.clip(px, 0, 1), np.clip(py, 0, 1), vis)

    img = torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)) * 2 - 1
    return {
        "image": img,  # [3, H, W] in [-1, 1]
        "label": label,
        "segmentation": torch.from_numpy(seg),  # [H, W] long
        # the tilted background plane can leave [0, 1] in the corners: clip, so depth is in [-1, 1]
        "depth": torch.from_numpy(np.clip(depth, 0, 1).astype(np.float32))[None] * 2 - 1,
        "pose": torch.from_numpy(keypoints),  # [5, 3]
    }


class ShapesDataset(ImageDataset):
    """The built-in synthetic dataset (see the module docstring); no files, no download."""

    Config = ShapesConfig
    classes: tuple[str, ...] = CLASSES

    def __init__(self, config: ShapesConfig) -> None:
        super().__init__(config)
        self.classes: tuple[str, ...] = CLASSES[: config.num_classes]  # labels it draws

    def __len__(self) -> int:
        return int(self.config.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} shapes")
        index = index % len(self)
        if self.config.scene_fraction > 0:
            rng = np.random.default_rng((self.config.seed, index, _SCENE_STREAM))
            if rng.random() < self.config.scene_fraction:
                return render_scene_window(index, self.config, rng)
        return render_shapes(index, self.config)


#: Seeds the draws of scene windows apart from the items' own ``seed + index`` streams.
_SCENE_STREAM = 7919


def render_scene_window(
    index: int, config: ShapesConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """An ``image_size`` window of a 2x2 mosaic of items, at a ``scene_align`` offset."""
    n, align = config.image_size, config.scene_align
    cells = config.model_copy(update={"seed": config.seed + _SCENE_STREAM * 10**6 + 4 * index})
    items = [render_shapes(k, cells) for k in range(4)]

    def mosaic(key: str) -> torch.Tensor:  # [..., 2n, 2n]
        top = torch.cat([items[0][key], items[1][key]], dim=-1)
        bottom = torch.cat([items[2][key], items[3][key]], dim=-1)
        return torch.cat([top, bottom], dim=-2)

    top, left = (int(align * rng.integers(0, n // align + 1)) for _ in range(2))
    window = {
        k: mosaic(k)[..., top : top + n, left : left + n]
        for k in ("image", "segmentation", "depth")
    }
    return {
        **window,
        "label": -1,  # no one main shape: unlabelled (the prior's null label)
        "pose": torch.zeros(NUM_KEYPOINTS, 3),  # no main shape: every keypoint invisible
    }
