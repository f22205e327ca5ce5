"""Tiled decoding: a large code grid decoded in overlapping tiles blended across the seams.

A tokenizer's decoder holds activations of the whole image at once (a taming VQGAN decoder at
1024x1024 keeps several 128-channel full-resolution maps, gigabytes on a CPU). Here the grid is
cut into ``tile x tile`` code tiles that overlap by ``overlap`` codes; each is decoded alone and
written into the image with a weight that ramps from 0 to 1 across the middle half of every
seam it shares with a neighbour (the outer quarter of a tile's overlap, where its zero padding
shows most, gets no weight). Peak memory is then one tile's decode plus the image itself.

Decoders are not strictly local: GroupNorm statistics and the middle attention block see the
whole input, so a tiled decode differs a little from a whole one (``tiled_difference`` measures
it; docs/sliding_window.md gives the figures). A decoder whose output at a pixel depends only
on nearby codes (``toy.palette``) decodes identically tiled and whole.

Libraries offer the pieces (``torch.nn.functional.fold`` sums overlapping patches) but not a
decode loop whose peak memory is one tile, so the loop is ours.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentgen.errors import InputError
from latentgen.tokenizers.base import Tokenizer

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "decode_tiled",
    "needs_tiling",
    "tile_starts",
    "tiled_difference",
]

#: Tile side in codes (512x512 pixels at f=16). Larger tiles keep GroupNorm statistics closer to
#: the whole image's; smaller ones bound memory tighter.
DEFAULT_TILE = 32
#: Codes two neighbouring tiles share; the blend uses the middle half of them.
DEFAULT_OVERLAP = 8


def _pair(tile: int | tuple[int, int]) -> tuple[int, int]:
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


def check_tiling(tile: int | tuple[int, int], overlap: int) -> tuple[int, int]:
    """The tile ``(th, tw)``; raises ``InputError`` for a tile or overlap that cannot work."""
    th, tw = _pair(tile)
    if th < 1 or tw < 1:
        raise InputError(f"tile must be at least 1x1 codes, got {th}x{tw}; e.g. tile=16.")
    if overlap < 0 or overlap >= min(th, tw):
        raise InputError(
            f"overlap must lie in [0, {min(th, tw)}) codes for a {th}x{tw} tile, got {overlap}: "
            "tiles must advance. Use a larger tile or a smaller overlap (e.g. tile // 4)."
        )
    return th, tw


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """First code of each tile along a side of ``n`` codes: as few tiles as cover it with at
    least ``overlap`` codes shared by neighbours, spread evenly (``[0]`` when one tile does)."""
    if n <= tile:
        return [0]
    k = math.ceil((n - tile) / (tile - overlap)) + 1  # tiles needed
    return [round(i * (n - tile) / (k - 1)) for i in range(k)]


def needs_tiling(grid: tuple[int, int], tile: int | tuple[int, int] = DEFAULT_TILE) -> bool:
    """Whether an ``(h, w)`` code grid is larger than one tile (the automatic rule)."""
    th, tw = _pair(tile)
    return grid[0] > th or grid[1] > tw


def _ramps(starts: list[int], tile: int, n: int, f: int, device: torch.device) -> list[Tensor]:
    """Per tile, its 1-D pixel weights ``[tile * f]`` along one side.

    Where tile ``k`` overlaps tile ``k + 1`` (``p`` pixels), tile ``k + 1``'s weight rises from
    0 to 1 over the middle half of them and tile ``k``'s falls by the same amount, so the two
    sum to 1 across the seam; sides on the image border keep weight 1.
    """
    length = min(tile, n) * f
    out = []
    for k, s in enumerate(starts):
        w = torch.ones(length, device=device)
        x = torch.arange(length, device=device, dtype=torch.float32) + 0.5
        p = (starts[k - 1] + tile - s) * f if k > 0 else 0
        if p > 0:  # seam with the previous tile: pixels [0, p) of this tile
            w = torch.minimum(w, ((x - p / 4) / (p / 2)).clamp(0, 1))
        p = (s + tile - starts[k + 1]) * f if k + 1 < len(starts) else 0
        if p > 0:  # seam with the next tile: its last p pixels
            w = torch.minimum(w, ((length - x - p / 4) / (p / 2)).clamp(0, 1))
        out.append(w)
    return out


def decode_tiled(
    tokenizer: Tokenizer,
    codes: Tensor,
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> Tensor:
    """Codes ``[B, h, w]`` -> images ``[B, C, h*f, w*f]``, decoded one overlapping tile at a time.

    A grid no larger than one tile is decoded whole. Peak memory is one ``tile`` decode (for
    the whole batch) plus the output image and its weight map.
    """
    th, tw = check_tiling(tile, overlap)
    tokenizer.check_codes(codes)
    _, h, w = codes.shape
    if h <= th and w <= tw:
        return tokenizer.decode(codes)
    f = tokenizer.downsample
    rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy = _ramps(rows, th, h, f, codes.device)
    wx = _ramps(cols, tw, w, f, codes.device)
    out: Tensor | None = None
    total = torch.zeros(h * f, w * f, device=codes.device)  # [H, W] summed weights
    for r, ry in zip(rows, wy, strict=True):
        for c, rx in zip(cols, wx, strict=True):
            piece = tokenizer.decode(codes[:, r : r + th, c : c + tw])  # [B, C, th*f, tw*f]
            if out is None:
                out = piece.new_zeros(codes.shape[0], piece.shape[1], h * f, w * f)
            weight = ry[:, None] * rx[None, :]  # [th*f, tw*f]
            ys, xs = slice(r * f, r * f + piece.shape[2]), slice(c * f, c * f + piece.shape[3])
            out[:, :, ys, xs] += piece * weight.to(piece.dtype)
            total[ys, xs] += weight
            del piece  # free this tile's decode before the next one
    assert out is not None
    # Neighbouring ramps sum to 1 across a seam; dividing by the summed weights keeps that
    # exact where rounding the tile positions left seams of unequal width.
    return out / total.clamp_min(1e-6).to(out.dtype)


def tiled_difference(
    tokenizer: Tokenizer,
    codes: Tensor,
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> float:
    """Largest absolute difference between the tiled and the whole decode of ``codes``."""
    with torch.no_grad():
        whole = tokenizer.decode(codes)
        tiled = decode_tiled(tokenizer, codes, tile, overlap)
    return float((whole - tiled).abs().max())
