"""Aligned conditions (``ConditionSlot.placement``): a map's embedding added at its cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from examples import full_forward_windows, tiny_conditioned_pipe
from latentgen.cli import main as cli
from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.masked import MaskedPrior, MaskedPriorConfig
from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
from latentgen.specs import SamplerConfig

K = 16


def _sharpen(model):
    torch.manual_seed(0)
    with torch.no_grad():  # far from the tiny init, so every input visibly moves the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _build(kind, conditions, block=16, n_layer=2, **kw):
    """A small sharpened GPT (``kind="gpt"``) or masked prior with these condition slots."""
    config_cls, cls = {
        "gpt": (TransformerPriorConfig, TransformerPrior),
        "masked": (MaskedPriorConfig, MaskedPrior),
    }[kind]
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=K,
        block_size=block,
        n_layer=n_layer,
        n_head=2,
        n_embd=16,
        conditions=conditions,
        **kw,
    )
    return _sharpen(cls(cfg))


def _slots(placement="aligned", map_tokens=16, prefix_downsample=1):
    seg = {"vocab_size": 5, "num_tokens": map_tokens, "placement": placement}
    return {"label": {"vocab_size": 3}, "seg": {**seg, "prefix_downsample": prefix_downsample}}


def _gpt(placement="aligned", map_tokens=16, block=16, prefix_downsample=1, **kw):
    slots = _slots(placement, map_tokens, prefix_downsample)
    return _build("gpt", slots, block, cond_dropout=0.1, **kw)


def _masked(placement="aligned", map_tokens=16):
    return _build("masked", _slots(placement, map_tokens), cond_dropout=0.1)


def _conds(seg: torch.Tensor, grid=(4, 4), label=1):
    b = seg.shape[0]
    return {
        "label": Conditioning(torch.full((b, 1), label), 3),
        "seg": Conditioning(seg.reshape(b, -1), 5, grid=grid),
    }


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _first_changed(a: torch.Tensor, b: torch.Tensor) -> int:
    """Index of the first code whose logits differ between ``a`` and ``b`` ``[1, n, K]``."""
    diff = (a - b).abs().amax(-1)[0] > 1e-6  # [n]
    return int(diff.nonzero()[0])


# -- the model reads the map at each code's own cell ------------------------------------------
@pytest.mark.parametrize("cell,first", [(0, 0), (5, 5), (15, 15)])
def test_the_gpt_reads_a_cell_first_where_it_predicts_that_code(cell, first):
    prior = _gpt()
    codes = torch.randint(0, K, (1, 4, 4), generator=_gen(1))
    seg = torch.zeros(1, 16, dtype=torch.long)
    other = seg.clone()
    other[0, cell] = 3
    with torch.no_grad():
        a = prior.code_logits(codes, _conds(seg))
        b = prior.code_logits(codes, _conds(other))
    # Codes before the cell cannot see it (causal); the code at the cell sees it directly.
    assert _first_changed(a, b) == first


def test_a_coarse_map_covers_its_cells_codes():
    # A 2x2 map over 4x4 codes: cell (0, 1) covers codes (0, 2), (0, 3), (1, 2), (1, 3).
    prior = _gpt(map_tokens=4)
    codes = torch.randint(0, K, (1, 4, 4), generator=_gen(2))
    seg = torch.zeros(1, 4, dtype=torch.long)
    other = seg.clone()
    other[0, 1] = 4
    with torch.no_grad():
        a = prior.code_logits(codes, _conds(seg, (2, 2)))
        b = prior.code_logits(codes, _conds(other, (2, 2)))
    assert _first_changed(a, b) == 2
    # The embedding added to each code's input: equal within a cell, the cell's own token.
    table = prior._aligned(_conds(other, (2, 2)), (4, 4))  # [1, 16, C]
    want = prior.cond_emb["seg"].weight[torch.tensor([0, 0, 4, 4] * 2 + [0] * 8)]
    torch.testing.assert_close(table[0], want)


def test_aligned_maps_take_no_prefix_tokens_and_both_takes_both():
    aligned, both, prefix = _gpt("aligned"), _gpt("both"), _gpt("prefix")
    assert aligned.n_ctx == 1 + 1 and prefix.n_ctx == both.n_ctx == 1 + 16 + 1
    assert "cond_pos.seg" not in aligned.state_dict() and "cond_pos.seg" in both.state_dict()
    codes = torch.randint(0, K, (2, 4, 4), generator=_gen(3))
    seg = torch.randint(0, 5, (2, 16), generator=_gen(4))
    for prior in (aligned, both):
        lp = prior.log_prob(codes, _conds(seg))
        assert lp.shape == (2,) and torch.isfinite(lp).all()


def test_a_dropped_aligned_map_is_the_null_embedding_everywhere():
    prior = _gpt()
    codes = torch.randint(0, K, (1, 4, 4), generator=_gen(5))
    conds = _conds(torch.randint(0, 5, (1, 16), generator=_gen(6)))
    drop = torch.tensor([True])
    conds["seg"] = conds["seg"].with_drop(drop)
    other = dict(conds, seg=Conditioning(torch.zeros(1, 16, dtype=torch.long), 5, (4, 4), drop))
    with torch.no_grad():
        torch.testing.assert_close(prior.code_logits(codes, conds), prior.code_logits(codes, other))
    table = prior._aligned(conds, (4, 4))
    assert torch.equal(table[0], prior.cond_null["seg"].expand(16, -1))


# -- every decode path draws the same ---------------------------------------------------------
@pytest.mark.parametrize("placement", ["aligned", "both"])
@pytest.mark.parametrize(
    "opts", [{}, {"prepack": False}, {"static_cache": True}], ids=["dynamic", "unpacked", "static"]
)
def test_cached_sampling_with_an_aligned_map_equals_uncached(placement, opts):
    prior = _gpt(placement)
    conds = _conds(torch.randint(0, 5, (3, 16), generator=_gen(7)))
    sampler = SamplerConfig(top_k=8, guidance_scale=3.0)
    cached = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(1), **opts)
    uncached = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(1), use_cache=False)
    assert torch.equal(cached, uncached)


def test_samples_follow_an_aligned_map():
    # A prior whose map embedding dominates the codes it predicts draws each cell's code.
    prior = _gpt()
    with torch.no_grad():
        prior.cond_emb["seg"].weight.zero_()
        prior.cond_emb["seg"].weight[:, :5] = torch.eye(5) * 200.0
        prior.head = torch.nn.Linear(16, K, bias=False)
        prior.head.weight.zero_()
        prior.head.weight[:5, :5] = torch.eye(5) * 100.0  # after ln_f the cell is about 4
        for block in prior.blocks:  # the residual stream carries the embedding to the head
            for p in block.parameters():
                p.zero_()
        prior.ln_f.weight.fill_(1.0)
    seg = torch.randint(0, 5, (2, 16), generator=_gen(8))
    drawn = prior.sample(_conds(seg), grid=(4, 4), sampler=SamplerConfig(), generator=_gen(2))
    assert torch.equal(drawn.view(2, 16), seg)


@pytest.mark.parametrize("band", ["bottom", "middle"])
@pytest.mark.parametrize("map_tokens,grid", [(16, (9, 13)), (4, (10, 14))])
def test_the_cached_window_draws_what_teacher_forced_windows_draw(
    band, map_tokens, grid, monkeypatch
):
    prior = _gpt(map_tokens=map_tokens)
    k = 1 if map_tokens == 16 else 2
    hc, wc = grid[0] // k, grid[1] // k
    conds = _conds(torch.randint(0, 5, (2, hc * wc), generator=_gen(9)), (hc, wc))
    sampler = SamplerConfig(window="cached", guidance_scale=1.5, window_band=band)
    cached = prior.sample(conds, grid=grid, sampler=sampler, generator=_gen(4))
    full_forward_windows(prior, monkeypatch)
    forward = prior.sample(conds, grid=grid, sampler=sampler, generator=_gen(4))
    assert torch.equal(cached, forward)
    exact = prior.sample(
        conds, grid=grid, sampler=sampler.model_copy(update={"window": "exact"}), generator=_gen(4)
    )
    assert exact.shape == cached.shape


# -- a coarse prefix beside a fine aligned map ------------------------------------------------
def test_prefix_downsample_keeps_each_blocks_centre_cell_in_the_prefix():
    prior = _gpt("both", prefix_downsample=2)
    assert prior.n_ctx == 1 + 4 + 1 and prior.cond_pos["seg"].shape[0] == 4
    codes = torch.randint(0, K, (1, 4, 4), generator=_gen(13))
    seg = torch.zeros(1, 16, dtype=torch.long)
    centre, corner = seg.clone(), seg.clone()
    centre[0, 5] = 3  # cell (1, 1): the centre of the first 2x2 block, so in the prefix
    corner[0, 4] = 3  # cell (1, 0): not in the prefix, so read first by code 4
    with torch.no_grad():
        base = prior.code_logits(codes, _conds(seg))
        assert _first_changed(base, prior.code_logits(codes, _conds(centre))) == 0
        assert _first_changed(base, prior.code_logits(codes, _conds(corner))) == 4
    conds = _conds(torch.randint(0, 5, (2, 16), generator=_gen(14)))
    sampler = SamplerConfig(guidance_scale=2.0)
    cached = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(5))
    uncached = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(5), use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_coarse_prefix_crops_with_the_cached_window(monkeypatch):
    prior = _gpt("both", prefix_downsample=2)
    conds = _conds(torch.randint(0, 5, (2, 9 * 13), generator=_gen(15)), (9, 13))
    sampler = SamplerConfig(window="cached", guidance_scale=1.5)
    cached = prior.sample(conds, grid=(9, 13), sampler=sampler, generator=_gen(6))
    full_forward_windows(prior, monkeypatch)
    assert torch.equal(
        cached, prior.sample(conds, grid=(9, 13), sampler=sampler, generator=_gen(6))
    )


# -- the masked prior ---------------------------------------------------------------------------
def test_the_masked_prior_reads_the_map_at_each_code():
    prior = _masked()
    assert prior.n_ctx == 1 and "cond_pos.seg" not in prior.state_dict()
    tokens = torch.full((1, 16), prior.mask_id)
    seg = torch.zeros(1, 16, dtype=torch.long)
    other = seg.clone()
    other[0, 6] = 2
    with torch.no_grad():
        a = prior._logits(tokens, _conds(seg), grid=(4, 4))
        b = prior._logits(tokens, _conds(other), grid=(4, 4))
        assert not torch.allclose(a, b)
        # With the blocks zeroed (each a residual identity) a code reads its own input only:
        # the changed cell moves its own code and no other.
        for block in prior.blocks:
            for p in block.parameters():
                p.zero_()
        a = prior._logits(tokens, _conds(seg), grid=(4, 4))
        b = prior._logits(tokens, _conds(other), grid=(4, 4))
    change = (a - b).abs().amax(-1)[0] > 1e-6  # [16]
    assert change.nonzero().flatten().tolist() == [6]
    prior = _masked()
    codes = torch.randint(0, K, (2, 4, 4), generator=_gen(10))
    conds = _conds(torch.randint(0, 5, (2, 16), generator=_gen(11)))
    assert torch.isfinite(prior.log_prob(codes, conds)).all()
    sampler = SamplerConfig(guidance_scale=2.0, steps=4)
    drawn = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(3))
    again = prior.sample(conds, grid=(4, 4), sampler=sampler, generator=_gen(3))
    assert drawn.shape == (2, 4, 4) and torch.equal(drawn, again)


# -- bad input ----------------------------------------------------------------------------------
def test_aligned_placement_errors_name_the_fix():
    with pytest.raises(ValidationError, match="layout='taming' puts every condition in the prefix"):
        _gpt(layout="taming")
    with pytest.raises(ValidationError, match="Input should be 'prefix', 'aligned' or 'both'"):
        _gpt(placement="added")
    with pytest.raises(ValidationError, match="placement 'aligned' has none"):
        _gpt("aligned", prefix_downsample=2)
    with pytest.raises(ValidationError, match="num_tokens=6 is not a whole number of 2x2 blocks"):
        _gpt("both", map_tokens=6, prefix_downsample=2)
    odd = _gpt("prefix", map_tokens=36, block=36, prefix_downsample=2)
    with pytest.raises(InputError, match=r"grid \(4, 9\), which prefix_downsample=2 cannot cut"):
        odd.log_prob(
            torch.zeros(1, 4, 9, dtype=torch.long), _conds(torch.zeros(1, 36).long(), (4, 9))
        )
    prior = _gpt(map_tokens=6)
    codes = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(InputError, match=r"2x3 grid, which does not cover the 4x4 code grid"):
        prior.log_prob(codes, _conds(torch.zeros(1, 6, dtype=torch.long), (2, 3)))
    gridless = _conds(torch.zeros(1, 6, dtype=torch.long), (2, 3))
    gridless["seg"] = Conditioning(gridless["seg"].tokens, 5)
    with pytest.raises(InputError, match="6 tokens but no grid.*placement 'prefix'"):
        prior.log_prob(codes, gridless)


def test_a_prior_without_aligned_conditions_refuses_them_when_built():
    from latentgen import registry
    from latentgen.errors import SpecError

    slots = {"digits": {"vocab_size": 10, "placement": "aligned"}}
    with pytest.raises(
        SpecError,
        match=r"implements condition placement \['prefix'\].*"
        r"'digits': 'aligned'.*set placement: prefix",
    ):
        registry.build("prior", {"type": "toy.ngram", "vocab_size": 8, "conditions": slots})
    plain = {"digits": {"vocab_size": 10}}
    assert registry.build("prior", {"type": "toy.ngram", "vocab_size": 8, "conditions": plain})


def test_an_aligned_label_is_added_to_every_code():
    prior = _build("gpt", {"label": {"vocab_size": 3, "placement": "aligned"}}, n_layer=1)
    assert prior.n_ctx == 1
    codes = torch.randint(0, K, (1, 4, 4), generator=_gen(12))
    with torch.no_grad():
        a = prior.code_logits(codes, {"label": Conditioning(torch.tensor([[0]]), 3)})
        b = prior.code_logits(codes, {"label": Conditioning(torch.tensor([[2]]), 3)})
    assert _first_changed(a, b) == 0


# -- pipeline and CLI -----------------------------------------------------------------------------
def test_a_pipeline_with_an_aligned_map_samples_any_size_from_python_and_the_cli(tmp_path):
    pipe = tiny_conditioned_pipe(
        {"segmentation": {"type": "segmentation", "num_classes": 3}},
        {"segmentation": {"vocab_size": 3, "num_tokens": 16, "placement": "aligned"}},
    )
    assert pipe.prior.n_ctx == 1
    ids = np.zeros((32, 48), np.uint8)
    ids[8:24, 16:40] = 2
    out = pipe(segmentation=torch.from_numpy(ids).long(), size=(32, 48), generator=_gen(0))
    assert out[0].size == (48, 32)
    pipe.save_pretrained(tmp_path / "pipe")
    Image.fromarray(ids, mode="L").save(tmp_path / "map.png")
    cli(
        [
            "sample",
            str(tmp_path / "pipe"),
            "-n",
            "1",
            "--size",
            "32x48",
            "-c",
            f"segmentation=@{tmp_path / 'map.png'}",
            "--window",
            "cached",
            "--out",
            str(tmp_path / "out.png"),
        ],
        standalone_mode=False,
    )
    w, h = Image.open(tmp_path / "out.png").size  # the image in the sample sheet's border
    assert w > h >= 32 and w - 48 == h - 32
