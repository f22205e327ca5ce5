"""The Prior contract: an autoregressive model of code grids ``[B, h, w]`` given conditions."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from latentgen.components import Component
from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.specs import SamplerConfig
from latentgen.tokenizers.base import _check_codes

__all__ = ["ConditionSlot", "Conds", "Prior"]

#: Conditions by name, as the pipeline's conditioners produced them.
Conds = Mapping[str, Conditioning]


class ConditionSlot(BaseModel):
    """What a prior config says about one condition it is built for (``conditions: {name: slot}``).

    The pipeline checks each slot against the conditioner of the same name, so a prior and its
    conditioners cannot drift apart silently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=1, description="Size of the conditioner's token vocabulary.")
    num_tokens: int = Field(1, ge=1, description="Tokens per sample (hc*wc for spatial maps).")


class Prior(Component, nn.Module, ABC):
    """Stage 2: models ``p(codes | conds)`` over a row-major code sequence.

    Subclasses implement ``log_prob`` and ``sample``; ``loss`` defaults to the mean NLL per code
    in nats. ``condition_names`` lists the conditions the prior expects (from its config).
    """

    kind: ClassVar[str] = "prior"

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of codes K the prior predicts over."""

    @property
    def condition_names(self) -> tuple[str, ...]:
        """Names of the conditions this prior was built for (empty: unconditional)."""
        return ()

    @abstractmethod
    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Total log-likelihood ``[B]`` in nats of each code grid ``[B, h, w]``."""

    @abstractmethod
    def sample(
        self,
        conds: Conds | None = None,
        grid: tuple[int, int] = (16, 16),
        sampler: SamplerConfig | None = None,
        generator: Any = None,
        num_samples: int | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """Draw codes ``[B, h, w]``.

        Args:
            conds: conditions by name; B is their batch size.
            grid: code grid ``(h, w)``.
            sampler: temperature / top-k / top-p / guidance; None uses the defaults.
            generator: a ``torch.Generator`` for reproducible draws.
            num_samples: B when there are no conditions.
            prefix: optional ``[B, h, w]`` codes with -1 where codes are to be drawn; given
                codes are kept (completion, as in the paper's image-completion figures).
        """

    def loss(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Mean negative log-likelihood per code, in nats (the training objective)."""
        nll = -self.log_prob(codes, conds)
        return nll.sum() / codes.numel()

    # -- shared helpers ------------------------------------------------------------------------
    def check_codes(self, codes: Tensor) -> None:
        _check_codes(codes, self.vocab_size, type(self).__name__)

    def check_conds(self, conds: Conds | None) -> dict[str, Conditioning]:
        """Check that ``conds`` holds exactly the conditions this prior was built for."""
        got = dict(conds or {})
        want = set(self.condition_names)
        if set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise InputError(
                f"{type(self).__name__} was built for conditions {sorted(want) or 'none'}: "
                f"{'; '.join(parts)}. Pass each as a keyword (e.g. label=[3, 7]) or fix "
                "the prior's config."
            )
        sizes = {c.batch_size for c in got.values()}
        if len(sizes) > 1:
            raise InputError(f"conditions have different batch sizes: {sorted(sizes)}")
        return got

    @staticmethod
    def bits_per_dim(nats_per_token: float) -> float:
        return nats_per_token / math.log(2.0)
