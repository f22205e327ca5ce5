"""Line charts as PNG with Pillow alone, for ``latentgen compare``'s learning curves.

matplotlib is not a latentgen dependency (the core install stays light and it is ~40 MB with
its own font and backend machinery); a few axes, ticks and polylines are all a learning curve
needs, and Pillow is already installed for images.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from latentgen.files import atomic_write_bytes

__all__ = ["Panel", "save_line_chart"]

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


@dataclass
class Panel:
    """One chart: a title, axis names and named series of (x, y) points."""

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Sequence[tuple[float, float]]] = field(default_factory=dict)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.4g}"


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 15, y0 + 30, y1 - 45
    draw.text((x0 + 60, y0 + 8), panel.title, fill="black")
    draw.rectangle((left, top, right, bottom), outline="black")
    points = [p for s in panel.series.values() for p in s if all(map(math.isfinite, p))]
    if not points:
        draw.text((left + 10, top + 10), "no data", fill="black")
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ylo, yhi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - xlo) / (xhi - xlo) * (right - left),
            bottom - (y - ylo) / (yhi - ylo) * (bottom - top),
        )

    for t in _ticks(xlo, xhi):
        px = to_px(t, ylo)[0]
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 12, bottom + 6), _label(t), fill="black")
    for t in _ticks(ylo, yhi):
        py = to_px(xlo, t)[1]
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((x0 + 5, py - 6), _label(t), fill="black")
    draw.text(((left + right) // 2 - 20, bottom + 22), panel.xlabel, fill="black")
    draw.text((left + 5, top + 4), panel.ylabel, fill="grey")
    for i, (name, pts) in enumerate(panel.series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [to_px(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), colour)
        draw.text((right - 150, top + 18 + 14 * i), name, fill=colour)


def save_line_chart(
    panels: Sequence[Panel], path: str | os.PathLike[str], panel_size: tuple[int, int] = (480, 340)
) -> None:
    """Draw ``panels`` side by side and write the PNG atomically."""
    w, h = panel_size
    image = Image.new("RGB", (w * max(1, len(panels)), h), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, (i * w, 0, (i + 1) * w, h))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
