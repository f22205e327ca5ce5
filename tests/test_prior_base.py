"""What the Prior base gives every prior: sample's checks, guidance batching, prefixes, condition
dropout and condition_names from the config, shown on a third prior written here."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from latentgen import Pipeline, registry
from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError, SpecError, UnknownComponentError
from latentgen.priors.attention import FlexAttention, SDPAttention
from latentgen.priors.base import ConditionSlot, Conds, Prior, PriorConfig, SampleRequest
from latentgen.priors.sampling import draw_fast
from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
from latentgen.specs import ComponentConfig, SamplerConfig
from latentgen.training.config import PriorTrainConfig


class PositionConfig(PriorConfig):
    type: Literal["test.position"] = "test.position"
    vocab_size: int = Field(4, ge=2)
    cells: int = Field(16, ge=1, description="Most codes per grid.")


class PositionPrior(Prior):
    """A third prior: one categorical per raster position, biased by the first condition."""

    Config = PositionConfig

    def __init__(self, config: PositionConfig) -> None:
        super().__init__(config)
        self.logits = nn.Parameter(torch.randn(config.cells, config.vocab_size))
        slots = list(config.conditions.values())
        # Last row: the null condition (a dropped label).
        rows = slots[0].vocab_size + 1 if slots else 1
        self.bias = nn.Parameter(torch.randn(rows, config.vocab_size))
        self.requests: list[SampleRequest] = []

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def check_grid(self, h: int, w: int) -> None:
        if h * w > self.config.cells:
            raise InputError(f"at most {self.config.cells} codes per grid, got {h}x{w}.")

    def _bias(self, conds: Conds, rows: int) -> Tensor:
        if not conds:
            return self.bias[:1].expand(rows, -1)  # [rows, K]
        c = next(iter(conds.values()))
        row = c.tokens[:, 0].long()
        if c.drop is not None:
            row = row.masked_fill(c.drop, self.bias.shape[0] - 1)
        return self.bias[row]  # [rows, K]

    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        got = self.check_inputs(codes, conds)
        b, n = codes.shape[0], codes[0].numel()
        logits = self.logits[:n] + self._bias(got, b)[:, None]  # [B, n, K]
        flat = codes.reshape(b, n, 1).long()
        return logits.log_softmax(-1).gather(-1, flat).squeeze(-1).sum(-1)

    def generate(self, request: SampleRequest) -> Tensor:
        self.requests.append(request)
        (h, w), n = request.grid, request.grid[0] * request.grid[1]
        bias = self._bias(request.conds, request.rows)  # [rows, K]
        out = torch.stack(
            [request.pick(self.logits[i] + bias, i) for i in range(n)], dim=1
        )  # [B, n]
        return out.view(request.batch, h, w)


def build(conditional: bool = True, **kw) -> PositionPrior:
    torch.manual_seed(0)
    conditions = {"label": ConditionSlot(vocab_size=3)} if conditional else {}
    return PositionPrior(PositionConfig(conditions=conditions, **kw))


def labels(*values: int, drop: list[bool] | None = None) -> dict[str, Conditioning]:
    d = None if drop is None else torch.tensor(drop)
    return {"label": Conditioning(torch.tensor(values)[:, None], 3, drop=d)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- what the third prior gets for free -----------------------------------------------------------
def test_condition_names_come_from_the_config():
    assert build().condition_names == ("label",)
    assert build(conditional=False).condition_names == ()


def test_condition_names_from_a_config_that_only_has_a_conditions_field():
    """A plugin config that does not subclass PriorConfig still gets condition_names."""

    class LooseConfig(ComponentConfig):
        type: Literal["test.loose"] = "test.loose"
        conditions: dict[str, ConditionSlot] = Field(default_factory=dict)

    class Loose(PositionPrior):
        Config = LooseConfig  # type: ignore[assignment]

        def __init__(self, config: LooseConfig) -> None:
            Prior.__init__(self, config)

    prior = Loose(LooseConfig(conditions={"label": ConditionSlot(vocab_size=3)}))
    assert prior.condition_names == ("label",)
    with pytest.raises(InputError, match=r"missing \['label'\]"):
        prior.check_conds({})


def test_guidance_needs_a_condition():
    with pytest.raises(InputError, match="guidance_scale=2.0 needs a conditional prior"):
        build(conditional=False).sample(grid=(2, 2), sampler=SamplerConfig(guidance_scale=2.0))


def test_condition_checks():
    prior = build()
    with pytest.raises(InputError, match=r"missing \['label'\]"):
        prior.sample(grid=(2, 2))
    with pytest.raises(InputError, match=r"unexpected \['colour'\]"):
        prior.sample({**labels(0), "colour": Conditioning(torch.zeros(1, 1).long(), 2)}, (2, 2))
    with pytest.raises(InputError, match=r"vocab_size=5.*built for vocab_size=3"):
        prior.sample({"label": Conditioning(torch.zeros(1, 1).long(), 5)}, grid=(2, 2))
    with pytest.raises(InputError, match=r"num_tokens=2.*built for vocab_size=3, num_tokens=1"):
        prior.sample({"label": Conditioning(torch.zeros(1, 2).long(), 3)}, grid=(2, 2))
    with pytest.raises(InputError, match=r"must lie in \[0, 3\), got values in \[0, 3\]"):
        prior.sample(labels(0, 3), grid=(2, 2))
    with pytest.raises(InputError, match="must be integers"):
        prior.sample({"label": Conditioning(torch.zeros(1, 1), 3)}, grid=(2, 2))
    with pytest.raises(InputError, match=r"drop must be a bool tensor \[2\]"):
        prior.sample(
            {"label": Conditioning(torch.zeros(2, 1).long(), 3, drop=torch.zeros(2))}, (2, 2)
        )
    with pytest.raises(InputError, match="num_samples=3 but the conditions hold 2 rows"):
        prior.sample(labels(0, 1), grid=(2, 2), num_samples=3)
    with pytest.raises(InputError, match="batch size 2 but codes have 1"):
        prior.log_prob(torch.zeros(1, 2, 2, dtype=torch.long), labels(0, 1))
    with pytest.raises(InputError, match="at most 16 codes"):
        prior.sample(labels(0), grid=(5, 5))


def test_prefix_checks():
    prior = build(conditional=False)
    free = torch.full((2, 2, 3), -1)
    with pytest.raises(InputError, match=r"prefix must be a \[B, h, w\] = \[2, 2, 2\]"):
        prior.sample(grid=(2, 2), num_samples=2, prefix=free)
    with pytest.raises(InputError, match="prefix holds 2 grids but 3 samples are drawn"):
        prior.sample(grid=(2, 3), num_samples=3, prefix=free)
    with pytest.raises(InputError, match=r"or be -1 \(to draw\), got values in \[-2, -1\]"):
        prior.sample(grid=(2, 3), prefix=torch.cat((free[:1], free[:1] - 1)))
    with pytest.raises(InputError, match="integer codes"):
        prior.sample(grid=(2, 3), prefix=free.float())
    # Without num_samples the batch is the prefix's; given codes are kept, -1 are drawn.
    prefix = free.clone()
    prefix[:, 0, 0] = 3
    out = prior.sample(grid=(2, 3), prefix=prefix, generator=gen(0))
    assert out.shape == (2, 2, 3) and (out[:, 0, 0] == 3).all()
    assert int(out.min()) >= 0


def test_guidance_doubles_the_batch_and_mixes_the_logits():
    prior = build()
    with torch.no_grad():
        prior.bias[-1].normal_(0, 3)  # a null row unlike the labels
    conds = labels(0, 2)
    guided = prior.sample(
        conds, grid=(2, 2), sampler=SamplerConfig(guidance_scale=4.0), generator=gen(1)
    )
    request = prior.requests[-1]
    assert request.guided and request.rows == 4 and request.batch == 2
    drop = request.conds["label"].drop
    assert drop is not None and drop.tolist() == [False, False, True, True]
    assert torch.equal(request.conds["label"].tokens[2:], conds["label"].tokens)
    # The mix is u + s (c - u): the same draws from hand-mixed logits give the same codes.
    g, sampler = gen(1), SamplerConfig(guidance_scale=4.0)
    with torch.no_grad():
        want = []
        for i in range(4):
            c = prior.logits[i] + prior.bias[[0, 2]]  # [2, K]
            u = (prior.logits[i] + prior.bias[-1]).expand(2, -1)
            want.append(draw_fast(u + 4.0 * (c - u), sampler, g))
    assert torch.equal(guided, torch.stack(want, 1).view(2, 2, 2))
    plain = prior.sample(conds, grid=(2, 2), generator=gen(1))
    assert not prior.requests[-1].guided and prior.requests[-1].rows == 2
    assert not torch.equal(guided, plain)


def test_unknown_sample_option_is_named():
    with pytest.raises(InputError, match=r"unknown option\(s\) \['use_cache'\].*no options"):
        build().sample(labels(0), grid=(2, 2), use_cache=False)


def test_sample_restores_the_mode_and_returns_trainable_codes():
    prior = build().train()
    out = prior.sample(labels(0, 1), grid=(2, 2), generator=gen(0))
    assert prior.training and not out.is_inference()
    prior.loss(out, labels(0, 1)).backward()
    assert prior.logits.grad is not None


# -- condition dropout: one knob, in Prior.loss ---------------------------------------------------
def test_cond_dropout_drops_all_conditions_in_the_training_loss_only():
    prior = build(cond_dropout=1.0)
    codes = torch.randint(0, 4, (3, 2, 2), generator=gen(2))
    nulled = labels(0, 1, 2, drop=[True, True, True])
    prior.train()
    torch.testing.assert_close(
        prior.loss(codes, labels(0, 1, 2)), -prior.log_prob(codes, nulled).sum() / codes.numel()
    )
    # log_prob is the likelihood of the conditions given, in training mode too.
    assert not torch.allclose(prior.log_prob(codes, labels(0, 1, 2)), prior.log_prob(codes, nulled))
    prior.eval()
    assert not torch.allclose(
        prior.loss(codes, labels(0, 1, 2)), -prior.log_prob(codes, nulled).sum() / codes.numel()
    )


def test_the_removed_trainer_knob_names_its_replacement():
    with pytest.raises(ValidationError, match="spec.prior: `cond_dropout: 0.2`"):
        PriorTrainConfig.model_validate({"cond_drop_prob": 0.2, "tokenizer_path": "x"})


def test_condition_names_must_be_identifiers():
    with pytest.raises(ValidationError, match="must be a Python identifier"):
        PositionConfig(conditions={"class-label": ConditionSlot(vocab_size=2)})


# -- the pipeline checks token counts -------------------------------------------------------------
def test_pipeline_refuses_a_slot_whose_num_tokens_the_conditioner_does_not_emit():
    spec = {
        "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
        "prior": {
            "type": "transformer",
            "vocab_size": 8,
            "block_size": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 8,
            "conditions": {"label": {"vocab_size": 6, "num_tokens": 4}},
        },
        "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
    }
    msg = (
        r"conditioner 'label' \(class_label\) emits 1 token\(s\) per sample but the prior's "
        r"slot for it expects 4: set prior.conditions.label.num_tokens = 1"
    )
    with pytest.raises(SpecError, match=msg):
        Pipeline.from_spec(spec)
    spec["prior"]["conditions"]["label"]["num_tokens"] = 1
    assert Pipeline.from_spec(spec).prior.condition_names == ("label",)


# -- attention options from the spec ------------------------------------------------------------
def _tiny_transformer(attention) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(
        TransformerPriorConfig(
            vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8, attention=attention
        )
    )


def test_attention_options_are_set_from_the_prior_config():
    cfg = TransformerPriorConfig.model_validate_json(
        '{"attention": {"type": "sdpa", "kernel": "math"}}'
    )
    assert cfg.attention.type == "sdpa" and cfg.attention.kernel == "math"
    assert TransformerPriorConfig.model_validate_json(cfg.model_dump_json()) == cfg
    prior = _tiny_transformer({"type": "sdpa", "kernel": "math"})
    backend = prior._backend(torch.device("cpu"), torch.float32)
    assert isinstance(backend, SDPAttention) and backend.config.kernel == "math"
    flex = TransformerPriorConfig(attention={"type": "flex", "window": 4}).attention
    assert isinstance(registry.build(flex), FlexAttention) and flex.window == 4
    codes = torch.randint(0, 8, (2, 2, 4), generator=gen(3))
    torch.testing.assert_close(
        prior.log_prob(codes), _tiny_transformer("math").log_prob(codes), atol=1e-5, rtol=1e-5
    )


def test_bad_attention_options_are_refused():
    with pytest.raises(ValidationError, match="window"):
        TransformerPriorConfig(attention={"type": "flex", "window": 0})
    with pytest.raises(UnknownComponentError, match="did you mean .sdpa."):
        TransformerPriorConfig(attention={"type": "sdpaa"})
    with pytest.raises(SpecError, match="unknown attention backend 'fast'"):
        _tiny_transformer("fast")
