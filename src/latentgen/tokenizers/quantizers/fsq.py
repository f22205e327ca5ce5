"""Finite scalar quantization (FSQ, https://arxiv.org/abs/2309.15505).

Each of ``n = len(levels)`` channels is bounded with a tanh and rounded to one of ``L_i`` values;
the implicit codebook is the grid of all combinations, ``K = prod(levels)`` codes, with no
parameters, no codebook loss and no collapse. Channel i of a code takes the integer values
``{-(L_i // 2), ..., (L_i - 1) // 2}`` (symmetric for odd L_i, one more negative value for even
L_i), divided by ``L_i // 2`` so codes lie in [-1, 1].

Projection: ``dim`` is the channel count D of the encoder output. When ``dim`` is None or equals
``len(levels)`` the latents are quantized as they are; otherwise learned linear maps project
``D -> len(levels)`` before quantizing and back after, as the paper does in front of its
quantizer.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from latentgen.specs import ComponentConfig
from latentgen.tokenizers.quantizers.base import Quantizer, QuantizerOutput
from latentgen.tokenizers.quantizers.common import (
    UsageCounter,
    check_indices,
    check_latents,
    fp32_region,
    perplexity,
)

__all__ = ["FSQuantizer", "FSQuantizerConfig"]

# tanh never reaches ±1; scaling by (L-1)(1+eps)/2 lets the extreme values round to the outer
# levels rather than stopping half a step short.
_BOUND_EPS = 1e-3


class FSQuantizerConfig(ComponentConfig):
    """Config of ``FSQuantizer`` (type ``fsq``)."""

    type: Literal["fsq"] = "fsq"
    levels: tuple[Annotated[int, Field(ge=2)], ...] = Field(
        (8, 5, 5, 5),
        min_length=1,
        description="Quantization levels per channel; K = product (FSQ, arXiv 2309.15505, "
        "table 1: [8,5,5,5] -> 1000 codes, [8,8,8,6,5] -> 15360, [7,5,5,5,5] -> 4375).",
    )
    dim: int | None = Field(
        None,
        ge=1,
        description="Channels D of the encoder output. None means D = len(levels); any other "
        "value adds learned linear projections D -> len(levels) -> D around the quantizer.",
    )


class FSQuantizer(Quantizer):
    """Finite scalar quantization: bound each channel with tanh, round, straight-through.

    ``z_q = round(bound(z)) / (L // 2)`` per channel, with the rounding's gradient passed
    straight through; the loss is always 0. Indices are mixed-radix numbers with channel 0 the
    least significant digit. ``indices_to_codes`` and ``codes_to_indices`` convert between the
    two without projections. Note that ``bound`` is a tanh, so feeding a code back through
    ``forward`` does not in general return it (tanh shrinks large values); use
    ``codes_to_indices`` for that. See arXiv 2309.15505.

    Args:
        config: an ``FSQuantizerConfig``.
    """

    Config: ClassVar[type[ComponentConfig]] = FSQuantizerConfig
    _levels: Tensor
    _basis: Tensor

    def __init__(self, config: FSQuantizerConfig) -> None:
        super().__init__(config)
        self.config: FSQuantizerConfig = config
        levels = list(config.levels)
        n = len(levels)
        self._dim = config.dim if config.dim is not None else n
        if self._dim != n:
            self.project_in: nn.Module = nn.Linear(self._dim, n)
            self.project_out: nn.Module = nn.Linear(n, self._dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        basis = [math.prod(levels[:i]) for i in range(n)]  # mixed radix, channel 0 lowest
        # Constants derived from the config: not saved, rebuilt from it.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), False)
        self.usage_counter = UsageCounter(self.codebook_size)

    @property
    def codebook_size(self) -> int:
        """Number of codes K = prod(levels)."""
        return math.prod(self.config.levels)

    @property
    def dim(self) -> int:
        """Channels D of the latents."""
        return self._dim

    # -- the grid -----------------------------------------------------------------------------
    def _half_width(self) -> Tensor:
        return (self._levels // 2).float()  # [n]

    def bound(self, x: Tensor) -> Tensor:
        """Squash ``[..., n]`` so that rounding yields exactly L_i integer values per channel."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 + _BOUND_EPS) / 2  # [n]
        # Even L: an odd number of integers fits in a symmetric range, so shift by half a step to
        # get the L values {-L/2, ..., L/2 - 1}. The atanh shift inside keeps bound(0) = 0.
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)  # [n]
        shift = torch.atanh(offset / half_l)  # [n]
        return torch.tanh(x + shift) * half_l - offset

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Grid codes ``[..., n]`` in [-1, 1] -> indices ``[...]`` (long)."""
        digits = torch.round(codes.float() * self._half_width()).long() + self._levels // 2
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices ``[...]`` -> grid codes ``[..., n]`` in [-1, 1] (fp32)."""
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels  # [..., n]
        return (digits - self._levels // 2).float() / self._half_width()

    # -- Quantizer contract ---------------------------------------------------------------------
    def embed(self, indices: Tensor) -> Tensor:
        """codes ``[B, h, w]`` -> latents ``[B, D, h, w]`` (equal to ``forward``'s z_q in eval)."""
        check_indices(indices, self.codebook_size, type(self).__name__)
        with fp32_region(indices):
            codes = self.indices_to_codes(indices)  # [B, h, w, n]
            return self.project_out(codes).permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``[B, D, h, w]`` -> grid codes with a straight-through rounding; fp32 inside, no loss."""
        check_latents(z, self.dim, type(self).__name__)
        with fp32_region(z):
            x = self.project_in(z.float().permute(0, 2, 3, 1))  # [B, h, w, n]
            bounded = self.bound(x)
            # Straight-through rounding, written so the forward value is exactly round(.):
            # sg[round(b)] + (b - sg[b]) adds an exact zero.
            rounded = torch.round(bounded).detach() + (bounded - bounded.detach())
            codes = rounded / self._half_width()  # [B, h, w, n] in [-1, 1]
            indices = self.codes_to_indices(codes.detach())  # [B, h, w]
            z_q = self.project_out(codes).permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]
            counts = self.usage_counter.update(indices, reduce=self.training)
        stats = {"perplexity": perplexity(counts)}
        return QuantizerOutput(
            z_q=z_q, indices=indices, loss=z.new_zeros((), dtype=torch.float32), stats=stats
        )

    def extra_repr(self) -> str:
        return f"levels={list(self.config.levels)}, dim={self.dim}, K={self.codebook_size}"
