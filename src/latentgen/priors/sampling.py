"""Turning logits into codes: temperature, top-k, top-p and classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from latentgen.specs import SamplerConfig

__all__ = ["filter_logits", "draw", "guide"]


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


def draw(logits: Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None) -> Tensor:
    """Sample one code per row of ``logits [B, K]`` -> ``[B]`` long."""
    probs = filter_logits(logits, sampler).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
