"""KID: unbiased polynomial-kernel MMD^2 with its standard error; the Inception Score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentgen.errors import InputError
from latentgen.metrics.inception_score import inception_score
from latentgen.metrics.kid import kernel_inception_distance, polynomial_mmd2


def test_mmd2_matches_a_direct_double_sum() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / 35
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = kernel_inception_distance(a, b, subset_size=100, num_subsets=50)
    far = kernel_inception_distance(a, torch.from_numpy(b + 1.0), subset_size=100, num_subsets=50)
    # Unbiased: same-distribution estimates scatter around 0 (within a few standard errors).
    assert abs(same.value) < 3 * same.std_error + 1e-3
    assert same.std_error > 0
    assert far.value > 5 * far.std_error and far.value > 1.0
    assert far.subset_size == 100 and far.num_subsets == 50
    # seeded: the same subsets again
    assert kernel_inception_distance(a, b, subset_size=100, num_subsets=50) == same


def test_kid_bad_input_names_the_fix() -> None:
    a = np.zeros((50, 4))
    with pytest.raises(
        InputError, match=r"50 generated images, fewer than its subset size 100.*-n"
    ):
        kernel_inception_distance(np.zeros((200, 4)), a, subset_size=100)
    with pytest.raises(InputError, match="kid-subset-size 50"):
        kernel_inception_distance(np.zeros((200, 4)), a, subset_size=100)
    with pytest.raises(InputError, match=r"\[N, D\] of one D"):
        kernel_inception_distance(np.zeros((200, 4)), np.zeros((200, 5)), subset_size=10)


def test_inception_score_bounds() -> None:
    uniform = np.full((20, 5), 0.2)
    assert inception_score(uniform, splits=2)[0] == pytest.approx(1.0)
    confident = np.eye(5)[np.arange(20) % 5]  # sure of each sample, all classes equally often
    mean, std = inception_score(confident, splits=2)
    assert mean == pytest.approx(5.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError, match="at least 10 samples"):
        inception_score(uniform[:4], splits=10)
