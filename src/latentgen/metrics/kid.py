"""Kernel Inception Distance (KID): an unbiased squared MMD between two feature sets.

Bińkowski et al., "Demystifying MMD GANs", https://arxiv.org/abs/1801.01401. With the cubic
polynomial kernel ``k(x, y) = (x . y / D + 1)^3`` on features ``[N, D]``, KID is the unbiased
estimate of MMD^2 averaged over ``num_subsets`` random subsets of ``subset_size`` from each set;
unlike FID it has no bias in the number of samples, so small sample sets compare fairly. The
spread of the subset estimates is reported as its standard error (the convention of the paper's
code and torch-fidelity's ``kid_std``). Features can come from any extractor: latentgen uses a
trained classifier's penultimate layer, or Inception-v3 when the user supplies its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from latentgen.errors import InputError

__all__ = ["KIDResult", "kernel_inception_distance", "polynomial_mmd2"]


@dataclass(frozen=True)
class KIDResult:
    """KID (mean of the subset estimates) and its standard error (their spread)."""

    value: float
    std_error: float
    subset_size: int
    num_subsets: int


def _as_float64(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of features ``x`` [m, D] and ``y`` [n, D] under the cubic kernel."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3  # [m, m]
    kyy = (y @ y.T / d + 1.0) ** 3  # [n, n]
    kxy = (x @ y.T / d + 1.0) ** 3  # [m, n]
    m, n = x.shape[0], y.shape[0]
    # U-statistic: the diagonals k(x_i, x_i) are left out of the within-set means
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kernel_inception_distance(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    *,
    subset_size: int = 100,
    num_subsets: int = 100,
    seed: int = 0,
) -> KIDResult:
    """KID between feature sets ``real`` [N, D] and ``fake`` [M, D].

    Args:
        real: features of real images.
        fake: features of generated images.
        subset_size: images per subset; both sets must hold at least this many.
        num_subsets: random subsets averaged (their spread is the standard error).
        seed: seeds the subset draws, so the same features give the same KID.
    """
    a, b = _as_float64(real), _as_float64(fake)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(
            f"KID needs two feature sets [N, D] of one D, got {a.shape} and {b.shape}."
        )
    if subset_size < 2:
        raise InputError(f"the KID subset size must be >= 2, got {subset_size}.")
    if num_subsets < 1:
        raise InputError(f"KID needs num_subsets >= 1, got {num_subsets}.")
    for name, n in (("generated", b.shape[0]), ("real", a.shape[0])):
        if n < subset_size:
            raise InputError(
                f"KID got {n} {name} images, fewer than its subset size {subset_size}: draw at "
                f"least {subset_size} {name} images (e.g. a larger -n), or lower the subset "
                f"size to at most {n} (--kid-subset-size {n})."
            )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("KID: the features hold NaN or inf values.")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(a.shape[0], subset_size, replace=False)]
        y = b[rng.choice(b.shape[0], subset_size, replace=False)]
        estimates[i] = polynomial_mmd2(x, y)
    std = float(estimates.std(ddof=1)) if num_subsets > 1 else math.nan
    return KIDResult(float(estimates.mean()), std, subset_size, num_subsets)
