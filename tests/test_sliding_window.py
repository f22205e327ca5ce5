"""Sliding-window sampling and scoring: any grid from a prior trained on a small window."""

from __future__ import annotations

import pytest
import torch

from examples import full_forward_windows
from latentgen.conditioners.base import Conditioning, concat_conditionings
from latentgen.errors import InputError
from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
from latentgen.priors.window import (
    FullForwardDecoder,
    crop_conditions,
    generation_order,
    plan_wavefront,
    plan_windows,
    sample_windowed,
    window_origin,
    windowed_log_prob,
)
from latentgen.specs import SamplerConfig

K = 16


def _prior(
    positions: str = "learned", layout: str = "prefix", neighbours=(0, 0), **conditions
) -> TransformerPrior:
    torch.manual_seed(0)
    cfg = TransformerPriorConfig(
        neighbours=neighbours,
        vocab_size=K,
        block_size=16,  # a 4x4 window
        n_layer=2,
        n_head=2,
        n_embd=32,
        conditions=conditions,
        cond_dropout=0.1 if conditions else 0.0,
        positions=positions,
        layout=layout,
    )
    prior = TransformerPrior(cfg).eval()
    # Sharper than the initialisation, so that samples depend on their context.
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(8.0)
    return prior


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _label(b: int = 2) -> dict[str, Conditioning]:
    return {"label": Conditioning(torch.tensor([[1], [2]])[:b], vocab_size=3)}


# -- where the window stands ------------------------------------------------------------------
def test_window_is_centred_and_shifted_inward_at_the_borders():
    grid, size = (10, 12), (4, 6)
    assert window_origin(0, 0, grid, size) == (0, 0)
    assert window_origin(5, 6, grid, size) == (3, 3)  # centred: 2 rows above, 3 columns left
    assert window_origin(9, 11, grid, size) == (6, 6)  # bottom-right corner: shifted inward
    assert window_origin(1, 11, grid, size) == (0, 6)
    assert window_origin(8, 2, grid, size) == (6, 0)
    assert window_origin(5, 7, grid, size, align=2) == (2, 4)


@pytest.mark.parametrize(
    ("mode", "band"), [("exact", "bottom"), ("cached", "bottom"), ("cached", "middle")]
)
@pytest.mark.parametrize("grid", [(4, 4), (9, 7), (4, 13), (12, 4), (12, 16)])
@pytest.mark.parametrize("stride", [None, (1, 1), (2, 3)])
def test_every_code_is_drawn_once_from_a_full_window_with_its_context_drawn(
    mode, band, grid, stride
):
    size = (4, 4)
    placements = plan_windows(grid, size, mode, stride, band=band)
    done = torch.zeros(grid, dtype=torch.bool)
    for p in placements:
        assert 0 <= p.top <= grid[0] - 4 and 0 <= p.left <= grid[1] - 4  # full size, inside
    for k, i, j in generation_order(placements):
        p = placements[k]
        li, lj = i - p.top, j - p.left
        assert 0 <= li < 4 and 0 <= lj < 4
        window = done[p.top : p.top + 4, p.left : p.left + 4].flatten()
        assert window[: li * 4 + lj].all(), (mode, p, (i, j))  # all context is known
        assert not done[i, j]
        done[i, j] = True
    assert done.all()
    if mode == "cached" and stride is None:  # the window moves once per tile, not per code
        assert len(placements) < grid[0] * grid[1] / 3


def test_cached_tiles_move_in_strides_centred_across():
    placements = plan_windows((8, 8), (4, 4), "cached", stride=(2, 2), band="bottom")
    assert [(p.top, p.left, len(p.targets)) for p in placements[:4]] == [
        (0, 0, 12),  # the first band: 4 rows; the first tile up to a column before its edge
        (0, 2, 8),  # then two columns at a time, the window one column wider on each side
        (0, 4, 12),  # at the right border the window stops moving: the last tile takes 3
        (2, 0, 6),  # the next band: two rows, the window's bottom on the band's
    ]
    assert {j for _, j in placements[1].targets} == {3, 4}  # columns 2..5 in the window
    # a band is drawn row by row across its tiles
    order = [(i, j) for k, i, j in generation_order(placements) if placements[k].top == 2]
    assert order[:8] == [(4, j) for j in range(8)]
    # band="middle" (the default): the band stands in its window's middle rows (one row above
    # it, one below)
    middle = plan_windows((8, 8), (4, 4), "cached", stride=(2, 2))
    tops = {min(i for i, _ in p.targets): p.top for p in middle}
    assert tops == {0: 0, 4: 3, 6: 4}  # the first band fills its window; the last shifts up
    with pytest.raises(InputError, match="window_band must be 'bottom' or 'middle'"):
        plan_windows((8, 8), (4, 4), "cached", band="top")


@pytest.mark.parametrize(
    ("grid", "size", "stride", "band"),
    [
        ((9, 13), (4, 4), None, "bottom"),
        ((16, 24), (4, 4), (2, 3), "bottom"),
        ((32, 32), (8, 8), None, "bottom"),
        ((16, 24), (4, 4), (2, 3), "middle"),
        ((32, 32), (8, 8), None, "middle"),
    ],
)
def test_the_wavefront_draws_each_code_after_its_window_context(grid, size, stride, band):
    (h, w), (wh, ww) = grid, size
    placements = plan_windows(grid, size, "cached", stride, band=band)
    waves, slot = plan_wavefront(placements, grid, size)
    drawn = torch.zeros(grid, dtype=torch.bool)
    pos: dict[int, int] = {}

    def cell(k: int, q: int) -> tuple[int, int]:
        return placements[k].top + q // ww, placements[k].left + q % ww

    def context_drawn(k: int, q: int) -> bool:
        p = placements[k]
        return bool(drawn[p.top : p.top + wh, p.left : p.left + ww].flatten()[:q].all())

    for wave in waves:
        for k in wave.start:
            i, j = placements[k].targets[0]
            pos[k] = (i - placements[k].top) * ww + j - placements[k].left
            assert context_drawn(k, pos[k])  # started once everything before its code is drawn
        active = [slot[k] for k in pos]
        assert len(set(active)) == len(active)  # a slot holds one window at a time
        for k in wave.draw:
            assert cell(k, pos[k]) in placements[k].targets and not drawn[cell(k, pos[k])]
            assert context_drawn(k, pos[k])
        for k in wave.draw:
            drawn[cell(k, pos[k])] = True
        for k in wave.feed:
            assert drawn[cell(k, pos[k])]  # only drawn codes are fed
            pos[k] += 1
        for k in [k for k in pos if k not in wave.feed and drawn[cell(k, pos[k])]]:
            del pos[k]  # finished: its last code is drawn
    assert drawn.all() and not pos
    # Several tiles move per step: the steps are near the bound of h * ww (a first-column code
    # sees the whole row above it in its window, drawn code after code), far below h * w.
    assert h * ww <= len(waves) <= h * ww + w
    assert sum(len(wave.draw) for wave in waves) == h * w
    assert max(len(wave.feed) for wave in waves) >= 3


# -- sampling -----------------------------------------------------------------------------------
SAMPLERS = [
    SamplerConfig(),
    SamplerConfig(temperature=0.8, top_k=5),
    SamplerConfig(top_p=0.9, guidance_scale=2.0),
]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_window_on_a_block_sized_grid_is_plain_sampling(sampler, mode):
    prior = _prior(label={"vocab_size": 3})
    plain = prior.sample(_label(), grid=(4, 4), sampler=sampler, generator=_gen(3))
    request = prior.sample_request(_label(), grid=(4, 4), sampler=sampler, generator=_gen(3))
    with torch.inference_mode():
        windowed = sample_windowed(prior, request, (4, 4), mode)
    assert torch.equal(plain, windowed)


def test_cached_equals_exact_while_the_window_stands_still():
    # A 4-wide grid: both modes draw in raster order; the exact window stays at the top for
    # rows 0..2 (centred on row 2 it still starts at row 0) and so does the cached one.
    prior = _prior()
    sampler = SamplerConfig(window_size=(4, 4))
    exact = prior.sample(
        grid=(12, 4),
        sampler=sampler.model_copy(update={"window": "exact"}),
        generator=_gen(1),
        num_samples=3,
    )
    cached = prior.sample(grid=(12, 4), sampler=sampler, generator=_gen(1), num_samples=3)
    assert torch.equal(exact[:, :3], cached[:, :3])
    assert not torch.equal(exact, cached)  # afterwards the windows differ


def test_default_tiles_are_half_the_window_down_and_keep_a_margin_of_an_eighth_across():
    # (window side, align) -> (band rows, tile columns): the margin either side is an eighth
    # of the window (at least 2 codes, 1 under 8 wide), rounded up to align
    for (side, align), (th, tw) in {
        (16, 1): (8, 12),
        (32, 1): (16, 24),
        (8, 1): (4, 4),
        (4, 1): (2, 2),
        (16, 4): (8, 8),
    }.items():
        placements = plan_windows((4 * side, 4 * side), (side, side), "cached", align=align)
        second = [p for p in placements if p.top == placements[0].top][1]  # a tile inside
        rows = {i for i, _ in second.targets}
        cols = {j for _, j in second.targets}
        assert (len(rows), len(cols)) == (side, tw)  # the first band spans the window
        assert min(cols) - second.left == (side - tw) // 2  # centred across
        band = [p for p in placements if min(i for i, _ in p.targets) == side][1]
        assert len({i for i, _ in band.targets}) == th
        # band="middle" by default: (side - th) / 2 rows above the band in its window
        assert side - band.top == (side - th) // 2 - (side - th) // 2 % align


def test_window_margin_moves_the_window_left_of_each_tile():
    # 16-wide window, 8-wide tiles: 6 columns of window left of a tile and 2 right of it
    placements = plan_windows((32, 64), (16, 16), "cached", stride=(8, 8), margin=6)
    band = [p for p in placements if p.top == placements[0].top]
    assert [(min(j for _, j in p.targets), p.left) for p in band[:3]] == [
        (0, 0),  # the first tile runs up to 2 columns before its window's right edge
        (14, 8),
        (22, 16),
    ]
    assert max(j for _, j in band[0].targets) == 13
    drawn = sorted((i, j) for p in placements for i, j in p.targets)
    assert drawn == [(i, j) for i in range(32) for j in range(64)]  # every code once
    # the default is half of the free columns on either side
    assert plan_windows((32, 64), (16, 16), "cached", stride=(8, 8), margin=4) == plan_windows(
        (32, 64), (16, 16), "cached", stride=(8, 8)
    )
    with pytest.raises(
        InputError, match=r"window_margin=9 does not fit: .* leaves 8 columns, .* must be 0 to 8"
    ):
        plan_windows((32, 64), (16, 16), "cached", stride=(8, 8), margin=9)
    with pytest.raises(InputError, match="and a multiple of 4"):
        plan_windows((32, 64), (16, 16), "cached", stride=(8, 8), align=4, margin=6)
    with pytest.raises(ValueError, match="window_margin"):
        SamplerConfig(window_margin=-1)


@pytest.mark.parametrize(
    ("stride", "positions", "layout", "band", "margin"),
    [
        (None, "learned", "prefix", "bottom", None),
        ((2, 3), "learned", "prefix", "bottom", None),
        ((1, 1), "learned", "prefix", "bottom", None),
        (None, "rope", "prefix", "bottom", None),
        ((2, 3), "learned", "taming", "bottom", None),
        (None, "learned", "prefix", "middle", None),
        ((2, 3), "rope", "prefix", "middle", None),
        ((2, 1), "learned", "prefix", "middle", 2),  # 2 columns left of a tile, 1 right
        ((2, 2), "rope", "prefix", "bottom", 0),
        ((2, 3), "learned", "prefix+neighbours", "middle", None),
        (None, "rope", "prefix+neighbours", "bottom", 1),
    ],
)
def test_cached_draws_what_teacher_forced_windows_draw(
    stride, positions, layout, band, margin, monkeypatch
):
    # The tiles' KV cache slots, stepped together with a position per row as neighbours draw,
    # give the logits that one full forward of each window gives: the same codes, same seed.
    # "+neighbours": the codes above each code added to its input, read from the window
    nb = (2, 3) if layout.endswith("+neighbours") else (0, 0)
    prior = _prior(positions, layout.removesuffix("+neighbours"), nb, label={"vocab_size": 3})
    sampler = SamplerConfig(
        window="cached",
        window_stride=stride,
        guidance_scale=1.5,
        window_band=band,
        window_margin=margin,
    )
    cached = prior.sample(_label(), grid=(9, 13), sampler=sampler, generator=_gen(4))
    full_forward_windows(prior, monkeypatch)
    forward = prior.sample(_label(), grid=(9, 13), sampler=sampler, generator=_gen(4))
    assert torch.equal(cached, forward)


@pytest.mark.parametrize("prepack", [False, True])
def test_cached_draws_the_same_with_or_without_prepacked_weights(prepack, monkeypatch):
    prior = _prior(label={"vocab_size": 3})
    sampler = SamplerConfig(window="cached", guidance_scale=1.5, top_k=8)
    got = prior.sample(_label(), grid=(9, 13), sampler=sampler, generator=_gen(5), prepack=prepack)
    full_forward_windows(prior, monkeypatch)
    want = prior.sample(_label(), grid=(9, 13), sampler=sampler, generator=_gen(5))
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_a_grid_twice_the_block_is_sampled_seeded(mode):
    prior = _prior(label={"vocab_size": 3})
    sampler = SamplerConfig(window=mode, top_k=8, guidance_scale=1.5)
    a = prior.sample(_label(), grid=(8, 8), sampler=sampler, generator=_gen(0))
    b = prior.sample(_label(), grid=(8, 8), sampler=sampler, generator=_gen(0))
    c = prior.sample(_label(), grid=(8, 8), sampler=sampler, generator=_gen(1))
    assert a.shape == (2, 8, 8) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < K
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_windowed_completion_keeps_the_given_codes(mode):
    prior = _prior()
    prefix = torch.full((2, 8, 6), -1)
    prefix[:, :3] = torch.randint(0, K, (2, 3, 6), generator=_gen(5))
    prefix[:, 6, 4] = 7
    out = prior.sample(
        grid=(8, 6), sampler=SamplerConfig(window=mode), generator=_gen(2), prefix=prefix
    )
    given = prefix >= 0
    assert torch.equal(out[given], prefix[given])
    assert (out[~given] >= 0).all()


# -- conditions ------------------------------------------------------------------------------
def _map(h: int, w: int, b: int = 1) -> Conditioning:
    tokens = torch.arange(b * h * w).view(b, h * w) % 5
    return Conditioning(tokens, vocab_size=5, grid=(h, w))


def test_a_spatial_condition_is_cropped_with_the_codes():
    seg = Conditioning(torch.arange(64).view(1, 64), vocab_size=64, grid=(8, 8))
    label = Conditioning(torch.tensor([[2]]), vocab_size=3)
    out = crop_conditions({"seg": seg, "label": label}, (8, 8), 2, 3, (4, 4))
    assert out["label"] is label
    assert out["seg"].grid == (4, 4)
    assert torch.equal(out["seg"].tokens.view(4, 4), torch.arange(64).view(8, 8)[2:6, 3:7])
    # Twice as fine as the codes: the same area in its own cells.
    fine = Conditioning(torch.arange(256).view(1, 256), vocab_size=256, grid=(16, 16))
    got = crop_conditions({"fine": fine}, (8, 8), 2, 3, (4, 4))["fine"]
    assert torch.equal(got.tokens.view(8, 8), torch.arange(256).view(16, 16)[4:12, 6:14])
    # Twice as coarse: corners are multiples of 2, so the crop is exact.
    coarse = Conditioning(torch.arange(16).view(1, 16), vocab_size=16, grid=(4, 4))
    got = crop_conditions({"coarse": coarse}, (8, 8), 2, 4, (4, 4))["coarse"]
    assert torch.equal(got.tokens.view(2, 2), torch.arange(16).view(4, 4)[1:3, 2:4])


def test_a_condition_that_does_not_fit_the_grid_is_refused():
    with pytest.raises(InputError, match=r"5x8 grid.*aspect ratio.*8x8 code grid"):
        crop_conditions({"seg": _map(5, 8)}, (8, 8), 0, 0, (4, 4))
    with pytest.raises(InputError, match=r"neither the 8x8 code grid nor an integer multiple"):
        crop_conditions({"seg": _map(12, 12)}, (8, 8), 0, 0, (4, 4))
    with pytest.raises(InputError, match="multiples of 4"):
        crop_conditions({"seg": _map(3, 3)}, (12, 12), 0, 0, (6, 6))


@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_sampling_crops_the_spatial_condition_to_each_window(mode, monkeypatch):
    prior = _prior(seg={"vocab_size": 5, "num_tokens": 16})
    seg = _map(8, 8, b=2)
    seen: list[tuple[int, int, torch.Tensor]] = []
    make = prior.window_decoder

    def spy(rows, size, slots=1):
        decoder = make(rows, size, slots)
        start = decoder.start

        def start_and_record(slot, conds, top, left):
            seen.append((top, left, conds["seg"].tokens.clone()))
            start(slot, conds, top, left)

        decoder.start = start_and_record  # type: ignore[method-assign]
        return decoder

    monkeypatch.setattr(prior, "window_decoder", spy)
    out = prior.sample(
        {"seg": seg}, grid=(8, 8), sampler=SamplerConfig(window=mode), generator=_gen(0)
    )
    assert out.shape == (2, 8, 8)
    placements = plan_windows((8, 8), (4, 4), mode)
    # every window started once, with the condition cropped to its own corner
    assert sorted(t[:2] for t in seen) == sorted((p.top, p.left) for p in placements)
    full = seg.tokens.view(2, 8, 8)
    for top, left, tokens in seen:
        want = full[:, top : top + 4, left : left + 4].reshape(2, 16)
        assert torch.equal(tokens, want)


@pytest.mark.parametrize("max_windows", [1, 3, 64])
def test_full_forward_windows_in_batches_draw_what_one_window_at_a_time_draws(
    max_windows, monkeypatch
):
    # The cache-less decoder stacks the windows a wave asks for (their codes and their cropped
    # conditions) into forwards of at most max_windows; the draw is that of the cached decoder
    # whatever the batch, with a map cropped per window and guidance's null rows.
    prior = _prior(seg={"vocab_size": 5, "num_tokens": 16}, label={"vocab_size": 3})
    conds = {"seg": _map(9, 13, b=2), **_label()}
    sampler = SamplerConfig(window="cached", guidance_scale=1.5, window_stride=(2, 2))
    cached = prior.sample(conds, grid=(9, 13), sampler=sampler, generator=_gen(6))
    full_forward_windows(prior, monkeypatch)
    monkeypatch.setattr(FullForwardDecoder, "max_windows", max_windows)
    batches: list[int] = []
    forward = prior.code_logits

    def counted(codes, conds=None):
        batches.append(int(codes.shape[0]))
        return forward(codes, conds)

    monkeypatch.setattr(prior, "code_logits", counted)
    got = prior.sample(conds, grid=(9, 13), sampler=sampler, generator=_gen(6))
    assert torch.equal(got, cached)
    rows = 4  # 2 grids, each with its null row
    assert max(batches) <= rows * max_windows
    if max_windows > 1:
        assert max(batches) > rows  # waves asked for several windows, run in one forward


def test_concat_conditionings_stacks_rows_and_refuses_unlike_items():
    a = Conditioning(torch.tensor([[1, 2]]), vocab_size=5, grid=(1, 2))
    b = Conditioning(torch.tensor([[3, 4]]), vocab_size=5, grid=(1, 2), drop=torch.tensor([True]))
    both = concat_conditionings([a, b])
    assert torch.equal(both.tokens, torch.tensor([[1, 2], [3, 4]]))
    assert both.grid == (1, 2) and torch.equal(both.drop, torch.tensor([False, True]))
    assert concat_conditionings([a, a]).drop is None
    with pytest.raises(ValueError, match="vocab_size or grid"):
        concat_conditionings([a, Conditioning(torch.tensor([[1, 2]]), vocab_size=6, grid=(1, 2))])


# -- scoring ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "cached"])
def test_windowed_log_prob_on_a_block_sized_grid_is_the_log_prob(mode):
    prior = _prior(label={"vocab_size": 3})
    codes = torch.randint(0, K, (2, 4, 4), generator=_gen(0))
    want = prior.log_prob(codes, _label())
    got = prior.window_log_prob(codes, _label(), window=mode, window_size=(4, 4))
    torch.testing.assert_close(got, want)


def test_exact_windowed_log_prob_scores_each_code_in_its_own_window():
    prior = _prior(seg={"vocab_size": 5, "num_tokens": 16})
    codes = torch.randint(0, K, (2, 6, 7), generator=_gen(0))
    seg = _map(6, 7, b=2)
    got = prior.window_log_prob(codes, {"seg": seg}, window="exact", per_code=True)
    assert got.shape == (2, 6, 7)
    for i, j in [(0, 0), (2, 5), (3, 3), (5, 6), (4, 0)]:
        top, left = window_origin(i, j, (6, 7), (4, 4))
        crop = codes[:, top : top + 4, left : left + 4]
        cond = crop_conditions({"seg": seg}, (6, 7), top, left, (4, 4))
        per_code = prior.code_log_probs(crop, cond).view(2, 4, 4)
        full = prior.log_prob(crop, cond)  # the window's total, scored as one grid
        torch.testing.assert_close(per_code.sum((1, 2)), full)
        torch.testing.assert_close(got[:, i, j], per_code[:, i - top, j - left])


def test_windowed_log_prob_modes_agree_where_their_windows_do():
    prior = _prior()
    codes = torch.randint(0, K, (2, 12, 4), generator=_gen(0))
    exact = windowed_log_prob(prior, codes, {}, (4, 4), "exact", per_code=True)
    cached = windowed_log_prob(prior, codes, {}, (4, 4), "cached", per_code=True)
    torch.testing.assert_close(exact[:, :3], cached[:, :3])
    assert not torch.allclose(exact, cached)
    total = prior.window_log_prob(codes, window="cached")
    torch.testing.assert_close(total, cached.flatten(1).sum(1))


# -- a prior without a KV cache -------------------------------------------------------------
def test_pixelsnail_uses_the_window_through_its_teacher_forced_logits():
    from latentgen.priors.pixelsnail import PixelSNAILConfig, PixelSNAILPrior

    torch.manual_seed(0)
    cfg = PixelSNAILConfig(
        vocab_size=K,
        channel=8,
        res_channel=8,
        kernel_size=3,
        n_block=1,
        n_res_block=1,
        n_head=2,
        key_channel=8,
        value_channel=8,
        dropout=0.0,
        max_height=4,
        max_width=4,
    )
    prior = PixelSNAILPrior(cfg).eval()
    codes = torch.randint(0, K, (2, 4, 4), generator=_gen(0))
    torch.testing.assert_close(
        prior.window_log_prob(codes, window="exact", window_size=(4, 4)), prior.log_prob(codes)
    )
    a = prior.sample(grid=(6, 6), sampler=SamplerConfig(window="exact"), generator=_gen(4))
    b = prior.sample(grid=(6, 6), sampler=SamplerConfig(window="exact"), generator=_gen(4))
    assert a.shape == (1, 6, 6) and torch.equal(a, b)


# -- bad input ----------------------------------------------------------------------------------
def test_a_window_larger_than_the_trained_block_is_refused():
    prior = _prior()
    with pytest.raises(InputError, match=r"window 5x4 \(20 codes\) is larger than .*block_size=16"):
        prior.sample(grid=(8, 8), sampler=SamplerConfig(window_size=(5, 4)))
    with pytest.raises(InputError, match="block_size=16"):
        prior.window_log_prob(torch.zeros(1, 8, 8, dtype=torch.long), window_size=(8, 8))


def test_a_grid_narrower_than_the_window_is_refused():
    prior = _prior()
    with pytest.raises(InputError, match=r"2 codes wide.*4 codes wide"):
        prior.sample(grid=(12, 2))


def test_a_grid_beyond_the_block_needs_a_known_window():
    torch.manual_seed(0)
    prior = TransformerPrior(
        TransformerPriorConfig(vocab_size=K, block_size=12, n_layer=1, n_head=2, n_embd=16)
    )
    with pytest.raises(InputError, match=r"window.*TransformerPriorConfig.window.*window_size"):
        prior.sample(grid=(8, 8))
    out = prior.sample(grid=(8, 8), sampler=SamplerConfig(window_size=(3, 4)), generator=_gen())
    assert out.shape == (1, 8, 8)


def test_window_settings_are_validated():
    with pytest.raises(ValueError, match="window"):
        SamplerConfig(window="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_size"):
        SamplerConfig(window_size=(0, 4))
    with pytest.raises(ValueError, match=r"window \(8, 8\).*block_size=16"):
        TransformerPriorConfig(vocab_size=K, block_size=16, window=(8, 8))


# -- pipeline and command line -----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from latentgen import Pipeline

    torch.manual_seed(0)
    pipe = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
            "prior": {
                "type": "transformer",
                "vocab_size": 8,
                "block_size": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
            },
        }
    )
    pipe.tokenizer.fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    path = tmp_path_factory.mktemp("pipe") / "p"
    pipe.save_pretrained(path, card={"image_size": 16})
    return path


def test_pipeline_draws_and_scores_any_size_with_the_window(saved_pipeline):
    from latentgen import Pipeline

    pipe = Pipeline.from_pretrained(saved_pipeline)
    for mode in ("exact", "cached"):
        images = pipe(
            2,
            size=(32, 24),
            sampler={"window": mode},
            generator=_gen(0),
            output_type="tensor",
        )
        assert images.shape == (2, 3, 32, 24)
        again = pipe(
            2, size=(32, 24), sampler={"window": mode}, generator=_gen(0), output_type="tensor"
        )
        assert torch.equal(images, again)
    big = pipe(1, size=(32, 24), generator=_gen(0), output_type="tensor")
    lp = {mode: pipe.log_likelihood(big, window=mode) for mode in ("exact", "cached")}
    assert lp["cached"].shape == (1,) and torch.isfinite(lp["cached"]).all()
    torch.testing.assert_close(pipe.log_likelihood(big), lp["cached"])  # the sampler's mode
    assert not torch.allclose(lp["exact"], lp["cached"])
    # ... and the sampler's band and stride: each code is scored from the window that draws it
    pipe.sampler = pipe.sampler.model_copy(update={"window_band": "bottom"})
    bottom = pipe.log_likelihood(big)
    assert not torch.allclose(bottom, lp["cached"])
    codes = pipe.encode(big)
    with torch.no_grad():
        direct = pipe.prior.window_log_prob(codes, window="cached", window_band="bottom")
        pipe.sampler = pipe.sampler.model_copy(update={"window_stride": (1, 1)})
        strided = pipe.log_likelihood(big)
        assert not torch.allclose(strided, bottom)
        want = pipe.prior.window_log_prob(
            codes, window="cached", window_band="bottom", window_stride=(1, 1)
        )
        pipe.sampler = pipe.sampler.model_copy(update={"window_margin": 0})
        edged = pipe.log_likelihood(big)
        assert not torch.allclose(edged, strided)
        edge = pipe.prior.window_log_prob(
            codes, window="cached", window_band="bottom", window_stride=(1, 1), window_margin=0
        )
    torch.testing.assert_close(bottom, direct)
    torch.testing.assert_close(strided, want)
    torch.testing.assert_close(edged, edge)


def test_cli_samples_beyond_the_block_with_either_window(saved_pipeline, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from latentgen.cli import main

    for mode in ("exact", "cached"):
        out = tmp_path / f"{mode}.png"
        args = ["sample", str(saved_pipeline), "-n", "1", "--size", "32x24", "--window", mode]
        res = CliRunner().invoke(main, [*args, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert Image.open(out).size[0] >= 24
    # the band at the bottom of its window: another draw of the same size
    bottom = tmp_path / "bottom.png"
    args = ["sample", str(saved_pipeline), "-n", "1", "--size", "32x24", "--window-band", "bottom"]
    res = CliRunner().invoke(main, [*args, "-o", str(bottom)])
    assert res.exit_code == 0, res.output
    assert Image.open(bottom).size == Image.open(tmp_path / "cached.png").size
    assert Image.open(bottom).tobytes() != Image.open(tmp_path / "cached.png").tobytes()
    res = CliRunner().invoke(main, ["sample", str(saved_pipeline), "--size", "32x"])
    assert res.exit_code != 0 and "N or HxW, e.g. 512 or 1024x768" in res.output
    res = CliRunner().invoke(main, ["sample", str(saved_pipeline), "--window", "fast"])
    assert res.exit_code != 0 and "'exact', 'cached'" in res.output


def test_the_cached_window_runs_its_small_steps_on_the_threads_asked(monkeypatch):
    from latentgen.priors import transformer

    prior = _prior()
    seen: list[int] = []
    logits = transformer._CachedWindowDecoder.logits

    def spy(self, slots, positions, codes):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return logits(self, slots, positions, codes)

    monkeypatch.setattr(transformer._CachedWindowDecoder, "logits", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prior.sample(grid=(8, 8), generator=_gen(0))  # "auto": tiny steps run on one thread
        assert seen and set(seen) == {1}
        seen.clear()
        prior.sample(grid=(8, 8), generator=_gen(0), threads=2)
        assert set(seen) == {2}
        assert torch.get_num_threads() == 2  # restored after the draw
    finally:
        torch.set_num_threads(before)
