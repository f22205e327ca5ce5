"""Shared test suites: subclass one, set ``config`` (and a few sizes), and pytest runs it.

The classes are not collected by pytest themselves (their names do not start with ``Test``);
a subclass named ``Test...`` is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from latentgen import registry
from latentgen.artifact import load_module
from latentgen.conditioners.base import INPUT_KINDS, Conditioning, RawInput
from latentgen.errors import InputError
from latentgen.files import load_tensors, save_tensors
from latentgen.specs import ComponentConfig, SamplerConfig, parse_component

__all__ = ["ConditionerContract", "PriorContract", "TokenizerContract"]


class _Contract:
    kind: ClassVar[str]
    #: The component's config: a mapping with "type", or a ComponentConfig.
    config: ClassVar[Any]
    #: Distribution expected to register the type (None: do not check).
    plugin: ClassVar[str | None] = None

    def make_config(self) -> ComponentConfig:
        return parse_component(self.kind, self.config)

    def build(self) -> Any:
        torch.manual_seed(0)
        return registry.build(self.kind, self.make_config()).eval()

    def test_registered(self) -> None:
        cfg = self.make_config()
        info = registry.get(self.kind, cfg.type)
        assert isinstance(cfg, info.config_cls)
        if self.plugin is not None:
            assert info.plugin == self.plugin, f"registered by {info.plugin}, not {self.plugin}"

    def test_config_round_trips_json(self) -> None:
        cfg = self.make_config()
        again = parse_component(self.kind, cfg.model_dump(mode="json"))
        assert again == cfg
        assert type(again) is type(cfg)

    def test_builds_from_config_alone(self) -> None:
        module = self.build()
        assert module.config == self.make_config()

    def test_state_dict_round_trip(self, tmp_path: Path) -> None:
        module = self.build()
        state = module.state_dict()
        if not state:
            return
        save_tensors(tmp_path / "w.safetensors", state)
        torch.manual_seed(123)  # a differently initialised twin
        twin = registry.build(self.kind, self.make_config())
        load_module(twin, load_tensors(tmp_path / "w.safetensors"), "twin")
        for k, v in twin.state_dict().items():
            assert torch.equal(v, state[k]), k


class TokenizerContract(_Contract):
    """What every tokenizer must do; set ``config`` and ``image_size``."""

    kind = "tokenizer"
    image_size: ClassVar[int] = 32
    batch_size: ClassVar[int] = 2
    #: Training step passed to ``generator_loss`` / ``discriminator_loss`` (trainable ones).
    train_step: ClassVar[int] = 0

    def images(self, tok: Any, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, tok.in_channels, self.image_size, self.image_size)
        return torch.rand(shape, generator=g) * 2 - 1

    def test_encode_gives_codes(self) -> None:
        tok = self.build()
        codes = tok.encode(self.images(tok))
        f = tok.downsample
        assert codes.dtype == torch.long
        assert tuple(codes.shape) == (self.batch_size, self.image_size // f, self.image_size // f)
        assert int(codes.min()) >= 0 and int(codes.max()) < tok.vocab_size

    def test_decode_shape(self) -> None:
        tok = self.build()
        with torch.no_grad():
            out = tok.decode(tok.encode(self.images(tok)))
        assert tuple(out.shape) == (
            self.batch_size,
            tok.in_channels,
            self.image_size,
            self.image_size,
        )
        assert out.is_floating_point()

    def test_forward_returns_output(self) -> None:
        from latentgen.tokenizers.base import TokenizerOutput

        tok = self.build()
        with torch.no_grad():
            out = tok(self.images(tok))
        assert isinstance(out, TokenizerOutput)
        assert out.recon.shape == self.images(tok).shape
        assert out.quant_loss.dim() == 0

    def test_deterministic(self) -> None:
        tok = self.build()
        x = self.images(tok)
        with torch.no_grad():
            assert torch.equal(tok.encode(x), tok.encode(x))
            assert torch.equal(self.build().encode(x), tok.encode(x))

    def test_wrong_size_names_expected(self) -> None:
        tok = self.build()
        f = tok.downsample
        if f == 1:
            pytest.skip("every size fits a tokenizer with downsample 1")
        x = torch.zeros(1, tok.in_channels, self.image_size + 1, self.image_size)
        with pytest.raises(InputError, match=str(f)):
            tok.encode(x)

    def test_wrong_channels(self) -> None:
        tok = self.build()
        x = torch.zeros(1, tok.in_channels + 1, self.image_size, self.image_size)
        with pytest.raises(InputError, match="channel"):
            tok.encode(x)

    def test_codes_out_of_range(self) -> None:
        tok = self.build()
        h = self.image_size // tok.downsample
        with pytest.raises(InputError, match=str(tok.vocab_size)):
            tok.decode(torch.full((1, h, h), tok.vocab_size, dtype=torch.long))

    def test_training_protocol(self) -> None:
        """A ``TrainableTokenizer`` gives a differentiable loss and a valid parameter split."""
        from latentgen.tokenizers.base import (
            TokenizerOutput,
            TrainableTokenizer,
            training_protocol_error,
        )

        tok = self.build().train()
        if not isinstance(tok, TrainableTokenizer):
            pytest.skip("not a TrainableTokenizer: `latentgen train tokenizer` refuses it")
        assert training_protocol_error(tok) is None, training_protocol_error(tok)
        gen = {id(p) for p in tok.generator_parameters()}
        disc = {id(p) for p in tok.discriminator_parameters()}
        assert not gen & disc, "generator and discriminator parameters overlap"
        x = self.images(tok)
        loss, logs, out = tok.generator_loss(x, self.train_step)
        assert isinstance(out, TokenizerOutput) and out.recon.shape == x.shape
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
        assert all(isinstance(v, int | float) for v in logs.values()), logs
        loss.backward()
        assert any(p.grad is not None for p in tok.generator_parameters()), "no gradient"
        if tok.has_discriminator:
            d, d_logs = tok.discriminator_loss(x, out.recon.detach(), self.train_step)
            assert isinstance(d, torch.Tensor) and d.dim() == 0 and torch.isfinite(d)
            assert all(isinstance(v, int | float) for v in d_logs.values()), d_logs


class PriorContract(_Contract):
    """What every prior must do; set ``config``, ``grid`` and (if conditional) ``conds``."""

    kind = "prior"
    grid: ClassVar[tuple[int, int]] = (4, 4)
    batch_size: ClassVar[int] = 2

    def conds(self, prior: Any) -> dict[str, Conditioning] | None:
        """Conditions for a batch; the default draws tokens for each slot of the config."""
        slots = getattr(prior.config, "conditions", None) or {}
        if not slots:
            return None
        g = torch.Generator().manual_seed(1)
        return {
            name: Conditioning(
                tokens=torch.randint(
                    slot.vocab_size, (self.batch_size, slot.num_tokens), generator=g
                ),
                vocab_size=slot.vocab_size,
            )
            for name, slot in slots.items()
        }

    def codes(self, prior: Any, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(prior.vocab_size, (self.batch_size, *self.grid), generator=g)

    def test_log_prob_shape_and_sign(self) -> None:
        prior = self.build()
        with torch.no_grad():
            lp = prior.log_prob(self.codes(prior), self.conds(prior))
        assert tuple(lp.shape) == (self.batch_size,)
        assert torch.isfinite(lp).all() and (lp <= 1e-4).all()

    def test_loss_is_mean_nll(self) -> None:
        prior = self.build()
        codes, conds = self.codes(prior), self.conds(prior)
        with torch.no_grad():
            loss = prior.loss(codes, conds)
            lp = prior.log_prob(codes, conds)
        assert loss.dim() == 0
        torch.testing.assert_close(loss, -lp.sum() / codes.numel(), rtol=1e-4, atol=1e-4)

    def test_sample_shape_range_and_seed(self) -> None:
        prior = self.build()
        conds = self.conds(prior)

        def draw(seed: int) -> torch.Tensor:
            with torch.no_grad():
                return prior.sample(
                    conds,
                    grid=self.grid,
                    sampler=SamplerConfig(),
                    generator=torch.Generator().manual_seed(seed),
                    num_samples=self.batch_size,
                )

        a, b = draw(0), draw(0)
        assert tuple(a.shape) == (self.batch_size, *self.grid)
        assert a.dtype == torch.long
        assert int(a.min()) >= 0 and int(a.max()) < prior.vocab_size
        assert torch.equal(a, b), "the same seed must give the same codes"

    def test_sample_keeps_prefix(self) -> None:
        prior = self.build()
        prefix = torch.full((self.batch_size, *self.grid), -1, dtype=torch.long)
        given = self.codes(prior, seed=5)
        prefix[:, 0] = given[:, 0]  # the first row is given
        with torch.no_grad():
            out = prior.sample(
                self.conds(prior),
                grid=self.grid,
                prefix=prefix,
                generator=torch.Generator().manual_seed(0),
                num_samples=self.batch_size,
            )
        assert torch.equal(out[:, 0], given[:, 0])

    def test_codes_out_of_range(self) -> None:
        prior = self.build()
        bad = self.codes(prior)
        bad[0, 0, 0] = prior.vocab_size
        with pytest.raises(InputError, match=str(prior.vocab_size)):
            prior.log_prob(bad, self.conds(prior))


class ConditionerContract(_Contract):
    """What every conditioner must do; set ``config`` and ``raw`` (a batch of raw conditions)."""

    kind = "conditioner"
    raw: ClassVar[Any]
    bad_raw: ClassVar[Any] = None

    def test_encode(self) -> None:
        cond = self.build()
        out = cond.encode(self.raw)
        assert isinstance(out, Conditioning)
        assert out.tokens.dtype == torch.long and out.tokens.dim() == 2
        assert out.vocab_size == cond.vocab_size
        assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < cond.vocab_size
        assert torch.equal(cond.encode(self.raw).tokens, out.tokens)
        if cond.num_tokens is not None:  # the count the pipeline checks against prior slots
            assert out.num_tokens == cond.num_tokens, "encode disagrees with num_tokens"

    def test_raw_input(self) -> None:
        """The declared raw input (what ``latentgen serve`` offers a control for) is sound."""
        spec = self.build().raw_input
        assert isinstance(spec, RawInput) and spec.kind in INPUT_KINDS
        if spec.names and spec.count is not None:
            assert len(spec.names) == spec.count, "one name per class"
        if spec.kind in ("class", "label_map"):
            assert spec.count is None or spec.count >= 1

    def test_null_drops_all(self) -> None:
        out = self.build().encode(self.raw).null()
        assert out.drop is not None and bool(out.drop.all())

    def test_bad_raw(self) -> None:
        if self.bad_raw is None:
            pytest.skip("no bad_raw example given")
        with pytest.raises(InputError):
            self.build().encode(self.bad_raw)
