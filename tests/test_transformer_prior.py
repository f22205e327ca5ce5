"""The GPT prior: KV cache == full re-forward, likelihoods, conditioning, checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from latentgen.conditioners.base import Conditioning
from latentgen.errors import CheckpointError, InputError, SpecError
from latentgen.priors.base import ConditionSlot
from latentgen.priors.packed_linear import prepack_available
from latentgen.priors.taming_gpt import convert_taming_gpt
from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
from latentgen.specs import SamplerConfig

K = 16
GRID = (3, 4)


def make(positions="learned", conditional=True, layout="prefix", **kw):
    if positions.endswith("+neighbours"):  # the codes above each code added to its input
        positions = positions.removesuffix("+neighbours")
        kw.setdefault("neighbours", (2, 3))
    conditions = (
        {"label": ConditionSlot(vocab_size=5), "seg": ConditionSlot(vocab_size=7, num_tokens=4)}
        if conditional
        else {}
    )
    cfg = TransformerPriorConfig(
        vocab_size=K,
        block_size=12,
        n_layer=2,
        n_head=2,
        n_embd=16,
        positions=positions,
        layout=layout,
        conditions=conditions,
        **kw,
    )
    torch.manual_seed(0)
    model = TransformerPrior(cfg).eval()
    with torch.no_grad():  # far from the tiny init, so attention is sharp and errors show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def conds_for(batch=3, seed=0, drop=None):
    g = torch.Generator().manual_seed(seed)
    return {
        "label": Conditioning(torch.randint(0, 5, (batch, 1), generator=g), 5, drop=drop),
        "seg": Conditioning(torch.randint(0, 7, (batch, 4), generator=g), 7, grid=(2, 2)),
    }


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


VARIANTS = [
    ("learned", "prefix"),
    ("rope", "prefix"),
    ("learned", "taming"),
    ("learned+neighbours", "prefix"),
]


# -- KV cache ---------------------------------------------------------------------------------
_SAMPLERS = {
    "plain": SamplerConfig(),
    "topk": SamplerConfig(top_k=5, temperature=0.8),
    "topp": SamplerConfig(top_p=0.9),
    "cfg": SamplerConfig(top_k=8, guidance_scale=3.0),
}
# Guidance needs conditions, so the unconditional model gets no "cfg" case.
_CACHE_CASES = [
    (conditional, name)
    for conditional in (False, True)
    for name in _SAMPLERS
    if conditional or name != "cfg"
]


@pytest.mark.parametrize("positions,layout", VARIANTS)
@pytest.mark.parametrize("conditional,sampler_name", _CACHE_CASES)
@pytest.mark.parametrize("mode", ["dynamic", "unpacked", "static"])
def test_cached_sampling_equals_uncached(positions, layout, conditional, sampler_name, mode):
    """Both cached decode loops (the one-token step, with prepacked weights on CPU by default
    or with ``F.linear``, and the static-shape step that ``compile=True`` compiles) draw token
    for token what the full re-forward draws."""
    sampler = _SAMPLERS[sampler_name]
    model = make(positions, conditional, layout)
    kw = {"conds": conds_for()} if conditional else {"num_samples": 3}
    opts = {"dynamic": {}, "unpacked": {"prepack": False}, "static": {"static_cache": True}}[mode]
    cached = model.sample(grid=GRID, sampler=sampler, generator=gen(1), **kw, **opts)
    uncached = model.sample(grid=GRID, sampler=sampler, generator=gen(1), use_cache=False, **kw)
    assert cached.shape == (3, *GRID) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert int(cached.min()) >= 0 and int(cached.max()) < K


@pytest.mark.parametrize("positions,layout", VARIANTS)
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize(
    "packed",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not prepack_available(), reason="this torch build has no oneDNN linear ops"
            ),
        ),
    ],
    ids=["f_linear", "prepacked"],
)
def test_cached_step_logits_equal_uncached(positions, layout, copies, packed):
    """Stricter than equal samples (which tolerate tiny errors): the logits of every step match."""
    model = make(positions, True, layout)
    codes = torch.randint(0, K, (3, 12), generator=gen(4))
    sampler = SamplerConfig(guidance_scale=3.0 if copies == 2 else 1.0)
    request = model.sample_request(conds_for(), GRID, sampler)
    assert request.rows == 3 * copies
    with torch.no_grad():
        x0 = model._prefix(request.conds, request.rows)
    seen = {"cached": [], "uncached": []}

    def recorder(key):
        def pick(logits, i):
            seen[key].append(logits.clone())
            return codes[:, i]  # teacher forcing: feed known codes

        return pick

    with torch.inference_mode():
        model._decode_cached(x0, GRID, recorder("cached"), copies, packed)
        model._decode_uncached(x0, GRID, recorder("uncached"), copies)
    torch.testing.assert_close(
        torch.stack(seen["cached"]), torch.stack(seen["uncached"]), atol=1e-5, rtol=1e-5
    )


def test_neighbours_start_at_zero_and_reach_the_rows_below_them_only():
    """A new prior with neighbours computes what the same weights without them compute; once
    trained (here: perturbed) they change the logits of every code with a row above it, and
    the logits of a code never depend on the code itself or any later one."""
    plain = make(neighbours=(0, 0))
    torch.manual_seed(0)
    fresh = TransformerPrior(plain.config.model_copy(update={"neighbours": (2, 3)})).eval()
    state = plain.state_dict()
    fresh.load_state_dict({**state, "neighbour_emb": fresh.neighbour_emb.detach()})
    codes = torch.randint(0, K, (3, *GRID), generator=gen(2))
    torch.testing.assert_close(
        fresh.code_logits(codes, conds_for()), plain.code_logits(codes, conds_for())
    )
    with torch.no_grad():
        fresh.neighbour_emb.normal_(0, 1.0, generator=gen(3))
    moved = (fresh.code_logits(codes, conds_for()) - plain.code_logits(codes, conds_for())).abs()
    moved = moved.amax(-1).amax(0).view(GRID)  # [h, w]
    assert float(moved[0].max()) < 1e-6 and bool((moved[1:] > 1e-3).all())
    base = fresh.code_logits(codes, conds_for())
    for j in range(GRID[0] * GRID[1]):
        changed = codes.clone().view(3, -1)
        changed[:, j] = (changed[:, j] + 1) % K
        diff = (fresh.code_logits(changed.view(3, *GRID), conds_for()) - base).abs()
        assert float(diff[:, : j + 1].max()) < 1e-5, j


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"neighbours": (2, 4)}, "odd width"),
        ({"neighbours": (0, 3)}, "rows >= 1"),
        ({"neighbours": (1, 3), "layout": "taming"}, "layout='prefix'"),
    ],
)
def test_bad_neighbours(kw, match):
    with pytest.raises(ValidationError, match=match):
        TransformerPriorConfig(vocab_size=K, block_size=12, n_layer=1, n_head=2, n_embd=16, **kw)


def test_cfg_changes_the_samples():
    """Guidance really mixes in the null branch (the equality test above could pass without)."""
    model = make()
    with torch.no_grad():
        for p in model.cond_null.values():
            p.normal_(0, 1.0)  # a null clearly unlike any condition
    c = conds_for(batch=8)
    plain = model.sample(c, GRID, SamplerConfig(top_k=1), gen(0))
    guided = model.sample(c, GRID, SamplerConfig(top_k=1, guidance_scale=5.0), gen(0))
    assert not torch.equal(plain, guided)


def test_same_seed_same_codes_other_seed_other_codes():
    model = make(conditional=False)
    a = model.sample(grid=GRID, generator=gen(7), num_samples=4)
    b = model.sample(grid=GRID, generator=gen(7), num_samples=4)
    c = model.sample(grid=GRID, generator=gen(8), num_samples=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampled_codes_are_usable_for_training():
    model = make(conditional=False).train()
    codes = model.sample(grid=GRID, generator=gen(0), num_samples=2)
    assert not codes.is_inference()
    model.loss(codes).backward()
    assert model.tok_emb.weight.grad is not None


@pytest.mark.parametrize("use_cache", [True, False])
def test_prefix_codes_are_kept(use_cache):
    model = make()
    prefix = torch.randint(0, K, (3, *GRID), generator=gen(3))
    hole = torch.rand(3, *GRID, generator=gen(4)) < 0.5
    prefix[hole] = -1
    out = model.sample(
        conds_for(), GRID, SamplerConfig(), gen(5), prefix=prefix, use_cache=use_cache
    )
    assert torch.equal(out[~hole], prefix[~hole])
    # The holes are drawn (not copied from anywhere): some differ across seeds.
    out2 = model.sample(
        conds_for(), GRID, SamplerConfig(), gen(6), prefix=prefix, use_cache=use_cache
    )
    assert torch.equal(out2[~hole], prefix[~hole]) and not torch.equal(out[hole], out2[hole])


def test_prefix_cached_equals_uncached_and_conditions_on_given_codes():
    model = make(conditional=False)
    prefix = torch.full((2, *GRID), -1)
    prefix[:, 0] = torch.arange(4)  # first row given
    a = model.sample(grid=GRID, generator=gen(2), prefix=prefix)
    b = model.sample(grid=GRID, generator=gen(2), prefix=prefix, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a[:, 0], prefix[:, 0])


# -- likelihood -------------------------------------------------------------------------------
@pytest.mark.parametrize("positions,layout", VARIANTS)
@pytest.mark.parametrize("conditional", [False, True])
def test_log_prob_is_sum_of_stepwise_log_softmax(positions, layout, conditional):
    model = make(positions, conditional, layout)
    codes = torch.randint(0, K, (3, *GRID), generator=gen(9))
    conds = conds_for() if conditional else None
    lp = model.log_prob(codes, conds)
    flat = codes.reshape(3, -1)
    ref = torch.zeros(3)
    with torch.no_grad():
        x0 = model._prefix(model.check_conds(conds), 3)
        near = model._with_neighbours(None, codes)  # the codes above each code, if it has them
        for i in range(flat.shape[1]):  # uncached: the whole sequence up to code i
            x = torch.cat((x0, model._embed_codes(flat[:, :i], 0, near)), dim=1) if i else x0
            logits = model._head(model._run(x)[:, -1])  # [B, K]
            ref += logits.log_softmax(-1).gather(-1, flat[:, i : i + 1]).squeeze(-1)
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model.loss(codes, conds), -lp.sum() / codes.numel())
    assert lp.shape == (3,) and (lp < 0).all()
    assert model.bits_per_code(-lp.mean().item() / 12) > 0


def test_log_prob_depends_on_every_condition_token():
    model = make()
    codes = torch.randint(0, K, (3, *GRID), generator=gen(1))
    c = conds_for()
    base = model.log_prob(codes, c)
    c2 = dict(c)
    tokens = c["seg"].tokens.clone()
    tokens[:, 3] = (tokens[:, 3] + 1) % 7  # change the last spatial condition token only
    c2["seg"] = Conditioning(tokens, 7, grid=(2, 2))
    assert not torch.allclose(base, model.log_prob(codes, c2))


# -- conditioning and the null embedding ------------------------------------------------------
@pytest.mark.parametrize("layout", ["prefix", "taming"])
def test_dropped_condition_ignores_its_tokens(layout):
    model = make(layout=layout)
    codes = torch.randint(0, K, (3, *GRID), generator=gen(1))
    drop = torch.tensor([True, True, False])
    seg = conds_for()["seg"]

    def lp(labels):
        label = Conditioning(torch.tensor(labels)[:, None], 5, drop=drop)
        return model.log_prob(codes, {"label": label, "seg": seg})

    a, b = lp([0, 1, 2]), lp([4, 3, 1])
    # Where dropped, the label's tokens do not matter; where kept, they do.
    torch.testing.assert_close(a[:2], b[:2])
    assert not torch.allclose(a[2], b[2])


def test_cond_dropout_trains_the_null_embedding():
    model = make(cond_dropout=1.0).train()
    codes = torch.randint(0, K, (3, *GRID), generator=gen(1))
    c = conds_for()
    loss_train = model.loss(codes, c)  # every condition replaced by its null
    loss_train.backward()
    assert model.cond_null["label"].grad.abs().sum() > 0
    assert model.cond_emb["label"].weight.grad.abs().sum() == 0  # the labels were not used
    model.eval()
    dropped = {k: v.null() for k, v in c.items()}
    torch.testing.assert_close(loss_train.detach(), model.loss(codes, dropped).detach())


# -- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_overfits_two_patterns_then_samples_them(positions):
    """A tiny model learns label -> fixed code pattern; sampling then reproduces the patterns."""
    torch.manual_seed(0)
    cfg = TransformerPriorConfig(
        vocab_size=8,
        block_size=8,
        n_layer=2,
        n_head=2,
        n_embd=32,
        positions=positions,
        conditions={"label": ConditionSlot(vocab_size=2)},
        cond_dropout=0.1,
    )
    model = TransformerPrior(cfg)
    patterns = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]], [[7, 7, 0, 0], [3, 1, 3, 1]]])
    labels = torch.tensor([[0], [1]]).repeat(8, 1)  # [16, 1]
    codes = patterns[labels[:, 0]]  # [16, 2, 4]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(codes, {"label": Conditioning(labels, 2)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    final = model.loss(codes, {"label": Conditioning(labels, 2)}).item()
    assert final < 0.05 * math.log(8), final
    cond = {"label": Conditioning(torch.tensor([[0], [1], [1], [0]]), 2)}
    out = model.sample(cond, (2, 4), SamplerConfig(), gen(0))
    assert torch.equal(out, patterns[[0, 1, 1, 0]])
    guided = model.sample(cond, (2, 4), SamplerConfig(guidance_scale=2.0), gen(0))
    assert torch.equal(guided, patterns[[0, 1, 1, 0]])


# -- checkpoints ------------------------------------------------------------------------------
def test_safetensors_refuses_shared_tensors():
    """Why tied weights need care: naive sharing cannot be saved as safetensors."""
    w = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="share memory"):
        save_file({"tok_emb.weight": w, "head.weight": w}, "/dev/null")


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_state_dict_round_trip_through_safetensors(tmp_path, tie, positions):
    model = make(positions, tie_embeddings=tie)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the init, so a fresh model differs
    sd = model.state_dict()
    assert ("head.weight" in sd) != tie
    path = tmp_path / "prior.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    fresh = make(positions, tie_embeddings=tie)
    codes = torch.randint(0, K, (3, *GRID), generator=gen(1))
    assert not torch.allclose(
        fresh.log_prob(codes, conds_for()), model.log_prob(codes, conds_for())
    )
    fresh.load_state_dict(load_file(str(path)), strict=True)
    torch.testing.assert_close(
        fresh.log_prob(codes, conds_for()), model.log_prob(codes, conds_for())
    )
    if tie:  # still tied after loading: the head reads the embedding table itself
        h = torch.randn(2, 16)
        torch.testing.assert_close(fresh._head(h), h @ fresh.tok_emb.weight.T)
        assert fresh.head is None


def test_math_backend_gives_same_likelihood():
    codes = torch.randint(0, K, (3, *GRID), generator=gen(1))
    a = make(attention="sdpa").log_prob(codes, conds_for())
    b = make(attention="math").log_prob(codes, conds_for())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# -- bad input --------------------------------------------------------------------------------
def test_codes_out_of_range():
    model = make(conditional=False)
    with pytest.raises(InputError, match=r"\[0, 16\)"):
        model.log_prob(torch.full((1, *GRID), K))


def test_grid_larger_than_block_size():
    model = make(conditional=False)
    msg = r"larger than the positional table \(block_size=12\).*sliding window"
    with pytest.raises(InputError, match=msg):
        model.sample(grid=(4, 4), num_samples=1)
    with pytest.raises(InputError, match=msg):
        model.log_prob(torch.zeros(1, 4, 4, dtype=torch.long))


def test_bad_conditions():
    model = make()
    codes = torch.zeros(3, *GRID, dtype=torch.long)
    with pytest.raises(InputError, match="missing"):
        model.log_prob(codes, {"label": conds_for()["label"]})
    wrong_vocab = dict(conds_for(), label=Conditioning(torch.zeros(3, 1, dtype=torch.long), 6))
    with pytest.raises(InputError, match="vocab_size=6"):
        model.log_prob(codes, wrong_vocab)
    wrong_n = dict(conds_for(), seg=Conditioning(torch.zeros(3, 2, dtype=torch.long), 7))
    with pytest.raises(InputError, match="num_tokens=2"):
        model.sample(wrong_n, GRID)
    out_of_range = dict(conds_for(), label=Conditioning(torch.full((3, 1), 5), 5))
    with pytest.raises(InputError, match=r"\[0, 5\)"):
        model.sample(out_of_range, GRID)
    with pytest.raises(InputError, match="batch size"):
        model.log_prob(codes[:2], conds_for())
    with pytest.raises(InputError, match="num_samples=5"):
        model.sample(conds_for(), GRID, num_samples=5)


def test_bad_prefix_and_guidance_without_conditions():
    model = make(conditional=False)
    with pytest.raises(InputError, match="prefix must be"):
        model.sample(grid=GRID, num_samples=2, prefix=torch.full((2, 2, 2), -1))
    with pytest.raises(InputError, match="or be -1"):
        model.sample(grid=GRID, num_samples=1, prefix=torch.full((1, *GRID), -2))
    with pytest.raises(InputError, match="guidance_scale"):
        model.sample(grid=GRID, sampler=SamplerConfig(guidance_scale=2.0))


@pytest.mark.parametrize(
    "bad", [{"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0}, {"temperature": 0}, {"top_k": 0}]
)
def test_sampler_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        SamplerConfig(**bad)


def test_bad_configs():
    with pytest.raises(ValidationError, match="divisible"):
        TransformerPriorConfig(n_embd=30, n_head=4)
    with pytest.raises(ValidationError, match="positions='learned'"):
        TransformerPriorConfig(layout="taming", positions="rope")
    with pytest.raises(ValidationError, match="cond_offsets only"):
        TransformerPriorConfig(cond_offsets={"x": 1}, conditions={"x": ConditionSlot(vocab_size=2)})
    with pytest.raises(ValidationError, match="does not fit the shared table"):
        TransformerPriorConfig(
            vocab_size=8, layout="taming", conditions={"x": ConditionSlot(vocab_size=9)}
        )
    with pytest.raises(SpecError, match="unknown attention backend"):
        TransformerPrior(TransformerPriorConfig(n_layer=1, n_embd=8, n_head=2, attention="fast"))


# -- Taming Transformers conversion -----------------------------------------------------------
def _taming_state_dict(vocab, block, n_layer, c, seed=0):
    """Random weights named like their minGPT, inside a Net2NetTransformer state dict."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "transformer.tok_emb.weight": r(vocab, c),
        "transformer.pos_emb": r(1, block, c),
        "transformer.ln_f.weight": 1 + r(c),
        "transformer.ln_f.bias": r(c),
        "transformer.head.weight": r(vocab, c),
        "first_stage_model.encoder.conv_in.weight": r(4, 3, 3, 3),  # not the GPT's: ignored
    }
    for i in range(n_layer):
        p = f"transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(c), r(c)
        for lin in ("key", "query", "value", "proj"):
            sd[p + f"attn.{lin}.weight"], sd[p + f"attn.{lin}.bias"] = r(c, c), r(c)
        sd[p + "attn.mask"] = torch.ones(block, block).tril().view(1, 1, block, block)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(4 * c, c), r(4 * c)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(c, 4 * c), r(c)
    return sd


def _taming_reference_logits(sd, n_head, idx):
    """Their GPT forward, written from the paper's description: token + position embeddings,
    pre-LN blocks of causal self-attention (separate key/query/value projections) and a GELU MLP,
    final LayerNorm and a bias-free head. ``idx [B, T]`` -> logits ``[B, T, V]``."""
    f = torch.nn.functional

    def w(name):
        return sd["transformer." + name]

    b, t = idx.shape
    x = w("tok_emb.weight")[idx] + w("pos_emb")[:, :t]
    c = x.shape[-1]
    dh = c // n_head
    for i in range(sum(k.endswith("attn.mask") for k in sd)):
        p = f"blocks.{i}."
        h = f.layer_norm(x, (c,), w(p + "ln1.weight"), w(p + "ln1.bias"))

        def heads(lin, h=h, p=p):
            y = h @ w(p + f"attn.{lin}.weight").T + w(p + f"attn.{lin}.bias")
            return y.view(b, t, n_head, dh).transpose(1, 2)  # [B, H, T, dh]

        q, k, v = heads("query"), heads("key"), heads("value")
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        att = att.masked_fill(w(p + "attn.mask")[:, :, :t, :t] == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + y @ w(p + "attn.proj.weight").T + w(p + "attn.proj.bias")
        h = f.layer_norm(x, (c,), w(p + "ln2.weight"), w(p + "ln2.bias"))
        h = f.gelu(h @ w(p + "mlp.0.weight").T + w(p + "mlp.0.bias"))
        x = x + h @ w(p + "mlp.2.weight").T + w(p + "mlp.2.bias")
    x = f.layer_norm(x, (c,), w("ln_f.weight"), w("ln_f.bias"))
    return x @ w("head.weight").T


@pytest.mark.parametrize(
    "conditions",
    [
        {},
        {"label": ConditionSlot(vocab_size=10)},
        {"seg": ConditionSlot(vocab_size=20, num_tokens=4)},
    ],
    ids=["unconditional", "class", "spatial"],
)
def test_converted_taming_gpt_matches_their_forward(conditions):
    vocab, c, n_head, n_codes = 24, 32, 4, 9
    n_cond = sum(s.num_tokens for s in conditions.values())
    block = (n_cond or 1) + n_codes - 1  # their block size: condition + codes[:-1]
    sd = _taming_state_dict(vocab, block, n_layer=2, c=c)
    config, ours = convert_taming_gpt(
        sd, {"n_head": n_head, "conditions": conditions, "sos_token": 3}
    )
    assert config.layout == "taming" and config.block_size == n_codes
    model = TransformerPrior(config).eval()
    model.load_state_dict(ours, strict=True)

    b = 2
    codes = torch.randint(0, vocab, (b, 3, 3), generator=gen(1))
    if conditions:
        name, slot = next(iter(conditions.items()))
        c_idx = torch.randint(0, slot.vocab_size, (b, slot.num_tokens), generator=gen(2))
        conds = {name: Conditioning(c_idx, slot.vocab_size)}
    else:
        c_idx = torch.full((b, 1), 3)  # their SOSProvider(sos_token=3)
        conds = None
    cz = torch.cat((c_idx, codes.reshape(b, -1)), dim=1)
    ref = _taming_reference_logits(sd, n_head, cz[:, :-1])[:, c_idx.shape[1] - 1 :]  # [B, 9, V]
    with torch.no_grad():
        got = model.code_logits(codes, conds)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    ref_lp = ref.log_softmax(-1).gather(-1, codes.reshape(b, -1, 1)).squeeze(-1).sum(-1)
    torch.testing.assert_close(model.log_prob(codes, conds), ref_lp, atol=1e-4, rtol=1e-4)


def test_taming_conversion_lists_every_mismatch():
    sd = _taming_state_dict(24, 9, n_layer=2, c=32)
    del sd["transformer.blocks.1.attn.value.bias"]
    sd["transformer.blocks.0.mlp.2.weight"] = torch.zeros(32, 64)
    sd["transformer.blocks.0.attn.extra"] = torch.zeros(1)
    sd["transformer.blocks.1.attn.mask"] = torch.ones(1, 1, 9, 9)  # n_unmasked-style
    with pytest.raises(CheckpointError) as e:
        convert_taming_gpt(sd, {"n_head": 4})
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "1 missing key(s): transformer.blocks.1.attn.value.bias" in msg
    assert "1 unexpected key(s): transformer.blocks.0.attn.extra" in msg
    assert "blocks.0.mlp.2.weight: checkpoint (32, 64) vs model (32, 128)" in msg
    assert "blocks.1.attn.mask is not causal" in msg
    with pytest.raises(CheckpointError, match="does not divide"):
        convert_taming_gpt(_taming_state_dict(24, 9, 1, 32), {"n_head": 5})


# -- decode options ----------------------------------------------------------------------------
def test_threads_option_sets_the_decode_threads_and_restores_them(monkeypatch):
    model = make(conditional=False)
    seen: list[int] = []
    head = model._head

    def spy(h):
        seen.append(torch.get_num_threads())
        return head(h)

    monkeypatch.setattr(model, "_head", spy)
    before = torch.get_num_threads()
    try:
        # prepack=False: the loop then calls _head (a packed head is a function of its own).
        model.sample(grid=GRID, num_samples=2, threads=2, prepack=False)
        assert set(seen) == {2} and torch.get_num_threads() == before
        # "auto": a step this small (2 rows x 32 wide) runs on one thread, whatever was set.
        torch.set_num_threads(2)
        seen.clear()
        model.sample(grid=GRID, num_samples=2, prepack=False)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_prepack_option_packs_the_cached_loops_weights_on_cpu(monkeypatch):
    from latentgen.priors import transformer

    model = make(conditional=False)
    calls: list[tuple[int, bool]] = []
    real = transformer.linear_fn

    def spy(weight, bias, rows, packed):
        calls.append((rows, packed))
        return real(weight, bias, rows, packed)

    monkeypatch.setattr(transformer, "linear_fn", spy)
    model.sample(grid=GRID, num_samples=3)
    # every block's four layers, and the head, packed for the loop's 3 rows (on a torch build
    # without the oneDNN ops: the blocks' plain layers, and model._head)
    can = prepack_available()
    assert calls == [(3, can)] * (4 * model.config.n_layer + int(can))
    calls.clear()
    model.sample(grid=GRID, num_samples=3, prepack=False)
    assert calls == [(3, False)] * (4 * model.config.n_layer)  # the head stays model._head
    with pytest.raises(InputError, match=r"prepack must be 'auto', True or False, got 'yes'"):
        model.sample(grid=GRID, num_samples=1, prepack="yes")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "many", True])
def test_bad_threads_option_is_a_clear_error(bad):
    with pytest.raises(InputError, match=r"threads must be 'auto', None or a positive int, got"):
        make(conditional=False).sample(grid=GRID, num_samples=1, threads=bad)


def test_static_cache_needs_the_cache_and_plain_attention():
    model = make(conditional=False)
    with pytest.raises(InputError, match=r"static_cache / compile decode with the KV cache"):
        model.sample(grid=GRID, num_samples=1, static_cache=True, use_cache=False)
    windowed = make(conditional=False, attention={"type": "flex", "window": 4})
    with pytest.raises(InputError, match=r"attention backend 'flex' with \{.*'window': 4"):
        windowed.sample(grid=GRID, num_samples=1, compile=True)
