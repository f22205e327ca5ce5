"""Two CPU processes (gloo) with different data must end with bit-identical codebooks."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from latentgen.tokenizers.quantizers import common
from latentgen.tokenizers.quantizers.vq import (
    EMAQuantizer,
    EMAQuantizerConfig,
    VectorQuantizer,
    VectorQuantizerConfig,
)

WORLD = 2
SHARED = dict(codebook_size=64, dim=8, kmeans_init=True, kmeans_iters=5, dead_code_threshold=3.0,
              dead_code_steps=2)  # fmt: skip
CASES = {
    "ema": (EMAQuantizer, EMAQuantizerConfig(lookup_dim=4, l2_normalize=True, **SHARED)),
    "vq": (VectorQuantizer, VectorQuantizerConfig(**SHARED)),
    # k-means and restarts from a reservoir that gathers rows of both ranks (unequal batches).
    "vq-reservoir": (VectorQuantizer, VectorQuantizerConfig(reservoir_size=256, **SHARED)),
}


def _rank_latents(rank: int, step: int) -> torch.Tensor:
    """Each rank sees its own clusters and its own batch size: ``[B_rank, 8, 4, 4]``."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    centres = 3 * torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    n = (8 - 2 * rank) * 16
    x = centres[torch.randint(0, 4, (n,), generator=g)] + 0.05 * torch.randn(n, 8, generator=g)
    return x.view(-1, 4, 4, 8).permute(0, 3, 1, 2).contiguous()


def _run(name: str, rank: int) -> dict[str, torch.Tensor]:
    cls, config = CASES[name]
    torch.manual_seed(0)  # identical construction on every rank, as DDP would also ensure
    q = cls(config)
    torch.manual_seed(100 + rank)  # from here on each rank's RNG differs
    restarts = 0.0
    for step in range(4):
        restarts += q(_rank_latents(rank, step)).stats.get("dead_code_restarts", 0.0)
    train_counts = q.usage_counter.counts.clone()
    q.eval()
    q(_rank_latents(rank, 50))  # evaluation counts stay local until sync()
    before_sync = q.usage_counter.counts.clone()
    q.usage_counter.sync()
    out = {
        "codebook": q.codebook.detach().clone(),
        "train_counts": train_counts,
        "before_sync": before_sync,
        "after_sync": q.usage_counter.counts.clone(),
        "restarts": torch.tensor(restarts),
    }
    if isinstance(q, EMAQuantizer):
        out.update(ema_count=q.ema_count.clone(), ema_sum=q.ema_sum.clone())
    if q.reservoir is not None:
        out["reservoir"] = q.reservoir.contents().clone()  # compared across ranks too
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name in CASES:
            for key, t in _run(name, rank).items():
                results[f"{name}.reduced.{key}"] = t
        # The same run with every reduction and broadcast switched off (the helpers in `common`
        # look `is_distributed` up at call time): the ranks drift apart.
        real = common.is_distributed
        common.is_distributed = lambda: False
        try:
            results["ema.local.codebook"] = _run("ema", rank)["codebook"]
        finally:
            common.is_distributed = real
        save_file(results, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """Run the workers once; each rank's saved tensors."""
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:  # a mismatched collective would hang: fail instead
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP quantizer workers did not finish within 180 s (hung collective?)")
    return [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_hold_bit_identical_codebooks(
    ranks: list[dict[str, torch.Tensor]], name: str
) -> None:
    r0, r1 = ranks
    keys = [k for k in r0 if k.startswith(f"{name}.reduced.") and "sync" not in k]
    assert f"{name}.reduced.codebook" in keys
    for key in keys:
        assert torch.equal(r0[key], r1[key]), key
    assert r0[f"{name}.reduced.restarts"] > 0  # dead-code restarts happened during the run
    if name == "vq-reservoir":
        # Both ranks' rows went in: 4 steps x 2 ranks x 96 (the smaller batch) > 256 kept.
        assert r0["vq-reservoir.reduced.reservoir"].shape == (256, 8)


@pytest.mark.parametrize("name", list(CASES))
def test_usage_counts_sync_after_local_evaluation(
    ranks: list[dict[str, torch.Tensor]], name: str
) -> None:
    r0, r1 = ranks
    train = r0[f"{name}.reduced.train_counts"]
    before = [r[f"{name}.reduced.before_sync"] for r in ranks]
    assert not torch.equal(before[0], before[1])  # each rank evaluated its own data
    expected = before[0] + before[1] - train
    assert torch.equal(r0[f"{name}.reduced.after_sync"], expected)
    assert torch.equal(r1[f"{name}.reduced.after_sync"], expected)


def test_without_reduction_the_ranks_drift_apart(ranks: list[dict[str, torch.Tensor]]) -> None:
    assert not torch.equal(ranks[0]["ema.local.codebook"], ranks[1]["ema.local.codebook"])
