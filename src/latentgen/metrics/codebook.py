"""Codebook usage of a quantizer: how many codes are used, and how evenly.

Perplexity ``exp(H(p))`` of the code histogram is the effective number of codes in use: K for a
uniform histogram, 1 when a single code takes everything (the "codebook collapse" that
dead-code restarts address, e.g. Jukebox, https://arxiv.org/abs/2005.00341).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentgen.errors import InputError

__all__ = ["CodebookUsage", "code_counts", "usage_stats"]


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Histogram [K] (int64) of the codes in ``indices`` (any shape, integer dtype)."""
    if indices.is_floating_point() or indices.is_complex():
        raise InputError(f"code indices must be an integer tensor, got dtype {indices.dtype}.")
    if codebook_size < 1:
        raise InputError(f"codebook_size must be >= 1, got {codebook_size}.")
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise InputError(
            f"code indices must lie in [0, {codebook_size}), got min {int(flat.min())} and "
            f"max {int(flat.max())}; check the quantizer's codebook_size."
        )
    return torch.bincount(flat, minlength=codebook_size)


def usage_stats(counts: Tensor) -> dict[str, float]:
    """Used fraction, perplexity and number of dead (never used) codes of a histogram [K]."""
    total = int(counts.sum())
    k = counts.numel()
    used = int((counts > 0).sum())
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0, "dead_codes": float(k)}
    p = counts.double() / total
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return {"usage": used / k, "perplexity": math.exp(entropy), "dead_codes": float(k - used)}


class CodebookUsage:
    """Accumulates code histograms over batches (e.g. one evaluation pass)."""

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise InputError(f"codebook_size must be >= 1, got {codebook_size}.")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: Tensor) -> None:
        """Count the codes of one batch (any shape)."""
        self.counts += code_counts(indices, self.codebook_size).cpu()

    def compute(self) -> dict[str, float]:
        """``usage`` (fraction of codes used), ``perplexity`` and ``dead_codes`` so far."""
        return usage_stats(self.counts)

    def reset(self) -> None:
        """Forget all counts."""
        self.counts.zero_()
