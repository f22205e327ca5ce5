"""The masked prior (MaskGIT / absorbing diffusion): blocks, sampling, ELBO, training, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from latentgen import registry
from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.base import SampleRequest
from latentgen.priors.masked import MASK_SCHEDULES, MaskedPrior, MaskedPriorConfig, mask_ratio
from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig, _Block
from latentgen.specs import SamplerConfig


def _prior(**kw) -> MaskedPrior:
    torch.manual_seed(0)
    cfg = {"vocab_size": 8, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    cfg["steps"] = min(12, kw.get("block_size", 16))
    return MaskedPrior(MaskedPriorConfig(**{**cfg, **kw})).eval()


def _labels(*ys: int, drop: bool = False) -> dict[str, Conditioning]:
    tokens = torch.tensor(ys)[:, None]
    d = torch.full((len(ys),), drop) if drop else None
    return {"label": Conditioning(tokens=tokens, vocab_size=3, drop=d)}


class _Passes:
    """Counts the forward passes of a prior and the masked codes each one reads."""

    def __init__(self, prior: MaskedPrior, monkeypatch: pytest.MonkeyPatch) -> None:
        self.masked: list[list[int]] = []
        self.rows: list[int] = []
        inner = prior._logits

        def logits(tokens, conds, positions=None, **kw):
            self.masked.append((tokens == prior.mask_id).sum(-1).tolist())
            self.rows.append(int(tokens.shape[0]))
            return inner(tokens, conds, positions, **kw)

        monkeypatch.setattr(prior, "_logits", logits)


def test_registered_and_shares_the_transformer_block():
    assert registry.get("prior", "masked").cls is MaskedPrior
    prior = _prior()
    assert all(type(b) is _Block for b in prior.blocks)  # the GPT prior's block, not a copy


def test_the_shared_block_is_causal_for_gpt_and_bidirectional_here():
    torch.manual_seed(0)
    block = _Block(TransformerPriorConfig(n_embd=16, n_head=2)).eval()
    from latentgen.priors.attention import get_backend

    backend = get_backend("math")
    x = torch.randn(1, 5, 16)
    y = x.clone()
    y[:, -1] = torch.randn(16)  # change the last position only
    with torch.no_grad():
        causal = block(x, backend)[:, 0], block(y, backend)[:, 0]
        both = block(x, backend, causal=False)[:, 0], block(y, backend, causal=False)[:, 0]
    assert torch.equal(*causal)  # the first position cannot see the last
    assert not torch.allclose(*both)  # bidirectional: it can
    # and the masked prior's first code's logits depend on the last code
    prior = _prior()
    a = torch.zeros(1, 16, dtype=torch.long)
    b = a.clone()
    b[0, -1] = 3
    with torch.no_grad():
        assert not torch.allclose(prior._logits(a, {})[0, 0], prior._logits(b, {})[0, 0])


@pytest.mark.parametrize("name", list(MASK_SCHEDULES))
def test_mask_schedules_fall_from_all_masked_to_none(name):
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    g = mask_ratio(name, r)
    assert g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(0.0, abs=1e-12)
    assert bool((g[1:] <= g[:-1]).all())


def test_sampling_takes_t_passes_filling_codes_by_the_cosine_schedule(monkeypatch):
    prior = _prior()
    passes = _Passes(prior, monkeypatch)
    out = prior.sample(
        grid=(4, 4),
        sampler=SamplerConfig(steps=4),
        num_samples=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (2, 4, 4) and int(out.min()) >= 0 and int(out.max()) < 8
    # masked codes each pass reads: 16, then floor(16 cos(pi t / 8)) for t = 1, 2, 3
    want = [16] + [math.floor(16 * math.cos(math.pi / 2 * t / 4)) for t in (1, 2, 3)]
    assert passes.masked == [[m, m] for m in want]
    # the default T is the config's
    passes.masked.clear()
    _ = prior.sample(grid=(4, 4), generator=torch.Generator().manual_seed(0))
    assert len(passes.masked) == prior.config.steps == 12


def test_other_schedule_changes_the_fill_order(monkeypatch):
    prior = _prior(mask_schedule="linear")
    passes = _Passes(prior, monkeypatch)
    prior.sample(grid=(4, 4), sampler=SamplerConfig(steps=4))
    assert [m[0] for m in passes.masked] == [16, 12, 8, 4]


def test_same_seed_same_codes_other_seed_other_codes():
    prior = _prior()

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return prior.sample(grid=(4, 4), num_samples=3, generator=g)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_completion_of_any_region_keeps_the_given_codes(monkeypatch):
    """-1 marks free codes anywhere (not only a raster prefix): a checkerboard here."""
    prior = _prior()
    given = torch.randint(8, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    prefix = given.clone()
    free = (torch.arange(16).view(4, 4) + torch.arange(4)[:, None]) % 2 == 0
    prefix[:, free] = -1
    passes = _Passes(prior, monkeypatch)
    out = prior.sample(prefix=prefix, sampler=SamplerConfig(steps=12), grid=(4, 4))
    assert torch.equal(out[:, ~free], given[:, ~free])
    assert int(out.min()) >= 0
    # 8 free codes: at most 8 passes even though 12 were asked (each pass fills at least one)
    assert passes.masked[0] == [8, 8] and len(passes.masked) <= 8
    full = prior.sample(prefix=given, grid=(4, 4))  # nothing free: nothing changes
    assert torch.equal(full, given)


def test_greedy_choice_ignores_the_seed():
    prior = _prior(choice_temperature=0.0)
    sampler = SamplerConfig(top_k=1, steps=4)
    a = prior.sample(grid=(4, 4), sampler=sampler, generator=torch.Generator().manual_seed(0))
    b = prior.sample(grid=(4, 4), sampler=sampler, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_guidance_mixes_the_conditional_and_null_rows_of_one_pass(monkeypatch):
    """CFG runs 2B rows per pass (conditions, then nulls) and mixes their logits u + s (c - u).

    The network is replaced by one whose conditional rows want code 3 * label and whose null
    rows want code 1, so each guidance scale's draws say which rows it read.
    """
    prior = _prior(conditions={"label": {"vocab_size": 3}}, cond_dropout=0.1)
    rows = []

    def logits(tokens, conds, positions, **kw):
        c = conds["label"]
        rows.append(int(tokens.shape[0]))
        out = torch.zeros(*tokens.shape, 8)
        want = (
            torch.where(c.drop, 1, c.tokens[:, 0] * 3) if c.drop is not None else c.tokens[:, 0] * 3
        )
        out[torch.arange(len(want)), :, want] = 20.0
        return out[positions]  # [M, K]: only the masked positions, as the prior's own

    monkeypatch.setattr(prior, "_logits", logits)
    labels = _labels(1, 2)

    def draw(scale: float) -> torch.Tensor:
        sampler = SamplerConfig(guidance_scale=scale, steps=3)
        return prior.sample(labels, grid=(4, 4), sampler=sampler)

    assert bool((draw(0.0) == 1).all())  # the null rows only
    assert rows == [4, 4, 4]  # one batched pass of 2B rows per step
    assert torch.equal(draw(1.0), torch.tensor([3, 6])[:, None, None].expand(2, 4, 4))
    assert torch.equal(draw(3.0), draw(1.0))  # guidance pushes further the same way
    null = prior.sample(_labels(1, 2, drop=True), grid=(4, 4), sampler=SamplerConfig(steps=3))
    assert bool((null == 1).all())


def test_progress_bar_counts_the_steps(capsys):
    prior = _prior()
    prior.sample(grid=(4, 4), sampler=SamplerConfig(steps=5), progress=True)
    err = capsys.readouterr().err
    assert "sampling (masked, 5 steps)" in err and "5/5" in err


def test_on_code_counts_every_code_and_can_cancel():
    """``latentgen serve``'s progress and cancel: the count reaches B*h*w, given codes included."""
    prior = _prior()
    prefix = torch.full((2, 4, 4), -1)
    prefix[:, 0] = 1  # 8 given codes
    seen = []
    prior.sample(
        prefix=prefix,
        grid=(4, 4),
        sampler=SamplerConfig(steps=4),
        on_code=lambda d, t: seen.append((d, t)),
    )
    assert seen[0] == (8, 32) and seen[-1] == (32, 32) and len(seen) == 5  # start + 4 passes
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Stop(Exception):
        pass

    def stop(done, total):
        if done > 0:
            raise Stop

    with pytest.raises(Stop):
        prior.sample(grid=(4, 4), sampler=SamplerConfig(steps=4), on_code=stop)


def _request(prior: MaskedPrior, sampler: SamplerConfig) -> SampleRequest:
    """An unconditional one-grid 4x4 request, as ``Prior.sample`` builds it."""
    return SampleRequest((4, 4), 1, sampler, torch.Generator().manual_seed(0), {}, None)


# -- refinement: the prior as its own critic ----------------------------------------------------
def test_refinement_adds_three_passes_each_and_masks_fewer_codes_each_time(monkeypatch):
    prior = _prior()
    passes = _Passes(prior, monkeypatch)
    sampler = SamplerConfig(steps=4, refine_steps=2, refine_fraction=0.5)
    prior.sample(grid=(4, 4), sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert len(passes.masked) == 4 + 3 * 2
    score = passes.masked[4:6] + passes.masked[7:9]  # the two halves of each pass
    assert all(sum(m) == 16 for m in zip(score[0], score[1], strict=True))
    assert all(sum(m) == 16 for m in zip(score[2], score[3], strict=True))
    # the redraws: half of the 16 codes, then half of that (fraction * (1 - j / K))
    assert passes.masked[6] == [8] and passes.masked[9] == [4]


def test_refinement_redraws_the_codes_the_prior_finds_least_likely(monkeypatch):
    """A prior sure that every code is 0: the one code that is not gets re-masked and redrawn."""
    prior = _prior(vocab_size=4)
    codes = torch.zeros(1, 16, dtype=torch.long)
    codes[0, 5] = 3
    big = torch.tensor([20.0, 0.0, 0.0, 0.0])

    def logits(tokens, conds, positions=None, **kw):
        return big.expand(int(positions.sum()), 4)

    monkeypatch.setattr(prior, "_logits", logits)
    request = _request(prior, SamplerConfig(refine_steps=1, refine_fraction=1 / 16))
    free = torch.ones(1, 16, dtype=torch.bool)
    assert torch.equal(prior._refine(codes, free, 0, request), torch.zeros(1, 16).long())
    free[0, 5] = False  # a given code is never re-masked, however unlikely
    out = prior._refine(codes, free, 0, request)
    assert int(out[0, 5]) == 3 and int((out != codes).sum()) == 0  # one 0 redrawn as 0


def test_refinement_keeps_the_given_codes_and_the_seed_decides(monkeypatch):
    prior = _prior()
    given = torch.randint(8, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    prefix = given.clone()
    prefix[:, 2:] = -1
    sampler = SamplerConfig(steps=4, refine_steps=3, refine_fraction=1.0)

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return prior.sample(prefix=prefix, grid=(4, 4), sampler=sampler, generator=g)

    out = draw(0)
    assert torch.equal(out[:, :2], given[:, :2]) and torch.equal(out, draw(0))
    assert not torch.equal(out, draw(1))
    plain = prior.sample(
        prefix=prefix,
        grid=(4, 4),
        sampler=SamplerConfig(steps=4),
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.equal(out, plain)  # the refinement passes drew codes again
    full = prior.sample(prefix=given, grid=(4, 4), sampler=sampler)  # nothing free
    assert torch.equal(full, given)


def test_refinement_repairs_what_one_pass_cannot_keep_consistent():
    """Every training grid is one code repeated. Drawn in one pass, each code is drawn alone,
    so a grid mixes codes; refinement redraws the odd ones given the rest, and grids agree."""
    prior = _prior(vocab_size=4, steps=1).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        c = torch.randint(4, (16, 1, 1), generator=g).expand(-1, 4, 4).contiguous()
        opt.zero_grad()
        prior.loss(c).backward()
        opt.step()
    prior.eval()

    def agreement(sampler: SamplerConfig) -> float:
        out = prior.sample(
            grid=(4, 4),
            num_samples=64,
            sampler=sampler,
            generator=torch.Generator().manual_seed(1),
        ).view(64, 16)
        return float((out == out.mode(-1).values[:, None]).float().mean())

    one_pass = agreement(SamplerConfig(steps=1))
    refined = agreement(SamplerConfig(steps=1, refine_steps=4, refine_fraction=0.5))
    assert one_pass < 0.6 and refined > 0.9


def test_refinement_passes_report_no_new_codes_and_can_be_cancelled():
    """``latentgen serve`` hears from each refinement pass (no new codes) and can stop it."""
    prior = _prior()
    sampler = SamplerConfig(steps=4, refine_steps=2)
    seen = []
    prior.sample(grid=(4, 4), sampler=sampler, on_code=lambda d, t: seen.append((d, t)))
    assert len(seen) == 1 + 4 + 2 and seen[-3:] == [(16, 16)] * 3  # last pass, 2 refinements

    class Stop(Exception):
        pass

    calls = []

    def stop(done, total):
        calls.append(done)
        if len(calls) == 6:  # the first refinement pass
            raise Stop

    with pytest.raises(Stop):
        prior.sample(grid=(4, 4), sampler=sampler, on_code=stop)
    assert len(calls) == 6


def test_refinement_shows_on_the_progress_bar(capsys):
    _prior().sample(grid=(4, 4), sampler=SamplerConfig(steps=5, refine_steps=2), progress=True)
    err = capsys.readouterr().err
    assert "sampling (masked, 5 steps + 2 refinements)" in err and "7/7" in err


def test_refinement_settings_out_of_range_name_the_limits():
    with pytest.raises(ValidationError, match="refine_steps"):
        SamplerConfig(refine_steps=-1)
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="refine_fraction"):
            SamplerConfig(refine_fraction=bad)


# -- the likelihood bound -------------------------------------------------------------------------
def _exact_elbo(prior: MaskedPrior, codes: torch.Tensor) -> torch.Tensor:
    """The bound by enumeration: sum over m of the mean over all m-subsets S of
    (1/m) sum_{i in S} log p(x_i | x outside S)."""
    b, n = codes.shape[0], codes[0].numel()
    flat = codes.reshape(b, n)
    total = torch.zeros(b, dtype=torch.float64)
    for m in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), m))
        acc = torch.zeros(b, dtype=torch.float64)
        for s in subsets:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[list(s)] = True
            with torch.no_grad():
                lp = prior._logits(flat.masked_fill(mask, prior.mask_id), {}).log_softmax(-1)
            acc += lp[:, mask].gather(-1, flat[:, mask, None]).squeeze(-1).sum(-1).double() / m
        total += acc / len(subsets)
    return total


def test_the_elbo_is_a_bound_summing_to_at_most_one():
    """exp(ELBO) over every grid of 3 codes from 3 sums to <= 1: a lower bound of a proper
    distribution's log-likelihood (Jensen over decoding orders)."""
    prior = _prior(vocab_size=3, block_size=3)
    grids = torch.tensor(list(itertools.product(range(3), repeat=3))).view(27, 1, 3)
    mass = float(_exact_elbo(prior, grids).exp().sum())
    assert 0.3 < mass <= 1.0 + 1e-9


def test_log_prob_estimates_the_bound_deterministically_and_per_grid():
    prior = _prior(vocab_size=4, block_size=4, elbo_samples=400)
    codes = torch.randint(4, (3, 2, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = prior.log_prob(codes)
        again = prior.log_prob(codes)
        alone = prior.log_prob(codes[1:2])
    assert torch.equal(lp, again)  # fixed, seeded mask draws
    torch.testing.assert_close(alone, lp[1:2])  # the same draws whatever the batch
    torch.testing.assert_close(lp.double(), _exact_elbo(prior, codes), rtol=0.03, atol=0.03)
    assert (lp < 0).all()
    other = _prior(vocab_size=4, block_size=4, elbo_samples=400, elbo_seed=1)
    assert not torch.equal(other.log_prob(codes), lp)


def test_loss_is_the_masked_objective_in_training_and_the_bound_in_eval():
    prior = _prior()
    codes = torch.randint(8, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        elbo = prior.loss(codes)
        torch.testing.assert_close(elbo, -prior.log_prob(codes).sum() / codes.numel())
    prior.train()
    torch.manual_seed(0)
    loss = prior.loss(codes)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in prior.blocks.parameters())
    assert prior.tok_emb.weight.grad[prior.mask_id].abs().sum() > 0  # the mask token is learned


def test_the_head_reads_only_the_masked_positions(monkeypatch):
    """Sampling, training and the bound put only the masked positions through ln_f and the
    head, and those logits are the full pass's logits at the same positions."""
    prior = _prior(conditions={"label": {"vocab_size": 3}}, cond_dropout=0.1)
    tokens = torch.randint(8, (3, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.4
    tokens = tokens.masked_fill(positions, prior.mask_id)
    conds = _labels(0, 1, 2)
    with torch.no_grad():
        full = prior._logits(tokens, conds)  # [3, 16, 8]
        part = prior._logits(tokens, conds, positions)  # [M, 8]
    assert part.shape == (int(positions.sum()), 8)
    torch.testing.assert_close(part, full[positions])

    head_rows: list[int] = []
    prior.head.register_forward_hook(lambda m, i, o: head_rows.append(int(i[0].shape[0])))
    passes = _Passes(prior, monkeypatch)
    prefix = torch.full((2, 4, 4), -1)
    prefix[:, :2] = 5  # half the grid given
    sampler = SamplerConfig(steps=4, guidance_scale=2.0)
    prior.sample(_labels(0, 1), grid=(4, 4), prefix=prefix, sampler=sampler)
    # 2B rows per pass (guidance); the head gets exactly the masked codes of those rows
    assert head_rows == [sum(m) for m in passes.masked]
    assert head_rows[0] == 2 * 2 * 8 and head_rows[-1] < head_rows[0]

    seen = {}
    inner = prior._logits

    def spy(tokens, conds, positions=None, **kw):
        seen.update(tokens=tokens, conds=conds, positions=positions)
        return inner(tokens, conds, positions, **kw)

    monkeypatch.setattr(prior, "_logits", spy)
    prior.train()
    codes = torch.randint(8, (4, 4, 4), generator=torch.Generator().manual_seed(3))
    loss = prior.loss(codes, _labels(0, 1, 2, 0))
    mask = seen["positions"]
    assert mask is not None and bool(mask.any()) and not bool(mask.all())
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(
            inner(seen["tokens"], seen["conds"])[mask], codes.reshape(4, 16)[mask]
        )
    torch.testing.assert_close(loss.detach(), want)


def test_a_training_batch_covers_the_mask_ratios_evenly(monkeypatch):
    """The B grids of a batch draw their mask ratio from B equal slices of u, one each (a
    stratified draw), so the masked counts span the schedule instead of clustering by chance."""
    prior = _prior(block_size=64, steps=8).train()
    seen: list[Tensor] = []
    inner = prior._logits

    def spy(tokens, conds, positions=None, **kw):
        seen.append(positions)
        return inner(tokens, conds, positions, **kw)

    monkeypatch.setattr(prior, "_logits", spy)
    b, n = 8, 64
    for seed in range(5):
        torch.manual_seed(seed)
        prior.loss(torch.randint(8, (b, 8, 8)))
        counts = sorted(seen[-1].sum(-1).tolist(), reverse=True)  # most masked first
        for i, c in enumerate(counts):  # u in [i/b, (i+1)/b): gamma(u) in its slice
            lo = math.ceil(math.cos((i + 1) / b * math.pi / 2) * n - 1e-6)
            hi = math.ceil(math.cos(i / b * math.pi / 2) * n - 1e-6)
            assert max(lo, 1) <= c <= hi, (seed, i, c, lo, hi)


def test_label_smoothing_smooths_the_training_loss_only(monkeypatch):
    prior = _prior(label_smoothing=0.1)
    plain = _prior()
    codes = torch.randint(8, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the bound (eval loss) is the plain one: smoothing is for training
        torch.testing.assert_close(prior.loss(codes), plain.loss(codes))
    seen = {}
    inner = prior._logits

    def spy(tokens, conds, positions=None, **kw):
        seen.update(tokens=tokens, positions=positions)
        return inner(tokens, conds, positions, **kw)

    monkeypatch.setattr(prior, "_logits", spy)
    prior.train()
    loss = prior.loss(codes)
    mask = seen["positions"]
    with torch.no_grad():
        logits = inner(seen["tokens"], {})[mask]
        target = codes.reshape(4, 16)[mask]
        smooth = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
        hard = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(loss.detach(), smooth)
    assert not torch.isclose(smooth, hard)
    with pytest.raises(ValidationError, match="label_smoothing"):
        MaskedPriorConfig(label_smoothing=1.0)


def test_training_learns_a_class_conditional_pattern():
    """Each class is one constant grid: after training, samples and the bound follow the label."""
    prior = _prior(
        vocab_size=8, conditions={"label": {"vocab_size": 3}}, cond_dropout=0.1, steps=4
    ).train()
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    ys = torch.tensor([0, 1, 2] * 4)
    codes = (ys * 3)[:, None, None].expand(-1, 4, 4).contiguous()  # class y -> all codes 3y
    with torch.no_grad():
        before = -prior.eval().log_prob(codes[:3], _labels(0, 1, 2)).mean() / 16
    prior.train()
    for _ in range(150):
        opt.zero_grad()
        prior.loss(codes, {"label": Conditioning(tokens=ys[:, None], vocab_size=3)}).backward()
        opt.step()
    prior.eval()
    with torch.no_grad():
        after = -prior.log_prob(codes[:3], _labels(0, 1, 2)).mean() / 16
    assert after < 0.2 < before
    greedy = SamplerConfig(top_k=1)
    out = prior.sample(_labels(0, 1, 2), grid=(4, 4), sampler=greedy)
    assert torch.equal(out, codes[:3])


# -- bad input ---------------------------------------------------------------------------------
def test_steps_out_of_range_name_the_fix(monkeypatch):
    prior = _prior()
    with pytest.raises(InputError, match=r"steps=17 for a 4x4 grid of 16 codes.*1 <= steps <= 16"):
        prior.sample(grid=(4, 4), sampler=SamplerConfig(steps=17))
    passes = _Passes(prior, monkeypatch)
    prior.sample(grid=(2, 2))  # the config's 12 on a 4-code grid: one pass per code
    assert len(passes.masked) == 4
    with pytest.raises(ValidationError, match="use steps >= 1"):
        SamplerConfig(steps=0)
    with pytest.raises(ValidationError, match="steps <= 16"):
        MaskedPriorConfig(block_size=16, steps=20)


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValidationError, match="unknown mask_schedule 'cosin'; use one of cosine"):
        MaskedPriorConfig(mask_schedule="cosin")
    with pytest.raises(InputError, match="use one of cosine, linear"):
        mask_ratio("exp", torch.zeros(1))


def test_prefix_codes_outside_the_vocabulary_are_refused():
    prior = _prior()
    prefix = torch.full((1, 4, 4), -1)
    prefix[0, 2, 2] = 8
    with pytest.raises(InputError, match=r"prefix codes must lie in \[0, 8\) or be -1"):
        prior.sample(prefix=prefix, grid=(4, 4))
    prefix[0, 2, 2] = -2
    with pytest.raises(InputError, match=r"prefix codes must lie in \[0, 8\)"):
        prior.sample(prefix=prefix, grid=(4, 4))


def test_a_grid_beyond_the_trained_positions_is_refused():
    prior = _prior()
    with pytest.raises(InputError, match=r"5x4 \(20 codes\).*block_size=16.*no sliding window"):
        prior.sample(grid=(5, 4))
    with pytest.raises(InputError, match="block_size=16"):
        prior.log_prob(torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(InputError, match="no sliding window"):
        prior.sample(grid=(4, 4), sampler=SamplerConfig(window_size=(2, 2)))


def test_the_gpt_prior_reads_no_steps():
    """SamplerConfig.steps and refine_steps are for priors that decode in passes; the GPT prior
    draws the same."""
    torch.manual_seed(0)
    gpt = TransformerPrior(
        TransformerPriorConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16)
    ).eval()
    a = gpt.sample(grid=(4, 4), generator=torch.Generator().manual_seed(0))
    b = gpt.sample(
        grid=(4, 4),
        sampler=SamplerConfig(steps=3, refine_steps=2),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(a, b)


def test_local_conv_reaches_the_grid_neighbours_of_a_code_and_no_further():
    """With attention switched off (its output projection zeroed), a code's logits depend on
    the codes within n_layer steps of it on the 2-D grid: the one below it (8 places on in
    raster order) but not the one three columns on (3 places on)."""
    prior = _prior(block_size=64, local_conv=3)
    with torch.no_grad():
        for block in prior.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
        for conv in prior.local:
            conv.weight.normal_(0, 0.5)
    tokens = torch.randint(8, (1, 64), generator=torch.Generator().manual_seed(0))
    at = 3 * 8 + 3  # the code at row 3, column 3

    def moved(pos: int) -> bool:
        other = tokens.clone()
        other[0, pos] = (other[0, pos] + 1) % 8
        with torch.no_grad():
            a = prior._logits(tokens, {}, grid=(8, 8))[0, at]
            b = prior._logits(other, {}, grid=(8, 8))[0, at]
        return not torch.allclose(a, b)

    assert moved(at + 8) and moved(at + 16) and moved(at - 2) and moved(at + 8 + 1)
    assert not moved(at + 3) and not moved(at + 24) and not moved(at - 3 * 8)
    # the same grid read as 4x16 puts other codes next to it
    with torch.no_grad():
        wide = prior._logits(tokens, {}, grid=(4, 16))[0, at]
        assert not torch.allclose(wide, prior._logits(tokens, {}, grid=(8, 8))[0, at])


def test_local_conv_starts_as_the_identity_and_trains():
    plain = _prior(conditions={"label": {"vocab_size": 3}})
    local = _prior(conditions={"label": {"vocab_size": 3}}, local_conv=5)
    missing = local.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("local.") for k in missing)
    tokens = torch.randint(8, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            local._logits(tokens, _labels(0, 1), grid=(4, 4)),
            plain._logits(tokens, _labels(0, 1), grid=(4, 4)),
        )
    local.train()
    local.loss(tokens.view(2, 4, 4), _labels(0, 1)).backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in local.local)


def test_an_even_local_conv_names_the_fix():
    with pytest.raises(ValidationError, match=r"local_conv=4 is even.*\(5, or 3\)"):
        MaskedPriorConfig(local_conv=4)


def test_self_conditioning_starts_as_the_identity():
    plain = _prior(conditions={"label": {"vocab_size": 3}})
    sc = _prior(conditions={"label": {"vocab_size": 3}}, self_condition=True)
    missing = sc.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["sc_proj.weight"]
    tokens = torch.randint(8, (2, 16), generator=torch.Generator().manual_seed(0))
    belief = torch.rand(2, 16, 8).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(
            sc._logits(tokens, _labels(0, 1), sc=belief), plain._logits(tokens, _labels(0, 1))
        )


def test_self_conditioning_trains_on_half_the_steps_with_a_first_pass(monkeypatch):
    """About half the training steps run a first pass without gradients and give its
    probabilities (at the masked codes only, rows summing to one) to the second."""
    prior = _prior(conditions={"label": {"vocab_size": 3}}, self_condition=True).train()
    calls: list[Tensor | None] = []
    inner = prior._logits

    def spy(tokens, conds, positions=None, **kw):
        sc = kw.get("sc")
        calls.append(sc)
        if sc is not None:
            masked = tokens == prior.mask_id
            torch.testing.assert_close(sc.sum(-1), masked.float())
        return inner(tokens, conds, positions, **kw)

    monkeypatch.setattr(prior, "_logits", spy)
    codes = torch.randint(8, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for _ in range(40):
        loss = prior.loss(codes, _labels(0, 1, 2, 0))
    loss.backward()
    with_sc = sum(sc is not None for sc in calls)
    assert len(calls) == 40 + with_sc and 10 < with_sc < 30


def test_self_conditioned_sampling_feeds_each_pass_the_last_ones_beliefs(monkeypatch):
    prior = _prior(conditions={"label": {"vocab_size": 3}}, cond_dropout=0.1, self_condition=True)
    seen: list[tuple[Tensor, Tensor | None]] = []
    inner = prior._logits

    def spy(tokens, conds, positions=None, **kw):
        seen.append((tokens.clone(), kw.get("sc")))
        return inner(tokens, conds, positions, **kw)

    monkeypatch.setattr(prior, "_logits", spy)
    sampler = SamplerConfig(steps=4, guidance_scale=2.0)
    codes = prior.sample(_labels(0, 1), grid=(4, 4), sampler=sampler)
    assert codes.shape == (2, 4, 4) and len(seen) == 4
    assert seen[0][1] is None  # nothing to go on in the first pass
    for tokens, sc in seen[1:]:
        assert sc is not None and sc.shape == (4, 16, 8)  # conditional and null rows
        # a belief for every code still masked, none for the codes already drawn
        torch.testing.assert_close(sc.sum(-1), (tokens == prior.mask_id).float())
    with torch.no_grad():
        lp = prior.log_prob(codes, _labels(0, 1))
        assert torch.equal(lp, prior.log_prob(codes, _labels(0, 1)))
