"""Logit filters and draws: top-k keeps exactly k codes, ties broken by the lowest index."""

from __future__ import annotations

import pytest
import torch

from latentgen.priors.sampling import draw, draw_fast, filter_logits, top_k_indices, top_k_mask
from latentgen.specs import SamplerConfig

DRAWS = [draw, draw_fast]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fn", DRAWS, ids=["draw", "draw_fast"])
def test_top_k_1_is_greedy_on_tied_logits(fn):
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    rows = logits.repeat(500, 1)  # many draws: any randomness among the ties would show
    out = fn(rows, SamplerConfig(top_k=1), gen(0)).view(500, 2)
    assert (out[:, 0] == 1).all() and (out[:, 1] == 0).all()


@pytest.mark.parametrize("fn", DRAWS, ids=["draw", "draw_fast"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_keeps_exactly_k_codes_lowest_indices_among_ties(fn, temperature):
    # Codes 1, 3, 4, 6 tie for the largest logit; top_k=3 keeps 1, 3 and 4, never 6.
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0, 5.0, -1.0, 5.0]])
    out = fn(logits.expand(3000, 7), SamplerConfig(top_k=3, temperature=temperature), gen(1))
    seen = torch.bincount(out, minlength=7)
    assert set(torch.nonzero(seen).flatten().tolist()) == {1, 3, 4}
    assert (seen[[1, 3, 4]] > 850).all()  # about 1000 each: the three stay equally likely


def test_filter_logits_keeps_exactly_k():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 2.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, SamplerConfig(top_k=2)))
    assert kept.tolist() == [[True, True, False, False], [True, False, True, False]]


def test_top_k_mask_matches_topk_without_ties():
    logits = torch.randn(64, 50, generator=gen(2))
    want = torch.zeros_like(logits, dtype=torch.bool)
    want.scatter_(-1, logits.topk(7, dim=-1).indices, True)
    assert torch.equal(top_k_mask(logits, 7), want)
    assert (top_k_mask(logits, 7).sum(-1) == 7).all()


@pytest.mark.parametrize("k", [1, 5, 17])
def test_top_k_indices_is_the_mask_in_code_order_with_ties_signs_and_inf(k):
    # Coarse values: many exact ties at the k-th place, negatives, -0.0 next to 0.0, -inf.
    logits = (torch.randn(200, 40, generator=gen(3)) * 2).round() / 2
    logits[::7, 3] = -0.0
    logits[::5, 9] = float("-inf")
    logits[1] = 0.0  # one row all tied
    idx = top_k_indices(logits, k)  # [200, k]
    want = [row.nonzero().flatten().tolist() for row in top_k_mask(logits, k)]
    assert idx.tolist() == want  # same codes as the mask, ascending


@pytest.mark.parametrize(
    "sampler",
    [
        SamplerConfig(top_k=3),
        SamplerConfig(top_p=0.7),
        SamplerConfig(top_k=4, top_p=0.8, temperature=2),
    ],
)
def test_draw_fast_has_the_filtered_distribution(sampler):
    logits = torch.randn(1, 10, generator=gen(0)) * 2
    want = filter_logits(logits, sampler).softmax(-1)[0]
    draws = draw_fast(logits.expand(20000, 10), sampler, gen(1))
    freq = torch.bincount(draws, minlength=10).float() / draws.numel()
    assert (freq[want == 0] == 0).all()
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_the_one_code_draw_is_torch_multinomials_draw():
    from latentgen.priors.sampling import _draw_one

    for rows, k in ((1, 100), (8, 100), (3, 1024)):
        for seed in range(20):
            probs = torch.randn(rows, k, generator=gen(100 + seed)).mul(3).softmax(-1)
            probs[0, :3] = 0.0  # filtered codes
            probs = probs / probs.sum(-1, keepdim=True)
            want = torch.multinomial(probs, 1, generator=gen(seed)).squeeze(-1)
            assert torch.equal(_draw_one(probs, gen(seed)), want)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_top_k_indices_without_ties_at_the_cut_is_the_mask(k):
    # Distinct values: the topk shortcut answers; the same codes as the mask, ascending.
    logits = torch.randn(50, 1024, generator=gen(6))
    want = [row.nonzero().flatten().tolist() for row in top_k_mask(logits, k)]
    assert top_k_indices(logits, k).tolist() == want
    logits[7, :] = logits[7, 0]  # one row all tied: the exact integer keys answer
    want[7] = list(range(k))
    assert top_k_indices(logits, k).tolist() == want
