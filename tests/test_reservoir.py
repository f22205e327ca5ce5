"""The codebook reservoir: a ring of recent encoder outputs for k-means init and restarts."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from latentgen.tokenizers.quantizers.common import draw_distinct
from latentgen.tokenizers.quantizers.reservoir import Reservoir
from latentgen.tokenizers.quantizers.vq import (
    EMAQuantizer,
    EMAQuantizerConfig,
    VectorQuantizer,
    VectorQuantizerConfig,
)


def rows(start: int, n: int, d: int = 3) -> torch.Tensor:
    """Rows whose first entry is their serial number ``start .. start + n - 1``."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_ring_keeps_the_newest_rows_oldest_first():
    r = Reservoir(capacity=5, dim=3)
    r.add(rows(0, 3))
    assert len(r) == 3 and r.contents()[:, 0].tolist() == [0, 1, 2]
    r.add(rows(3, 4))  # wraps
    assert len(r) == 5 and r.contents()[:, 0].tolist() == [2, 3, 4, 5, 6]
    r.add(rows(7, 12))  # more than the capacity at once
    assert r.contents()[:, 0].tolist() == [14, 15, 16, 17, 18]


def test_staged_rows_wait_for_commit_and_vanish_on_discard():
    r = Reservoir(capacity=4, dim=3)
    r.add(rows(0, 2))
    r.set_staging(True)
    r.add(rows(2, 3))
    assert r.contents()[:, 0].tolist() == [1, 2, 3, 4]  # visible to a later micro-batch
    r.discard_state()  # the step was skipped
    assert r.contents()[:, 0].tolist() == [0, 1]
    r.add(rows(5, 1))
    r.commit_state()
    r.set_staging(False)
    assert r.contents()[:, 0].tolist() == [0, 1, 5]


def test_draw_gives_distinct_rows_even_from_repeated_ones():
    torch.manual_seed(0)
    pool = torch.cat([rows(0, 3)] * 10 + [torch.full((50, 3), 7.0)])  # 4 distinct rows in 80
    out = draw_distinct(pool, 10)
    assert out.shape == (4, 3)  # fewer rows rather than a repeat
    assert torch.unique(out, dim=0).shape[0] == 4
    assert draw_distinct(pool, 2).shape == (2, 3)


def _gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a)]``: max-norm distance of each row of ``a`` to its nearest row of ``b`` (exact,
    unlike cdist's matmul form)."""
    return (a[:, None] - b[None]).abs().amax(-1).min(1).values


def _latents(step: int, n_images: int = 2) -> torch.Tensor:
    """``[n_images, 4, 4, 4]``: 16 rows per image from 300 well separated points."""
    g = torch.Generator().manual_seed(step)
    centres = 4 * torch.randn(300, 4, generator=torch.Generator().manual_seed(99))
    pick = centres[torch.randint(0, 300, (n_images * 16,), generator=g)]
    return pick.view(n_images, 4, 4, 4).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("cls,cfg_cls", [(VectorQuantizer, VectorQuantizerConfig),
                                         (EMAQuantizer, EMAQuantizerConfig)])  # fmt: skip
def test_kmeans_waits_for_k_rows_then_clusters_the_reservoir(cls, cfg_cls):
    torch.manual_seed(0)
    q = cls(cfg_cls(codebook_size=64, dim=4, kmeans_init=True, reservoir_size=256)).train()
    q(_latents(0))  # 32 rows < 64: not yet
    assert not bool(q.codebook_initialized)
    q(_latents(1))  # 64 rows: k-means on all of them
    assert bool(q.codebook_initialized)
    data = torch.cat([_latents(s).permute(0, 2, 3, 1).reshape(-1, 4) for s in range(2)])
    assert torch.equal(q.reservoir.contents(), data)
    # Seeded at distinct rows, k-means keeps one centroid per distinct point (no point is
    # shared between two centroids while others are free), each on its point.
    points = torch.unique(data, dim=0)
    assert points.shape[0] < 64  # repeats in the data: the surplus centroids repeat too
    cb = q.codebook.detach()
    assert (_gap(points, cb) < 1e-3).all()  # EMA: sum / smoothed count, rounded


def test_restarts_fill_a_codebook_larger_than_a_batch_with_distinct_rows():
    """K = 256 codes and 32 rows a batch: from the batch a restart re-seeds at most 32 codes; the
    reservoir re-seeds every dead code at once, each from its own row."""
    shared = dict(codebook_size=256, dim=4, dead_code_threshold=1.0, dead_code_steps=8)

    def run(reservoir: int) -> tuple[VectorQuantizer, float]:
        torch.manual_seed(0)
        q = VectorQuantizer(VectorQuantizerConfig(reservoir_size=reservoir, **shared)).train()
        first = 0.0
        for step in range(8):  # one window: restarts at its end
            first += q(_latents(step)).stats.get("dead_code_restarts", 0.0)
        return q, first

    _, from_batch = run(0)
    q_res, from_reservoir = run(1024)
    assert from_batch <= 32
    # 8 x 32 = 256 rows of ~300 points: ~175 distinct, all of them used.
    assert from_reservoir > 150
    cb = q_res.codebook.detach()
    restarted = cb[_gap(cb, q_res.reservoir.contents()) == 0]
    assert restarted.shape[0] >= from_reservoir  # restarted codes sit on reservoir rows...
    assert torch.unique(restarted, dim=0).shape[0] == restarted.shape[0]  # ...no two on one row


def test_reservoir_without_kmeans_or_restarts_is_a_clear_error():
    with pytest.raises(ValidationError, match=r"reservoir_size=64 feeds k-means init and "
                       r"dead-code restarts, but both are off"):  # fmt: skip
        VectorQuantizerConfig(codebook_size=16, dim=4, reservoir_size=64)


def test_reservoir_rows_stay_out_of_the_state_dict():
    q = VectorQuantizer(VectorQuantizerConfig(codebook_size=16, dim=4, kmeans_init=True,
                                              reservoir_size=64))  # fmt: skip
    assert not any("reservoir" in k for k in q.state_dict())
