"""PixelSNAIL prior: causality, likelihood, sampling, conditioning, weights round-trip."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.base import ConditionSlot
from latentgen.priors.pixelsnail import PixelSNAILConfig, PixelSNAILPrior
from latentgen.specs import SamplerConfig

TINY: dict[str, Any] = dict(
    vocab_size=4,
    channel=8,
    res_channel=8,
    kernel_size=3,
    n_block=2,
    n_res_block=2,
    n_head=2,
    key_channel=8,
    value_channel=8,
    dropout=0.0,
    max_height=8,
    max_width=8,
)


def tiny(**overrides: Any) -> PixelSNAILPrior:
    torch.manual_seed(0)
    return PixelSNAILPrior(PixelSNAILConfig(**{**TINY, **overrides}))


def label(values: list[int], vocab: int = 2, drop: list[bool] | None = None) -> Conditioning:
    d = None if drop is None else torch.tensor(drop)
    return Conditioning(torch.tensor(values)[:, None], vocab, drop=d)


def dependence(model: PixelSNAILPrior, codes: torch.Tensor, conds: Any = None) -> torch.Tensor:
    """``D[i, j]`` = max |d logits at raster i / d input embedding at raster j|, for one grid."""
    emb = model.embed(codes).detach().requires_grad_(True)  # [1, h, w, C]
    hook = model.embed.register_forward_hook(lambda *_: emb)
    try:
        logits = model(codes, conds)[0].flatten(1)  # [K, L]
    finally:
        hook.remove()
    n = logits.shape[1]
    dep = torch.zeros(n, n)
    for i in range(n):
        (g,) = torch.autograd.grad(logits[:, i].sum(), emb, retain_graph=True)
        dep[i] = g[0].flatten(0, 1).abs().amax(-1)  # [L]
    return dep


# -- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [True, False])
def test_logits_at_i_depend_exactly_on_codes_before_i(attention: bool) -> None:
    model = tiny(attention=attention).eval()
    codes = torch.randint(0, 4, (1, 5, 5), generator=torch.Generator().manual_seed(1))
    dep = dependence(model, codes)  # [25, 25]
    idx = torch.arange(25)
    before = idx[None, :] < idx[:, None]  # j < i in raster order
    # Strict causality: nothing at or after i reaches logits at i (structural zeros).
    assert dep[~before].max().item() == 0.0
    # No blind spot: every earlier code reaches every later position, with or without attention
    # (4 residual layers cover a 5x5 grid through the vertical stream).
    assert dep[before].min().item() > 0.0


def test_causality_holds_with_conditions_and_perturbed_codes() -> None:
    model = tiny(conditions={"seg": ConditionSlot(vocab_size=3, num_tokens=4)}).eval()
    gen = torch.Generator().manual_seed(2)
    base = torch.randint(0, 4, (1, 5, 5), generator=gen)
    seg = Conditioning(torch.randint(0, 3, (26, 4), generator=gen)[:1].repeat(26, 1), 3, (2, 2))
    # Row 0 is the base grid, row 1+j changes the code at raster position j.
    codes = base.repeat(26, 1, 1).view(26, 25)
    j = torch.arange(25)
    codes[1 + j, j] = (codes[1 + j, j] + 1) % 4
    with torch.no_grad():
        logits = model(codes.view(26, 5, 5), {"seg": seg}).flatten(2)  # [26, K, 25]
    diff = (logits[1:] - logits[:1]).abs().amax(1)  # [25 (j), 25 (i)]
    after = j[None, :] > j[:, None]
    # Batched kernels may round differently per row, so compare with a tolerance here; the
    # autograd test above checks the exact zeros.
    assert diff[~after].max().item() < 1e-5
    assert diff[after].min().item() > 1e-5


def test_cropped_forward_matches_full_forward() -> None:
    # Sampling crops to the rows drawn so far; it is only exact if no layer looks down.
    model = tiny(conditions={"seg": ConditionSlot(vocab_size=3, num_tokens=4)}).eval()
    codes = torch.randint(0, 4, (2, 6, 5), generator=torch.Generator().manual_seed(3))
    seg = Conditioning(torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]]), 3, (2, 2))
    with torch.no_grad():
        full = model(codes, {"seg": seg})
        cond = model._condition_map({"seg": seg}, (6, 5), 2)
        for r in range(6):
            part = model._logits(codes[:, : r + 1], cond)
            torch.testing.assert_close(part, full[:, :, : r + 1], rtol=1e-5, atol=1e-5)


# -- likelihood ----------------------------------------------------------------------------------


def test_log_prob_is_sum_of_per_position_log_softmax() -> None:
    model = tiny(conditions={"label": ConditionSlot(vocab_size=2)}).eval()
    codes = torch.randint(0, 4, (3, 4, 5), generator=torch.Generator().manual_seed(4))
    conds = {"label": label([0, 1, 1])}
    with torch.no_grad():
        lp = model.log_prob(codes, conds)
        logits = model(codes, conds)  # [B, K, h, w]
    manual = torch.zeros(3)
    for b in range(3):
        for r in range(4):
            for c in range(5):
                manual[b] += logits[b, :, r, c].log_softmax(-1)[codes[b, r, c]]
    assert lp.shape == (3,)
    torch.testing.assert_close(lp, manual, rtol=1e-5, atol=1e-4)
    loss = model.loss(codes, conds)
    torch.testing.assert_close(loss, -lp.sum() / codes.numel())


def test_dropped_condition_equals_null_and_cond_dropout_one_drops_all() -> None:
    model = tiny(conditions={"label": ConditionSlot(vocab_size=2)}, cond_dropout=1.0)
    codes = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        nulled = model.log_prob(codes, {"label": label([0, 1], drop=[True, True])})
        other = model.log_prob(codes, {"label": label([1, 0], drop=[True, True])})
        kept = model.log_prob(codes, {"label": label([0, 1])})
        model.train()  # cond_dropout=1 drops every sample in the training loss ...
        train = model.loss(codes, {"label": label([0, 1])})
        exact = model.log_prob(codes, {"label": label([0, 1])})  # ... and never in log_prob
    torch.testing.assert_close(nulled, other)  # the label no longer matters
    torch.testing.assert_close(train, -nulled.sum() / codes.numel())
    torch.testing.assert_close(exact, kept)
    assert not torch.allclose(kept, nulled)


# -- sampling ----------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_seed_dependent() -> None:
    model = tiny()
    s1 = model.sample(grid=(4, 5), num_samples=3, generator=torch.Generator().manual_seed(7))
    s2 = model.sample(grid=(4, 5), num_samples=3, generator=torch.Generator().manual_seed(7))
    s3 = model.sample(grid=(4, 5), num_samples=3, generator=torch.Generator().manual_seed(8))
    assert s1.shape == (3, 4, 5) and s1.dtype == torch.long
    assert int(s1.min()) >= 0 and int(s1.max()) < 4
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    assert model.training  # sampling restores the mode it found


def test_prefix_codes_are_kept() -> None:
    model = tiny()
    prefix = torch.full((2, 4, 4), -1)
    prefix[:, :2] = torch.randint(0, 4, (2, 2, 4), generator=torch.Generator().manual_seed(9))
    prefix[0, 3, 3] = 2
    out = model.sample(grid=(4, 4), prefix=prefix, generator=torch.Generator().manual_seed(0))
    given = prefix >= 0
    assert torch.equal(out[given], prefix[given])
    assert int(out.min()) >= 0


def test_guidance_scale_zero_samples_the_null_branch() -> None:
    model = tiny(conditions={"label": ConditionSlot(vocab_size=2)})
    guided = model.sample(
        {"label": label([0, 1])},
        grid=(3, 3),
        sampler=SamplerConfig(guidance_scale=0.0),
        generator=torch.Generator().manual_seed(11),
    )
    null = model.sample(
        {"label": label([0, 1], drop=[True, True])},
        grid=(3, 3),
        generator=torch.Generator().manual_seed(11),
    )
    assert torch.equal(guided, null)


def test_batch_size_rules() -> None:
    model = tiny(conditions={"label": ConditionSlot(vocab_size=2)})
    out = model.sample({"label": label([0, 1]).repeat(2)}, grid=(2, 2))
    assert out.shape == (4, 2, 2)
    with pytest.raises(InputError, match="num_samples=3"):
        model.sample({"label": label([0, 1])}, grid=(2, 2), num_samples=3)
    with pytest.raises(InputError, match="unconditional"):
        tiny().sample(grid=(2, 2), sampler=SamplerConfig(guidance_scale=2.0))


# -- learning ----------------------------------------------------------------------------------


def train(model: PixelSNAILPrior, batch_fn: Any, steps: int, lr: float = 1e-2) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        codes, conds = batch_fn()
        loss = model.loss(codes, conds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_learns_a_fixed_pattern_and_samples_it() -> None:
    k = 8
    model = tiny(vocab_size=k, channel=16, res_channel=16, n_block=1, key_channel=16)
    pattern = torch.randint(0, k, (1, 4, 4), generator=torch.Generator().manual_seed(12))
    loss = train(model, lambda: (pattern.expand(8, -1, -1), None), steps=150)
    assert loss < 0.05 * math.log(k)
    out = model.sample(grid=(4, 4), num_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, pattern.expand(4, -1, -1))


def test_learns_one_pattern_per_label_and_follows_the_label() -> None:
    k = 8
    model = tiny(
        vocab_size=k,
        channel=16,
        res_channel=16,
        n_block=1,
        key_channel=16,
        conditions={"label": ConditionSlot(vocab_size=2)},
        cond_dropout=0.1,
    )
    patterns = torch.randint(0, k, (2, 4, 4), generator=torch.Generator().manual_seed(13))
    assert not torch.equal(patterns[0], patterns[1])

    def batch() -> tuple[torch.Tensor, dict[str, Conditioning]]:
        lab = torch.randint(0, 2, (16,))
        return patterns[lab], {"label": Conditioning(lab[:, None], 2)}

    loss = train(model, batch, steps=200)
    assert loss < 0.1 * math.log(k)
    lab = [1, 0, 0, 1]
    for scale in (1.0, 3.0):  # plain and classifier-free guided
        out = model.sample(
            {"label": label(lab)},
            grid=(4, 4),
            sampler=SamplerConfig(guidance_scale=scale),
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.equal(out, patterns[lab])


def test_learns_to_follow_a_spatial_condition() -> None:
    k = 8
    model = tiny(
        vocab_size=k,
        channel=16,
        res_channel=16,
        n_block=1,
        n_res_block=1,
        key_channel=16,
        conditions={"seg": ConditionSlot(vocab_size=3, num_tokens=4)},
    )

    def upsample(seg: torch.Tensor) -> torch.Tensor:
        return seg.repeat_interleave(2, 1).repeat_interleave(2, 2)  # [B, 2, 2] -> [B, 4, 4]

    def batch() -> tuple[torch.Tensor, dict[str, Conditioning]]:
        seg = torch.randint(0, 3, (16, 2, 2))
        return upsample(seg), {"seg": Conditioning(seg.flatten(1), 3, grid=(2, 2))}

    loss = train(model, batch, steps=150)
    assert loss < 0.05 * math.log(k)
    seg = torch.tensor([[[0, 1], [2, 0]], [[2, 2], [1, 0]]])
    out = model.sample(
        {"seg": Conditioning(seg.flatten(1), 3, grid=(2, 2))},
        grid=(4, 4),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out, upsample(seg))


# -- weights and config --------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path: Any) -> None:
    cfg = PixelSNAILConfig(**TINY, conditions={"label": ConditionSlot(vocab_size=3)})
    torch.manual_seed(0)
    model = PixelSNAILPrior(cfg).eval()
    path = tmp_path / "prior.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    again = PixelSNAILPrior(PixelSNAILConfig.model_validate_json(cfg.model_dump_json())).eval()
    codes = torch.randint(0, 4, (2, 3, 4), generator=torch.Generator().manual_seed(14))
    conds = {"label": Conditioning(torch.tensor([[2], [0]]), 3)}
    with torch.no_grad():
        assert not torch.allclose(again.log_prob(codes, conds), model.log_prob(codes, conds))
        again.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(again.log_prob(codes, conds), model.log_prob(codes, conds))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="odd"):
        PixelSNAILConfig(kernel_size=4)
    with pytest.raises(ValidationError, match="divisible"):
        PixelSNAILConfig(n_head=3, key_channel=128)
    with pytest.raises(ValidationError):
        PixelSNAILConfig(extra_field=1)
    assert PixelSNAILPrior.type_name() == "pixelsnail"


# -- errors ------------------------------------------------------------------------------------


def test_errors_name_the_problem() -> None:
    model = tiny(conditions={"label": ConditionSlot(vocab_size=2)})
    ok = {"label": label([0])}
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        model.log_prob(torch.full((1, 2, 2), 4), ok)
    with pytest.raises(InputError, match="max_height"):
        model.log_prob(torch.zeros(1, 9, 2, dtype=torch.long), ok)
    # A wider grid is drawn with the sliding window; a narrower-than-window tall one cannot be.
    assert model.sample(ok, grid=(2, 9), generator=torch.Generator().manual_seed(0)).shape == (
        1,
        2,
        9,
    )
    with pytest.raises(InputError, match="2 codes wide"):
        model.sample(ok, grid=(9, 2))
    with pytest.raises(InputError, match="missing"):
        model.log_prob(torch.zeros(1, 2, 2, dtype=torch.long), {})
    with pytest.raises(InputError, match="vocab_size=5"):
        model.log_prob(torch.zeros(1, 2, 2, dtype=torch.long), {"label": label([0], vocab=5)})
    with pytest.raises(InputError, match=r"\[0, 2\)"):
        model.log_prob(torch.zeros(1, 2, 2, dtype=torch.long), {"label": label([2])})
    with pytest.raises(InputError, match="batch size"):
        model.log_prob(torch.zeros(2, 2, 2, dtype=torch.long), ok)
    with pytest.raises(InputError, match="prefix"):
        model.sample(ok, grid=(2, 2), prefix=torch.full((1, 3, 2), -1))
    with pytest.raises(InputError, match="prefix codes"):
        model.sample(ok, grid=(2, 2), prefix=torch.full((1, 2, 2), -2))

    spatial = tiny(conditions={"seg": ConditionSlot(vocab_size=3, num_tokens=4)})
    with pytest.raises(InputError, match="no grid"):
        spatial.log_prob(
            torch.zeros(1, 2, 2, dtype=torch.long),
            {"seg": Conditioning(torch.zeros(1, 4, dtype=torch.long), 3)},
        )
    with pytest.raises(InputError, match="num_tokens=4"):
        spatial.log_prob(
            torch.zeros(1, 2, 2, dtype=torch.long),
            {"seg": Conditioning(torch.zeros(1, 1, dtype=torch.long), 3)},
        )


# -- cached sampling -------------------------------------------------------------------------------


def sharp(**overrides: Any) -> PixelSNAILPrior:
    """A tiny model pushed far from its init, so logits differ clearly between positions and any
    error in the cache shows."""
    model = tiny(**overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def spatial(batch: int) -> Conditioning:
    tokens = torch.randint(0, 3, (batch, 4), generator=torch.Generator().manual_seed(3))
    return Conditioning(tokens, 3, grid=(2, 2))


CACHE_CASES: dict[str, tuple[dict[str, Any], Any, SamplerConfig]] = {
    "plain": ({}, None, SamplerConfig()),
    "no-attention-k5": ({"attention": False, "kernel_size": 5}, None, SamplerConfig()),
    "k5-topk": ({"kernel_size": 5, "vocab_size": 12}, None, SamplerConfig(top_k=5)),
    "label-guided": (
        {"conditions": {"label": ConditionSlot(vocab_size=2)}},
        {"label": label([0, 1, 1])},
        SamplerConfig(guidance_scale=2.5, temperature=0.8),
    ),
    "spatial": (
        {"conditions": {"seg": ConditionSlot(vocab_size=3, num_tokens=4)}},
        {"seg": spatial(3)},
        SamplerConfig(top_p=0.9),
    ),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_sampling_draws_what_the_uncached_sampler_draws(case: str) -> None:
    overrides, conds, sampler = CACHE_CASES[case]
    model = sharp(**overrides)
    kw: dict[str, Any] = {"num_samples": 3} if conds is None else {}
    draws = [
        model.sample(conds, grid=(5, 6), sampler=sampler, use_cache=use,
                     generator=torch.Generator().manual_seed(21), **kw)
        for use in (True, False)
    ]  # fmt: skip
    assert draws[0].shape == (3, 5, 6)
    assert torch.equal(draws[0], draws[1])


def test_cached_step_logits_equal_the_cropped_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stricter than equal draws: every position's logits match (greedy draws, with a prefix)."""
    import latentgen.priors.base as base

    model = sharp(conditions={"seg": ConditionSlot(vocab_size=3, num_tokens=4)})
    prefix = torch.full((2, 4, 5), -1)
    prefix[:, 1, 2:] = 1  # given codes: those positions draw nothing, the rest still see them
    seen: list[torch.Tensor] = []

    def greedy(logits: torch.Tensor, sampler: Any, generator: Any = None) -> torch.Tensor:
        seen.append(logits.clone())
        return logits.argmax(-1)

    monkeypatch.setattr(base, "draw_fast", greedy)
    runs = []
    for use in (True, False):
        seen.clear()
        out = model.sample({"seg": spatial(2)}, grid=(4, 5), prefix=prefix, use_cache=use)
        runs.append((out, list(seen)))
    (cached, lc), (uncached, lu) = runs
    assert torch.equal(cached, uncached) and torch.equal(cached[:, 1, 2:], prefix[:, 1, 2:])
    assert len(lc) == len(lu) == 4 * 5 - 3
    for a, b in zip(lc, lu):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cached_sampling_runs_small_steps_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    model = sharp()
    seen: list[int] = []
    head = model.head.forward

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return head(x)

    monkeypatch.setattr(model.head, "forward", spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.sample(grid=(2, 2), num_samples=2)  # "auto": a step this small gets one thread
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        model.sample(grid=(2, 2), num_samples=2, threads=2)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
    with pytest.raises(InputError, match=r"threads must be 'auto', None or a positive int"):
        model.sample(grid=(2, 2), num_samples=1, threads=0)
