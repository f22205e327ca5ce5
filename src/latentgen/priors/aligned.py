"""Spatially aligned conditions: a map's embedding added to the codes of each of its cells.

A prefix condition (Taming Transformers' layout) is a run of tokens before the codes, and the
transformer has to learn with attention which map cell belongs to which code. A condition whose
slot says ``placement: aligned`` instead adds its cell's embedding to the input of every code the
cell covers, so the code at ``(i, j)`` sees the map at ``(i, j)`` from the first step of
training. A map coarser than the code grid by a whole factor ``k`` covers ``k x k`` codes per
cell; a condition without a grid (a class label, one token) covers every code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.base import ConditionSlot

__all__ = ["aligned_embedding", "aligned_names", "prefix_names", "prefix_tokens"]


def prefix_names(slots: Mapping[str, ConditionSlot]) -> list[str]:
    """Conditions that are prefix tokens (``placement`` prefix or both), in config order."""
    return [n for n, s in slots.items() if s.placement != "aligned"]


def aligned_names(slots: Mapping[str, ConditionSlot]) -> list[str]:
    """Conditions added at their cells (``placement`` aligned or both), in config order."""
    return [n for n, s in slots.items() if s.placement != "prefix"]


def prefix_tokens(name: str, slot: ConditionSlot, c: Conditioning) -> Tensor:
    """``[B, n]``: the condition's prefix tokens, one per ``prefix_downsample`` block of its
    grid (the cell at the block's centre) when that is above 1."""
    k = slot.prefix_downsample
    if k == 1:
        return c.tokens
    if c.grid is None or c.grid[0] % k or c.grid[1] % k:
        raise InputError(
            f"condition {name!r} has grid {c.grid}, which prefix_downsample={k} cannot cut into "
            f"{k}x{k} blocks; give a map whose sides are multiples of {k} cells, or set "
            "prefix_downsample to a divisor of them."
        )
    hc, wc = c.grid
    grid = c.tokens.view(c.batch_size, hc, wc)
    return grid[:, k // 2 :: k, k // 2 :: k].reshape(c.batch_size, -1)


def _cells(name: str, c: Conditioning, grid: tuple[int, int], device: torch.device) -> Tensor:
    """``[h*w]``: the condition token under each code of the ``(h, w)`` grid (row-major)."""
    h, w = grid
    if c.grid is None:
        if c.num_tokens != 1:
            raise InputError(
                f"condition {name!r} has {c.num_tokens} tokens but no grid, so placement "
                "'aligned' cannot put them at code cells; give it a grid (a spatial "
                "conditioner sets one) or use placement 'prefix'."
            )
        return torch.zeros(h * w, dtype=torch.long, device=device)
    hc, wc = c.grid
    if h % hc or w % wc or h // hc != w // wc:
        raise InputError(
            f"condition {name!r} has a {hc}x{wc} grid, which does not cover the {h}x{w} code "
            "grid in whole square cells, as placement 'aligned' needs; give a map whose grid "
            "is the code grid divided by a whole factor (the conditioner's downsample a "
            "multiple of the tokenizer's), or use placement 'prefix'."
        )
    k = h // hc
    rows = torch.arange(h, device=device) // k
    cols = torch.arange(w, device=device) // k
    return (rows[:, None] * wc + cols[None, :]).reshape(-1)


def aligned_embedding(
    slots: Mapping[str, ConditionSlot],
    conds: Mapping[str, Conditioning],
    grid: tuple[int, int],
    emb: nn.ModuleDict,
    null: nn.ParameterDict,
) -> Tensor | None:
    """``[B, h*w, C]``: the sum over aligned conditions of each code's cell embedding (the
    learned null embedding where a row's condition is dropped); None without aligned ones."""
    total: Tensor | None = None
    for name in aligned_names(slots):
        c = conds[name]
        table = emb[name]
        assert isinstance(table, nn.Embedding)
        device = table.weight.device
        tokens = c.tokens.to(device=device, dtype=torch.long)  # [B, n]
        e = table(tokens[:, _cells(name, c, grid, device)])  # [B, h*w, C]
        if c.drop is not None:
            d = c.drop.to(device=device, dtype=torch.bool)
            e = torch.where(d[:, None, None], null[name].to(e.dtype), e)
        total = e if total is None else total + e
    return total
