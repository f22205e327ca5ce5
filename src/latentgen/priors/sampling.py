"""Turning logits into codes: temperature, top-k, top-p and classifier-free guidance.

Ties are broken by code index everywhere, so a filter keeps exactly what it says: ``top_k=k``
keeps exactly ``k`` codes (among equal logits the lowest indices), and ``top_k=1`` is greedy
even when several codes share the largest logit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentgen.specs import SamplerConfig

__all__ = [
    "draw",
    "draw_fast",
    "filter_logits",
    "guide",
    "top_k_indices",
    "top_k_mask",
    "top_p_remove",
]


def top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Bool ``[..., K]``: True for exactly ``k`` codes per row, the largest logits first and,
    among equal logits, the lowest code indices."""
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    above = logits > kth
    tied = logits == kth
    room = k - above.sum(-1, keepdim=True)  # how many of the tied codes still fit
    # torch.topk picks among ties in no documented order; counting ties left to right does.
    return above | (tied & (tied.cumsum(-1) <= room))


def top_p_remove(logits: Tensor, p: float) -> Tensor:
    """Bool ``[..., K]``: True where nucleus sampling (arXiv 1904.09751) drops the code.

    A code is dropped once the mass of the codes before it (largest first, ties by index)
    reaches ``p``, so the most likely code always stays.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = sorted_logits.softmax(-1)
    remove_sorted = probs.cumsum(-1) - probs >= p
    return torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)


def filter_logits(logits: Tensor, sampler: SamplerConfig) -> Tensor:
    """Apply temperature, top-k and top-p to ``logits [..., K]``; removed entries become -inf."""
    logits = logits.float() / sampler.temperature
    if sampler.top_k is not None and sampler.top_k < logits.shape[-1]:
        logits = logits.masked_fill(~top_k_mask(logits, sampler.top_k), float("-inf"))
    if sampler.top_p is not None and sampler.top_p < 1.0:
        logits = logits.masked_fill(top_p_remove(logits, sampler.top_p), float("-inf"))
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


def top_k_indices(logits: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` in ascending code order of the codes ``top_k_mask`` keeps.

    One ``topk`` over exact, distinct integer keys (the float's bits made monotone, then the
    code index as tie-break) replaces the mask-then-rank of ``top_k_mask``: same set, fewer ops,
    and no host sync, so it also runs inside a CUDA graph. On CPU, where a sync costs nothing,
    a plain ``topk`` of k + 1 values comes first: when no row has a tie across the cut (the
    k-th and (k+1)-th values differ), its first k indices are that same set, in 5 ops not 12.
    """
    n = logits.shape[-1]
    if logits.device.type == "cpu" and k < n:
        vals, idx = logits.topk(k + 1, dim=-1)  # sorted, largest first
        if not bool((vals[..., k - 1] == vals[..., k]).any()):
            return idx[..., :k].sort(dim=-1).values
    bits = (logits.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 and 0.0 get the same key
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of negative
    # values gives integers that order like the floats (a radix-sort trick).
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    index = torch.arange(n, device=logits.device)
    key = mono.to(torch.int64) * n - index  # distinct; equal logits rank the lower index first
    return key.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def draw_fast(
    logits: Tensor, sampler: SamplerConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Like ``draw`` (same distribution), but softmax and draw over the top-k candidates only.

    Per-step sampling cost then scales with k, not the vocabulary. For a given generator state
    the drawn codes differ from ``draw``'s (the random numbers map onto other candidates).
    """
    logits = logits.float()
    if sampler.temperature != 1.0:
        logits = logits / sampler.temperature
    k = logits.shape[-1]
    top_k = sampler.top_k if sampler.top_k is not None and sampler.top_k < k else 0
    top_p = sampler.top_p if sampler.top_p is not None and sampler.top_p < 1.0 else 0.0
    if not top_k and not top_p:
        return _draw_one(logits.softmax(-1), generator)
    if top_k:
        # The kept codes in code order, not logit order: logits equal up to rounding (cached
        # vs uncached forward) then cannot swap two near-tied candidates and the drawn code.
        idx = top_k_indices(logits, top_k)  # [B, k], ascending
        vals = logits.gather(-1, idx)  # [B, k]
    else:
        idx = torch.arange(k, device=logits.device).expand_as(logits)  # [B, K]
        vals = logits
    if top_p:
        vals = vals.masked_fill(top_p_remove(vals, top_p), float("-inf"))
    pick = _draw_one(vals.softmax(-1), generator)  # [B]
    return idx.gather(-1, pick[:, None]).squeeze(-1)


def _draw_one(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One code per row of ``probs [B, K]`` -> ``[B]``: ``torch.multinomial(probs, 1)``'s own
    algorithm (argmax of p / E with E ~ Exp(1), drawn with the same generator calls), so the
    same draws, without its input checks, which cost two host syncs and ~6 ops per step. The
    probabilities here come from a softmax, so they are finite, >= 0 and sum to 1."""
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / q).argmax(-1)
