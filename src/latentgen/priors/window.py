"""Sliding-window sampling and scoring: any ``(h, w)`` code grid from a prior trained on windows.

A prior trained on ``(wh, ww)`` code windows generates a larger grid by predicting every code
from a window of the trained size around it (Esser et al., arXiv 2012.09841, sec. 3.2, Fig. 3):
centred on the code where possible and shifted inward at the borders, so that it always keeps
its full size; each spatial condition is cropped to the same window. Two modes:

- ``exact``: one window per code, placed by that rule, and one forward of that window per code
  (the reference, as in Taming Transformers' ``sample_conditional.py``);
- ``cached``: the window moves in strides. The grid is cut into bands of ``th`` rows and each
  band into tiles of ``tw`` columns; a tile's window holds the band in its middle rows (or its
  last rows: ``band``; the rows above the band are drawn) and stands ``margin`` columns left of
  the tile (default: centred across), so a code sees about ``(ww - tw) / 2`` columns on either
  side in the rows above it. Each tile keeps its own
  KV cache (a slot of one shared cache) and walks its window in raster order, one position per
  step, as soon as the code at that position is drawn, by itself or by a neighbour: a tile runs
  as far behind its left neighbour, and the tiles of the row above as far ahead of it, as its
  window's reach needs (``plan_wavefront``), so the tiles of a band and the first tiles of the
  next band move as a diagonal wavefront, all in one batched decode step whose rows each have
  their own position. Each code costs a row of such a step (and so does each code of a window
  drawn by a neighbour), each tile one forward of the rows above its band. The number of steps
  is bounded below by ``h * ww``: a code in the first column sees the whole row above within
  its window, and that row is drawn code after code.

``windowed_log_prob`` scores code grids with the same windows per mode, so the likelihood of
each mode can be compared on held-out large grids.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from latentgen.conditioners.base import Conditioning, concat_conditionings
from latentgen.errors import InputError
from latentgen.priors.sampling import draw_fast
from latentgen.specs import SamplerConfig


# What this module uses of ``Prior`` and ``SampleRequest`` (latentgen.priors.base imports this
# module, so it names them structurally rather than importing them back).
class Prior(Protocol):
    @property
    def device(self) -> torch.device: ...

    def code_logits(
        self, codes: Tensor, conds: Mapping[str, Conditioning] | None = None
    ) -> Tensor: ...

    def code_log_probs(
        self, codes: Tensor, conds: Mapping[str, Conditioning] | None = None
    ) -> Tensor: ...

    def window_decoder(self, rows: int, size: tuple[int, int], slots: int = 1) -> WindowDecoder: ...


class SampleRequest(Protocol):
    @property
    def grid(self) -> tuple[int, int]: ...

    @property
    def batch(self) -> int: ...

    @property
    def conds(self) -> dict[str, Conditioning]: ...

    @property
    def prefix(self) -> Tensor | None: ...

    @property
    def rows(self) -> int: ...

    @property
    def sampler(self) -> SamplerConfig: ...

    @property
    def generator(self) -> torch.Generator | None: ...

    @property
    def on_code(self) -> Callable[[int], None] | None: ...

    @property
    def options(self) -> Mapping[str, Any]: ...

    def mix(self, logits: Tensor) -> Tensor: ...

    def expand(self, x: Tensor) -> Tensor: ...

    def pick(self, logits: Tensor, position: int) -> Tensor: ...


__all__ = [
    "Placement",
    "Wave",
    "WindowBand",
    "WindowDecoder",
    "WindowMode",
    "crop_conditions",
    "generation_order",
    "plan_wavefront",
    "plan_windows",
    "sample_windowed",
    "window_origin",
    "windowed_log_prob",
]

WindowMode = Literal["exact", "cached"]
WindowBand = Literal["bottom", "middle"]


@dataclass(frozen=True)
class Placement:
    """One position of the window: its top-left corner and the codes predicted from it.

    ``targets`` are grid positions ``(i, j)`` inside the window, in the window's raster order.
    """

    top: int
    left: int
    targets: tuple[tuple[int, int], ...]


def window_origin(
    i: int, j: int, grid: tuple[int, int], size: tuple[int, int], align: int = 1
) -> tuple[int, int]:
    """Top-left corner of the window that predicts code ``(i, j)`` in ``exact`` mode.

    Centred on the code (``wh // 2`` rows above it, ``ww // 2`` columns to its left) and
    shifted inward at the borders so the window stays inside the grid at full size. ``align``
    snaps the corner down to a multiple of it (a condition coarser than the codes by that
    factor can only be cropped at multiples of it).
    """
    (h, w), (wh, ww) = grid, size
    top = min(max(i - wh // 2, 0), h - wh)
    left = min(max(j - ww // 2, 0), w - ww)
    return top - top % align, left - left % align


def _spans(n: int, size: int, stride: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` spans covering ``0..n``: the first ``size`` long, then ``stride`` each."""
    end = min(size, n)
    yield 0, end
    while end < n:
        start, end = end, min(end + stride, n)
        yield start, end


def _column_tiles(w: int, ww: int, tw: int, margin: int) -> list[tuple[int, int, int]]:
    """``(c0, c1, left)`` per tile of a band: ``[c0, c1)`` drawn from the window at ``left``.

    The window stands ``margin`` columns left of the tile (so ``ww - tw - margin`` to its
    right) and is shifted inward at the borders; the first tile runs up to the right margin
    before the first window's right edge. Neighbouring tiles whose window would stand in the
    same place are one tile.
    """
    out: list[tuple[int, int, int]] = []
    for c0, c1 in _spans(w, tw + margin, tw):
        left = min(max(c0 - margin, 0), w - ww)
        if out and out[-1][2] == left:
            out[-1] = (out[-1][0], c1, left)
        else:
            out.append((c0, c1, left))
    return out


def plan_windows(
    grid: tuple[int, int],
    size: tuple[int, int],
    mode: WindowMode,
    stride: tuple[int, int] | None = None,
    align: int = 1,
    band: WindowBand = "middle",
    margin: int | None = None,
) -> list[Placement]:
    """Where the window stands for each code of an ``(h, w)`` grid.

    ``exact``: one placement per code in raster order (``window_origin``). ``cached``: one
    placement per tile, band by band; ``stride`` ``(th, tw)`` is the tile size after the first
    band (default: half the window's rows, and its columns less a margin of an eighth of them,
    at least 2, on either side; rounded to ``align``); ``band`` puts a band in its window's
    middle rows (``"middle"``, the default: as ``exact`` centres its window; the rows below
    are drawn later and not needed, coming later in the window's raster order) or last rows
    (``"bottom"``: the most rows above). ``margin``: the window's columns left of a tile (the
    rest of ``ww - tw`` is on its right); default half of them. ``generation_order`` gives the
    order in which the codes of all placements are drawn.
    """
    if band not in ("bottom", "middle"):
        raise InputError(f"window_band must be 'bottom' or 'middle', got {band!r}.")
    (h, w), (wh, ww) = grid, size
    if mode == "exact":
        return [
            Placement(*window_origin(i, j, grid, size, align), targets=((i, j),))
            for i in range(h)
            for j in range(w)
        ]
    if stride is None:
        # Half the window down (every band keeps rows above it); across, a margin of an eighth
        # of the window either side (at least 2 codes; 1 in a window under 8 wide): a tile
        # walks ww positions per row whatever its width, so wider tiles mean fewer to step.
        th = max(align, wh // 2 - (wh // 2) % align)
        side = max(ww // 8, min(2, ww // 4))
        side += -side % align
        tw = max(align, ww - 2 * side)
    else:
        th, tw = min(stride[0], wh), min(stride[1], ww)
        if th % align or tw % align:
            raise InputError(
                f"window_stride {stride} must be a multiple of {align}: a spatial condition is "
                f"{align}x coarser than the codes, so windows can only stand at multiples of it."
            )
    if margin is None:
        margin = (ww - tw) // 2
        margin -= margin % align
    elif not 0 <= margin <= ww - tw or margin % align:
        raise InputError(
            f"window_margin={margin} does not fit: a window {ww} codes wide around a tile {tw} "
            f"wide leaves {ww - tw} columns, so the margin left of the tile must be 0 to {ww - tw}"
            + (
                f" and a multiple of {align} (a spatial condition is that much coarser)"
                if align > 1
                else ""
            )
            + "; leave it unset for half of the free columns."
        )
    out = []
    for r0, r1 in _spans(h, wh, th):
        top = r1 - wh
        if band == "middle":
            above = (wh - (r1 - r0)) // 2  # context rows above the band
            above -= above % align  # r0, wh and h are multiples of align: so is the corner
            top = min(max(r0 - above, 0), h - wh)
        for c0, c1, left in _column_tiles(w, ww, tw, margin):
            targets = tuple((i, j) for i in range(r0, r1) for j in range(c0, c1))
            out.append(Placement(top, left, targets))
    return out


def generation_order(placements: list[Placement]) -> list[tuple[int, int, int]]:
    """``(k, i, j)``: code ``(i, j)`` drawn from ``placements[k]``, in drawing order.

    Band by band (placements with the same ``top``), row by row across the band's tiles, left
    to right: a tile draws row ``r`` after its neighbours have drawn row ``r - 1``. For
    ``exact`` placements (one code each) this is raster order.
    """
    keyed = [(p.top, i, k, j) for k, p in enumerate(placements) for i, j in p.targets]
    return [(k, i, j) for _, i, k, j in sorted(keyed)]


def _merged(placements: list[Placement]) -> list[Placement]:
    """Placements at the same corner merged (scoring needs one forward per distinct window)."""
    by_corner: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for p in placements:
        by_corner.setdefault((p.top, p.left), []).extend(p.targets)
    return [Placement(t, left, tuple(sorted(ts))) for (t, left), ts in by_corner.items()]


# -- conditions ------------------------------------------------------------------------------
def _condition_scale(
    name: str, c: Conditioning, grid: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int]:
    """``(up, down)``: the condition grid is ``grid * up / down`` (one of them is 1)."""
    assert c.grid is not None
    (hc, wc), (h, w) = c.grid, grid
    if hc * w != wc * h:
        raise InputError(
            f"condition {name!r} has a {hc}x{wc} grid, whose aspect ratio is not that of the "
            f"{h}x{w} code grid; give a condition of the image's shape (a map of the same size "
            "as the requested image, or a fixed multiple of it)."
        )
    if hc % h == 0:
        return hc // h, 1
    if h % hc == 0 and w % wc == 0:
        down = h // hc
        wh, ww = size
        if wh % down or ww % down:
            raise InputError(
                f"condition {name!r} is {down}x coarser than the codes ({hc}x{wc} for a {h}x{w} "
                f"code grid), so the {wh}x{ww} window cannot crop it evenly; use a window whose "
                f"sides are multiples of {down}."
            )
        return 1, down
    raise InputError(
        f"condition {name!r} has a {hc}x{wc} grid, which is neither the {h}x{w} code grid nor "
        "an integer multiple or fraction of it; give a map whose size matches the requested "
        "image size (or a fixed integer ratio of it)."
    )


def condition_alignment(
    conds: Mapping[str, Conditioning], grid: tuple[int, int], size: tuple[int, int]
) -> int:
    """Window corners must be multiples of this so every spatial condition crops evenly."""
    align = 1
    for name, c in conds.items():
        if c.grid is not None:
            _, down = _condition_scale(name, c, grid, size)
            align = math.lcm(align, down)
    return align


def crop_conditions(
    conds: Mapping[str, Conditioning],
    grid: tuple[int, int],
    top: int,
    left: int,
    size: tuple[int, int],
) -> dict[str, Conditioning]:
    """Each spatial condition cropped to the window at ``(top, left)`` of ``size`` codes.

    A condition whose ``grid`` equals the code grid is cropped to the same cells; one that is
    ``k`` times finer (or coarser) to the same area in its own cells. Conditions without a
    grid (a class label) pass through unchanged.
    """
    out = {}
    for name, c in conds.items():
        if c.grid is None:
            out[name] = c
            continue
        up, down = _condition_scale(name, c, grid, size)
        hc, wc = c.grid
        t, lft = top * up // down, left * up // down
        ch, cw = size[0] * up // down, size[1] * up // down
        tokens = c.tokens.view(c.batch_size, hc, wc)[:, t : t + ch, lft : lft + cw]
        out[name] = replace(c, tokens=tokens.reshape(c.batch_size, ch * cw), grid=(ch, cw))
    return out


# -- the prior side ----------------------------------------------------------------------------
class WindowDecoder(ABC):
    """A prior's logits for several windows at once, each in its own ``slot``: ``start`` a
    window in a slot, then ``logits`` of the slots at increasing positions of their windows.
    A decoder with a KV cache feeds only what is new since a slot's last call (one token per
    slot, for every slot asked, in one batched step); ``start`` forgets the slot's window."""

    @abstractmethod
    def start(self, slot: int, conds: dict[str, Conditioning], top: int, left: int) -> None:
        """Begin the window at ``(top, left)`` in ``slot``; ``conds`` are cropped to it."""

    def running(self, options: Mapping[str, Any]) -> AbstractContextManager[None]:
        """Context the whole draw runs in, given the prior's sampling ``options`` (a cached
        decoder sets the thread count of its small steps); default: nothing."""
        return contextlib.nullcontext()

    @abstractmethod
    def logits(self, slots: Sequence[int], positions: Sequence[int], codes: Tensor) -> Tensor:
        """Logits ``[n, rows, K]`` of each slot's window at its position (window raster order).

        ``codes [B, h, w]`` is the grid as drawn so far; a slot reads the codes of its window
        before its position (the ``rows // B`` copies of a window read the same codes). Within
        one window, positions only increase.
        """


class FullForwardDecoder(WindowDecoder):
    """The decoder of a prior without a cache: a teacher-forced forward of every window asked,
    the windows of one call stacked into batches of at most ``max_windows`` (a wavefront asks
    for many at once, and one forward of them all shares the fixed cost of a forward: 1.5x on
    a 32x32 PixelSNAIL draw, ``benchmarks/sliding_window.py --cacheless``)."""

    #: Most windows (times ``rows``) in one forward.
    max_windows = 64

    def __init__(self, prior: Prior, rows: int, size: tuple[int, int], slots: int = 1) -> None:
        self.prior, self.rows, self.size = prior, rows, size
        self.windows: list[tuple[dict[str, Conditioning], int, int]] = [({}, 0, 0)] * slots

    def start(self, slot: int, conds: dict[str, Conditioning], top: int, left: int) -> None:
        self.windows[slot] = (conds, top, left)

    def logits(self, slots: Sequence[int], positions: Sequence[int], codes: Tensor) -> Tensor:
        out = []
        for at in range(0, len(slots), self.max_windows):
            chunk = slice(at, at + self.max_windows)
            out.append(self._logits(slots[chunk], positions[chunk], codes))
        return torch.cat(out)  # [n, rows, K]

    def _logits(self, slots: Sequence[int], positions: Sequence[int], codes: Tensor) -> Tensor:
        (wh, ww), copies = self.size, self.rows // codes.shape[0]
        wins, conds = [], []
        for slot in slots:
            cond, top, left = self.windows[slot]
            wins.append(codes[:, top : top + wh, left : left + ww].repeat(copies, 1, 1))
            conds.append(cond)
        stacked = {name: concat_conditionings([c[name] for c in conds]) for name in conds[0]}
        logits = self.prior.code_logits(torch.cat(wins), stacked or None)  # [n * rows, T, K]
        logits = logits.view(len(slots), self.rows, *logits.shape[1:])
        index = torch.tensor(list(positions), device=logits.device)
        return logits[torch.arange(len(slots), device=logits.device), :, index]  # [n, rows, K]


# -- the cached wavefront ----------------------------------------------------------------------
@dataclass(frozen=True)
class Wave:
    """One step of the cached wavefront: placements that ``start`` (their window is run up to
    their first code), that ``draw`` the code at their position, and that ``feed`` it (their
    position moves one on). Every placement holds one decoder ``slot`` while it is active."""

    start: tuple[int, ...]
    draw: tuple[int, ...]
    feed: tuple[int, ...]


def plan_wavefront(
    placements: list[Placement], grid: tuple[int, int], size: tuple[int, int]
) -> tuple[list[Wave], list[int]]:
    """The cached placements drawn side by side: ``(waves, slot of each placement)``.

    A placement walks its window in raster order from its first code to its last, one position
    per wave, as soon as the code at its position is drawn (by itself or by a neighbour); it
    starts once every code of its window before its first code is drawn. So a tile runs as far
    behind its left neighbour and the tiles of the row above as its window's reach needs, and
    all tiles that can move move in one batched step. Greedy and value-independent: the plan
    depends on the grid, window and strides only.
    """
    (h, w), ww = grid, size[1]
    drawn = [[False] * w for _ in range(h)]
    first, last, own = [], [], []
    for p in placements:
        local = sorted((i - p.top) * ww + (j - p.left) for i, j in p.targets)
        first.append(local[0])
        last.append(local[-1])
        own.append(set(local))

    def ready(k: int, q: int) -> bool:
        p = placements[k]
        return drawn[p.top + q // ww][p.left + q % ww]

    pending = list(range(len(placements)))
    checked = [0] * len(placements)  # window positions before the first code known drawn
    pos: dict[int, int] = {}  # active placement -> its position
    free: list[int] = []
    slot = [-1] * len(placements)
    n_slots = 0
    waves: list[Wave] = []
    while pending or pos:
        start = []
        for k in pending:
            while checked[k] < first[k] and ready(k, checked[k]):
                checked[k] += 1
            if checked[k] == first[k]:
                start.append(k)
        for k in start:
            pending.remove(k)
            pos[k] = first[k]
            if free:
                slot[k] = free.pop()
            else:
                slot[k], n_slots = n_slots, n_slots + 1
        draw = [k for k, q in pos.items() if q in own[k] and not ready(k, q)]
        for k in draw:
            p, q = placements[k], pos[k]
            drawn[p.top + q // ww][p.left + q % ww] = True
        feed = []
        for k, q in list(pos.items()):
            if not ready(k, q):
                continue
            if q == last[k]:
                del pos[k]
                free.append(slot[k])
                free.sort(reverse=True)  # lowest slot first: active slots stay close together
            else:
                feed.append(k)
                pos[k] = q + 1
        if not (start or draw or feed):
            raise RuntimeError(f"the wavefront stalled with {len(pending)} windows waiting")
        waves.append(Wave(tuple(start), tuple(draw), tuple(feed)))
    return waves, slot


def _pick_many(request: SampleRequest, logits: Tensor, positions: Tensor) -> Tensor:
    """Codes ``[B, n]`` from ``logits [n, rows, K]`` at raster ``positions [n]``: guide, draw
    (one batched draw), keep the prefix's given codes."""
    mixed = request.mix(logits.transpose(0, 1))  # [B, n, K]
    b, n, k = mixed.shape
    codes = draw_fast(mixed.reshape(b * n, k), request.sampler, request.generator).view(b, n)
    if request.prefix is not None:
        given = request.prefix.view(b, -1)[:, positions]  # [B, n]
        codes = torch.where(given >= 0, given, codes)
    if request.on_code is not None:
        for _ in range(n):  # one report per drawn position, as when drawn one at a time
            request.on_code(b)
    return codes


def _run_waves(
    request: SampleRequest,
    size: tuple[int, int],
    placements: list[Placement],
    waves: list[Wave],
    slot: list[int],
    decoder: WindowDecoder,
    out: Tensor,
    bar: tqdm,
) -> None:
    """Draw ``out [B, h, w]`` in place along ``waves``: starts (a forward each), batched draws,
    batched feeds."""
    w, ww = request.grid[1], size[1]
    held: dict[int, Tensor] = {}  # placement -> logits [rows, K] of its position
    pos: dict[int, int] = {}
    for wave in waves:
        if wave.start:
            for k in wave.start:
                p = placements[k]
                conds = crop_conditions(request.conds, request.grid, p.top, p.left, size)
                decoder.start(slot[k], conds, p.top, p.left)
                (i, j) = p.targets[0]
                pos[k] = (i - p.top) * ww + j - p.left
            got = decoder.logits([slot[k] for k in wave.start], [pos[k] for k in wave.start], out)
            held.update(zip(wave.start, got.unbind(0)))
        if wave.draw:
            it = torch.tensor([placements[k].top + pos[k] // ww for k in wave.draw])
            jt = torch.tensor([placements[k].left + pos[k] % ww for k in wave.draw])
            logits = torch.stack([held.pop(k) for k in wave.draw])  # [n, rows, K]
            out[:, it, jt] = _pick_many(request, logits, it * w + jt)
            bar.update(len(wave.draw))
        if wave.feed:
            for k in wave.feed:
                pos[k] += 1
            got = decoder.logits([slot[k] for k in wave.feed], [pos[k] for k in wave.feed], out)
            held.update(zip(wave.feed, got.unbind(0)))


# -- sampling ----------------------------------------------------------------------------------
def sample_windowed(
    prior: Prior,
    request: SampleRequest,
    size: tuple[int, int],
    mode: WindowMode,
    progress: bool = False,
    stride: tuple[int, int] | None = None,
    band: WindowBand = "middle",
    margin: int | None = None,
) -> Tensor:
    """Draw codes ``[B, h, w]`` for a checked ``request`` with a sliding ``size`` window.

    ``exact``: one placement at a time in one decoder slot. ``cached``: the tiles of
    ``plan_windows`` move together along ``plan_wavefront``, one batched step per wave.
    """
    h, w = request.grid
    device = prior.device
    b = request.batch
    align = condition_alignment(request.conds, request.grid, size)
    placements = plan_windows(request.grid, size, mode, stride, align, band, margin)
    out = torch.zeros(b, h, w, dtype=torch.long, device=device)
    if request.prefix is not None:
        out = torch.where(request.prefix >= 0, request.prefix, out)
    bar = tqdm(total=h * w, desc=f"sampling ({mode} window)", unit="code", disable=not progress)
    with bar:
        if mode == "cached":
            waves, slot = plan_wavefront(placements, request.grid, size)
            decoder = prior.window_decoder(request.rows, size, max(slot) + 1)
            with decoder.running(request.options):
                _run_waves(request, size, placements, waves, slot, decoder, out, bar)
        else:
            decoder = prior.window_decoder(request.rows, size, 1)
            with decoder.running(request.options):
                _run_exact(request, size, placements, decoder, out, bar)
    return out


def _run_exact(
    request: SampleRequest,
    size: tuple[int, int],
    placements: list[Placement],
    decoder: WindowDecoder,
    out: Tensor,
    bar: tqdm,
) -> None:
    """One window per code, in raster order, in decoder slot 0."""
    w, ww = request.grid[1], size[1]
    for p in placements:
        ((i, j),) = p.targets
        conds = crop_conditions(request.conds, request.grid, p.top, p.left, size)
        decoder.start(0, conds, p.top, p.left)
        local = (i - p.top) * ww + (j - p.left)
        logits = decoder.logits([0], [local], out)[0]  # [rows, K]
        out[:, i, j] = request.pick(logits, i * w + j)
        bar.update(1)


# -- scoring -----------------------------------------------------------------------------------
def windowed_log_prob(
    prior: Prior,
    codes: Tensor,
    conds: Mapping[str, Conditioning],
    size: tuple[int, int],
    mode: WindowMode,
    stride: tuple[int, int] | None = None,
    per_code: bool = False,
    windows_per_batch: int = 16,
    band: WindowBand = "middle",
    margin: int | None = None,
) -> Tensor:
    """Log-likelihood ``[B]`` (nats) of code grids ``[B, h, w]`` under the ``mode`` windows.

    Each code is scored from the window that would draw it in ``mode``; windows at the same
    corner share one teacher-forced forward, and ``windows_per_batch`` windows run as one
    batch. ``per_code=True`` returns the ``[B, h, w]`` log-probabilities instead of their sum.
    """
    b, h, w = codes.shape
    wh, ww = size
    align = condition_alignment(conds, (h, w), size)
    placements = _merged(plan_windows((h, w), size, mode, stride, align, band, margin))
    logp = torch.zeros(b, h, w, device=codes.device)
    for first in range(0, len(placements), windows_per_batch):
        chunk = placements[first : first + windows_per_batch]
        crops = torch.cat([codes[:, p.top : p.top + wh, p.left : p.left + ww] for p in chunk])
        cropped = [crop_conditions(conds, (h, w), p.top, p.left, size) for p in chunk]
        stacked = {
            name: replace(
                cropped[0][name],
                tokens=torch.cat([c[name].tokens for c in cropped]),
                drop=None
                if cropped[0][name].drop is None
                else torch.cat([c[name].drop for c in cropped]),  # type: ignore[misc]
            )
            for name in conds
        }
        lp = prior.code_log_probs(crops, stacked).view(len(chunk), b, wh, ww)  # [n, B, wh, ww]
        for k, p in enumerate(chunk):
            ii = torch.tensor([i for i, _ in p.targets], device=codes.device)
            jj = torch.tensor([j for _, j in p.targets], device=codes.device)
            logp[:, ii, jj] = lp[k][:, ii - p.top, jj - p.left]
    return logp if per_code else logp.flatten(1).sum(1)
