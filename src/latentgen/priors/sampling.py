"""Turning logits into codes: temperature, top-k, top-p and classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from latentgen.specs import SamplerConfig

__all__ = ["draw", "draw_fast", "filter_logits", "guide"]


def filter_logits(logits: Tensor, sampler: SamplerConfig) -> Tensor:
    """Apply temperature, top-k and top-p to ``logits [..., K]``; removed entries become -inf."""
    logits = logits.float() / sampler.temperature
    k = logits.shape[-1]
    if sampler.top_k is not None and sampler.top_k < k:
        kth = torch.topk(logits, sampler.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampler.top_p is not None and sampler.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a code when the mass *before* it already reaches p: the top code always stays.
        remove_sorted = (cum - sorted_logits.softmax(-1)) >= sampler.top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def guide(cond_logits: Tensor, uncond_logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (arXiv 2207.12598): ``u + s * (c - u)``."""
    return uncond_logits + scale * (cond_logits - uncond_logits)


def draw(
    logits: Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Sample one code per row of ``logits [B, K]`` -> ``[B]`` long."""
    probs = filter_logits(logits, sampler).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def draw_fast(
    logits: Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Like ``draw`` (same distribution), but softmax and draw over the top-k candidates only.

    Per-step sampling cost then scales with k, not the vocabulary. Two differences from
    ``draw``: ties at the k-th logit keep exactly k codes, and for a given generator state the
    drawn codes differ from ``draw``'s (the random numbers map onto other candidates).
    """
    logits = logits.float()
    if sampler.temperature != 1.0:
        logits = logits / sampler.temperature
    top_k = sampler.top_k if sampler.top_k is not None and sampler.top_k < logits.shape[-1] else 0
    top_p = sampler.top_p if sampler.top_p is not None and sampler.top_p < 1.0 else 0.0
    if not top_k and not top_p:
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    if top_k:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # [B, k], sorted descending
    else:
        vals, idx = torch.sort(logits, dim=-1, descending=True)  # [B, K]
    if top_p:
        probs = vals.softmax(-1)
        # Same rule as filter_logits: drop a code once the mass before it reaches p.
        vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    # Lay the candidates out in code order, so that logits equal up to rounding (cached vs
    # uncached forward) cannot swap two near-tied candidates and with them the drawn code.
    idx, order = idx.sort(-1)
    vals = vals.gather(-1, order)
    pick = torch.multinomial(vals.softmax(-1), 1, generator=generator)  # [B, 1]
    return idx.gather(-1, pick).squeeze(-1)
