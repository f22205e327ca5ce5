"""``toy.ngram``: a count-based model of each code given its causal neighbours (left, up, ...)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from latentgen import ConditionSlot, InputError, Prior, PriorConfig, SampleRequest
from latentgen.priors.base import Conds


class NGramPriorConfig(PriorConfig):
    type: Literal["toy.ngram"] = "toy.ngram"
    vocab_size: int = Field(16, ge=2, le=256, description="Codes K.")
    order: int = Field(
        3,
        ge=1,
        le=4,
        description="n: each code depends on n-1 causal neighbours: left, up, up-left.",
    )
    alpha: float = Field(0.1, gt=0, description="Add-alpha smoothing of the counts.")
    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="At most one single-token condition (e.g. a class label): one table each.",
    )


class NGramPrior(Prior):
    """``p(c[i,j] | left, up, up-left, label)`` from counts; outside the grid reads symbol K.

    The neighbours all come earlier in raster order, so sampling stays autoregressive. A dropped
    label (``Conditioning.drop``, classifier-free guidance's null branch) reads the counts of
    all labels together, so guidance works without a table of its own. ``Prior.sample`` checks
    the inputs and doubles the batch for guidance; this class only implements ``generate``.
    """

    Config = NGramPriorConfig

    def __init__(self, config: NGramPriorConfig) -> None:
        super().__init__(config)
        if len(config.conditions) > 1 or any(s.num_tokens != 1 for s in config.conditions.values()):
            raise InputError(
                "toy.ngram supports at most one single-token condition (a class label)."
            )
        k, ctx = config.vocab_size, config.order - 1  # ctx neighbours, each K+1 symbols
        self._tables = next(iter(config.conditions.values())).vocab_size if config.conditions else 1
        # Context digits run over K+1 symbols: K is the "before the start" symbol.
        self.register_buffer("counts", torch.zeros(self._tables, (k + 1) ** ctx, k))

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def _table_index(self, conds: Conds | None, batch: int) -> Tensor:
        """Table of each row ``[B]``: its label, or ``tables`` (all labels) where dropped."""
        got = dict(conds or {})
        if not got:
            return torch.zeros(batch, dtype=torch.long, device=self.counts.device)
        cond = next(iter(got.values()))
        table = cond.tokens[:, 0].long().to(self.counts.device)
        if cond.drop is not None:
            table = table.masked_fill(cond.drop.to(table.device), self._tables)
        return table

    def _all_counts(self) -> Tensor:
        """``[tables + 1, contexts, K]``: the per-label counts, then their sum (the null row)."""
        return torch.cat((self.counts, self.counts.sum(0, keepdim=True)))

    _NEIGHBOURS = ((0, -1), (-1, 0), (-1, -1))  # (dy, dx): left, up, up-left

    def _contexts(self, grid: Tensor) -> Tensor:
        """Context id ``[B, h, w]`` of every position of ``grid [B, h, w]``."""
        k = self.vocab_size
        b, h, w = grid.shape
        padded = grid.new_full((b, h + 1, w + 2), k)  # a border of "outside" symbols
        padded[:, 1:, 1:-1] = grid
        ids = torch.zeros_like(grid)
        for dy, dx in self._NEIGHBOURS[: self.config.order - 1]:
            ids = ids * (k + 1) + padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        return ids

    def _probs(self, counts: Tensor, table: Tensor, context: Tensor) -> Tensor:
        c = counts[table, context] + self.config.alpha  # [..., K]
        return c / c.sum(-1, keepdim=True)

    @torch.no_grad()
    def fit(self, codes: Tensor, conds: Conds | None = None) -> NGramPrior:
        """Add the n-gram counts of ``codes [B, h, w]`` (call repeatedly to add more data)."""
        got = self.check_inputs(codes, conds)
        grid = codes.long()
        plain = {
            n: c.with_drop(torch.zeros_like(c.tokens[:, 0], dtype=torch.bool))
            for n, c in got.items()
        }
        table = self._table_index(plain, grid.shape[0])[:, None, None].expand_as(grid)
        self.counts.index_put_(
            (table.reshape(-1), self._contexts(grid).reshape(-1), grid.reshape(-1)),
            torch.ones(grid.numel(), device=self.counts.device),
            accumulate=True,
        )
        return self

    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        got = self.check_inputs(codes, conds)
        grid = codes.long()
        table = self._table_index(got, grid.shape[0])[:, None, None].expand_as(grid)
        p = self._probs(self._all_counts(), table, self._contexts(grid))  # [B, h, w, K]
        return p.gather(-1, grid[..., None]).squeeze(-1).log().flatten(1).sum(-1)

    def generate(self, request: SampleRequest) -> Tensor:
        b, (h, w), k = request.batch, request.grid, self.vocab_size
        counts = self._all_counts()
        table = self._table_index(request.conds, request.rows)  # [rows]
        out = torch.full((b, h, w), k, dtype=torch.long, device=self.counts.device)
        for i in range(h):
            for j in range(w):
                context = torch.zeros(b, dtype=torch.long, device=out.device)
                for dy, dx in self._NEIGHBOURS[: self.config.order - 1]:
                    y, x = i + dy, j + dx
                    inside = y >= 0 and 0 <= x < w
                    context = context * (k + 1) + (out[:, y, x] if inside else k)
                probs = self._probs(counts, table, request.expand(context))  # [rows, K]
                out[:, i, j] = request.pick(probs.log(), i * w + j)
        return out
