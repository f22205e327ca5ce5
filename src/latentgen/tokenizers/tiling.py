"""Tiled decoding: a large code grid decoded in overlapping tiles blended across the seams.

A tokenizer's decoder holds activations of the whole image at once (a taming VQGAN decoder at
1024x1024 keeps several 128-channel full-resolution maps, gigabytes on a CPU). Here the grid is
cut into ``tile x tile`` code tiles that overlap by ``overlap`` codes; each is decoded alone and
written into the image with a weight that ramps from 0 to 1 across the middle half of every
seam it shares with a neighbour (the outer quarter of a tile's overlap, where its zero padding
shows most, gets no weight). Peak memory is then one tile's decode plus the image itself.

Decoders are not strictly local: GroupNorm statistics and the middle attention block see the
whole input, so a blended tiled decode differs a little from a whole one (``tiled_difference``
measures it; docs/sliding_window.md gives the figures). A decoder whose output at a pixel
depends only on nearby codes (``toy.palette``) decodes identically tiled and whole.

``mode="exact"`` removes the difference for the convolutional decoder of the VQ-VAE / VQGAN
tokenizers (``latentgen.tokenizers.networks.Decoder``): its code-resolution part (``conv_in``,
the middle block with its attention, and every level up to the last one with attention) runs
on the whole grid, which is cheap at code resolution; the upsampling part runs tile by tile,
each tile padded by a halo of codes that covers the receptive field of that part, so a tile's
own region is what the whole decode computes there. What a tile cannot see are the GroupNorm
statistics of the whole feature map: pass ``k`` over the tiles sums layer ``k``'s input over
each tile's own region (with the statistics of the layers before already fixed), and a last
pass decodes with all of them fixed. That costs about ``n_norm / 2`` decodes (``n_norm``
GroupNorms in the upsampling part), for a decode equal to the whole one up to float rounding,
with memory still bounded by one tile.

Libraries offer the pieces (``torch.nn.functional.fold`` sums overlapping patches) but not a
decode loop whose peak memory is one tile, so the loop is ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentgen.errors import InputError
from latentgen.tokenizers.base import Tokenizer
from latentgen.tokenizers.networks import Decoder, ResnetBlock

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "TileMode",
    "decode_tiled",
    "exact_tiling_error",
    "exact_tiling_supported",
    "needs_tiling",
    "tile_starts",
    "tiled_difference",
]

#: Tile side in codes (512x512 pixels at f=16). Larger tiles keep GroupNorm statistics closer to
#: the whole image's; smaller ones bound memory tighter.
DEFAULT_TILE = 32
#: Codes two neighbouring tiles share; the blend uses the middle half of them.
DEFAULT_OVERLAP = 8

#: ``"blend"``: tiles decoded alone and cross-faded (one decode's work); ``"exact"``: whole-image
#: GroupNorm statistics and halos, equal to the whole decode (about ``n_norm / 2`` decodes).
TileMode = Literal["blend", "exact"]


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
    mode: TileMode = "blend",
) -> Tensor:
    """Codes ``[B, h, w]`` -> images ``[B, C, h*f, w*f]``, decoded one tile at a time.

    ``blend``: overlapping tiles decoded alone and cross-faded across the seams. ``exact``: the
    whole decode's result, tile by tile (see the module docstring; ``overlap`` is unused, the
    halo follows the decoder). A grid no larger than one tile is decoded whole. Peak memory is
    one tile's decode (for the whole batch) plus the output image.
    """
    if mode not in ("blend", "exact"):
        raise InputError(f"tiled decoding mode must be 'blend' or 'exact', got {mode!r}.")
    th, tw = check_tiling(tile, overlap if mode == "blend" else 0)
    tokenizer.check_codes(codes)
    _, h, w = codes.shape
    if h <= th and w <= tw:
        return tokenizer.decode(codes)
    if mode == "exact":
        return _decode_exact(tokenizer, codes, th, tw)
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
    mode: TileMode = "blend",
) -> float:
    """Largest absolute difference between the tiled and the whole decode of ``codes``."""
    with torch.no_grad():
        whole = tokenizer.decode(codes)
        tiled = decode_tiled(tokenizer, codes, tile, overlap, mode)
    return float((whole - tiled).abs().max())


# -- exact mode ----------------------------------------------------------------------------------
def _conv_decoder(tokenizer: Tokenizer) -> Decoder | None:
    """The tokenizer's ``networks.Decoder`` when it decodes ``post_quant_conv(embed(codes))``."""
    decoder = getattr(tokenizer, "decoder", None)
    quantizer = getattr(tokenizer, "quantizer", None)
    if (
        isinstance(decoder, Decoder)
        and isinstance(getattr(tokenizer, "post_quant_conv", None), nn.Module)
        and callable(getattr(quantizer, "embed", None))
    ):
        return decoder
    return None


def exact_tiling_supported(tokenizer: Tokenizer) -> bool:
    """Whether ``mode="exact"`` can tile this tokenizer's decoder (VQ-VAE / VQGAN ones)."""
    return _conv_decoder(tokenizer) is not None


def exact_tiling_error(tokenizer: Tokenizer) -> str:
    """The message for ``mode="exact"`` on a tokenizer it cannot tile."""
    return (
        f"exact tiled decoding needs the convolutional decoder of a VQ-VAE / VQGAN tokenizer; "
        f"{type(tokenizer).__name__} has none. Use tile_mode='blend' (CLI: --tile-mode blend), "
        "which cross-fades the seams, or decode whole (tiled=False)."
    )


class _Reached(Exception):
    """Raised by the pass that stops at the GroupNorm whose input statistics it gathers."""

    def __init__(self, x: Tensor, groups: int) -> None:
        super().__init__()
        self.x, self.groups = x, groups


def _levels(decoder: Decoder) -> list[Any]:
    """The decoder's levels (``networks._Level``: ``block``, ``attn``, ``upsample``)."""
    return list(decoder.up)


def _first_tiled_level(decoder: Decoder) -> int:
    """Levels above this index run whole (code resolution, and any level with attention)."""
    with_attention = [i for i, level in enumerate(_levels(decoder)) if len(level.attn)]
    return min([decoder.num_resolutions - 1, *with_attention])


def _stem(decoder: Decoder, z: Tensor, first: int) -> Tensor:
    """``conv_in``, the middle block and levels ``n-1 .. first`` (not ``first``'s upsample)."""
    h = decoder.mid(decoder.conv_in(z))
    levels = _levels(decoder)
    for i in range(decoder.num_resolutions - 1, first - 1, -1):
        level = levels[i]
        for j, block in enumerate(level.block):
            h = block(h)
            if len(level.attn):
                h = level.attn[j](h)
        if i > first:
            h = level.upsample(h)
    return h


Norm = Callable[[int, nn.GroupNorm, Tensor], Tensor]


def _tail(decoder: Decoder, h: Tensor, first: int, norm: Norm) -> Tensor:
    """The rest of the decoder from the stem's output, with GroupNorm ``k`` (in the order they
    run) computed by ``norm(k, module, x)``; the ResNet blocks are written out for that."""
    count = 0

    def gn(module: nn.GroupNorm, x: Tensor) -> Tensor:
        nonlocal count
        count += 1
        return norm(count - 1, module, x)

    levels = _levels(decoder)
    if first > 0:
        h = levels[first].upsample(h)
    for i in range(first - 1, -1, -1):
        level = levels[i]
        for b in cast(list[ResnetBlock], list(level.block)):
            t = b.conv1(F.silu(gn(b.norm1, h)))
            t = b.conv2(F.silu(gn(b.norm2, t)))
            h = t + (b.nin_shortcut(h) if b.in_channels != b.out_channels else h)
        if i > 0:
            h = level.upsample(h)
    return decoder.conv_out(F.silu(gn(decoder.norm_out, h)))


def _halo(decoder: Decoder, first: int) -> int:
    """Codes of context a tile needs on each side so that the tail's receptive field (3x3
    convs, the upsampling's 4x4 transposed conv) stays inside it."""
    px = 2 ** (decoder.num_resolutions - 1 - first)  # pixels per code at the stem's output
    reach = 0.0  # in codes
    if first > 0:
        reach, px = reach + 1 / px, px * 2
    for i in range(first - 1, -1, -1):
        reach += 2 * len(_levels(decoder)[i].block) / px  # two 3x3 convs per ResNet block
        if i > 0:
            reach, px = reach + 1 / px, px * 2
    return math.ceil(reach + 1 / px)  # conv_out


def _apply_norm(module: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm of ``x [B, C, H, W]`` with given statistics ``mean, var [B, G]``."""
    b, g = x.shape[0], module.num_groups
    scale = torch.rsqrt(var + module.eps).to(x.dtype)  # [B, G]
    y = (x.view(b, g, -1) - mean.to(x.dtype)[..., None]) * scale[..., None]
    y = y.view_as(x)
    if module.affine:
        y = y * module.weight[None, :, None, None] + module.bias[None, :, None, None]
    return y


def _decode_exact(tokenizer: Tokenizer, codes: Tensor, th: int, tw: int) -> Tensor:
    """The whole decode of ``codes``, computed tile by tile (module docstring)."""
    decoder = _conv_decoder(tokenizer)
    if decoder is None:
        raise InputError(exact_tiling_error(tokenizer))
    _, h, w = codes.shape
    first = _first_tiled_level(decoder)
    halo = _halo(decoder, first)
    tok: Any = tokenizer  # a VQAutoencoder (``_conv_decoder`` checked the parts)
    z = tok.post_quant_conv(tok.quantizer.embed(codes.long()))  # [B, z, h, w]
    stem = _stem(decoder, z.to(decoder.conv_in.weight.dtype), first)  # [B, C, h*p, w*p]
    p = stem.shape[-1] // w  # stem pixels per code
    tiles = [
        (r, min(r + th, h), c, min(c + tw, w)) for r in range(0, h, th) for c in range(0, w, tw)
    ]

    f = tokenizer.downsample

    def run(tile: tuple[int, int, int, int], norm: Norm) -> Tensor:
        """The tail on one tile padded by its halo (clipped at the grid's border)."""
        r0, r1, c0, c1 = tile
        a0, a1, b0, b1 = max(r0 - halo, 0), min(r1 + halo, h), max(c0 - halo, 0), min(c1 + halo, w)
        return _tail(decoder, stem[:, :, a0 * p : a1 * p, b0 * p : b1 * p], first, norm)

    def own(x: Tensor, tile: tuple[int, int, int, int]) -> Tensor:
        """``x`` (a tile's map, at any resolution) over the tile's own codes, halo cut off."""
        r0, r1, c0, c1 = tile
        a0, a1, b0 = max(r0 - halo, 0), min(r1 + halo, h), max(c0 - halo, 0)
        k = x.shape[-2] // (a1 - a0)  # pixels per code at this layer
        return x[:, :, (r0 - a0) * k : (r1 - a0) * k, (c0 - b0) * k : (c1 - b0) * k]

    stats: list[tuple[Tensor, Tensor]] = []  # fixed (mean, var) [B, G] per GroupNorm

    def fixed(k: int, module: nn.GroupNorm, x: Tensor) -> Tensor:
        if k < len(stats):
            return _apply_norm(module, x, *stats[k])
        raise _Reached(x, module.num_groups)

    while True:  # one pass per GroupNorm of the tail, then the decode itself
        total = torch.zeros(3, 1, 1, dtype=torch.float64)  # count, sum, sum of squares [B, G]
        out: Tensor | None = None
        for tile in tiles:
            try:
                y = run(tile, fixed)
            except _Reached as stop:
                part = own(stop.x, tile).double()
                flat = part.reshape(part.shape[0], stop.groups, -1)  # [B, G, n]
                count = torch.full(flat.shape[:2], flat.shape[-1], dtype=torch.float64)
                total = total + torch.stack((count, flat.sum(-1), flat.square().sum(-1)))
                continue
            if out is None:
                out = y.new_zeros(y.shape[0], y.shape[1], h * f, w * f)
            r0, r1, c0, c1 = tile
            out[:, :, r0 * f : r1 * f, c0 * f : c1 * f] = own(y, tile)
        if out is not None:
            return out
        n, s1, s2 = total.to(stem.device)
        mean = s1 / n
        stats.append((mean, (s2 / n - mean.square()).clamp_min(0)))  # biased, as GroupNorm
