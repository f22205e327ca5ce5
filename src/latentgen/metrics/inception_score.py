"""Inception Score (IS) from class probabilities.

Salimans et al., "Improved Techniques for Training GANs", https://arxiv.org/abs/1606.03498:
``IS = exp(E_x KL(p(y|x) || p(y)))``, computed over ``splits`` equal parts of the samples (mean
and standard deviation across parts, as the reference code reports). The probabilities come
from Inception-v3 (``InceptionFeatures.class_probs``, weights supplied by the user).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from latentgen.errors import InputError

__all__ = ["inception_score"]


def inception_score(probs: np.ndarray | Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score of class probabilities ``probs`` [N, C]."""
    p = probs.detach().cpu().double().numpy() if isinstance(probs, Tensor) else np.asarray(probs)
    p = p.astype(np.float64)
    if p.ndim != 2:
        raise InputError(f"inception_score needs probabilities [N, C], got shape {p.shape}.")
    if splits < 1 or p.shape[0] < splits:
        raise InputError(
            f"inception_score splits {p.shape[0]} samples into {splits} parts; give at least "
            f"{max(splits, 1)} samples or fewer splits."
        )
    if not np.isfinite(p).all() or (p < 0).any():
        raise InputError("inception_score: probabilities must be finite and >= 0.")
    eps = 1e-12
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)  # [1, C]
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(axis=1)  # [n]
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))
