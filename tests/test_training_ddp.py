"""Data-parallel training on 2 CPU processes over gloo (spawned here; torchrun does it for real)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from latentgen.files import load_tensors, save_tensors
from latentgen.training import run_checkpoints as ckpt
from latentgen.training.config import TrainerConfig
from latentgen.training.distributed import DistInfo, gather_json, init_distributed
from latentgen.training.loop import Trainer
from latentgen.training.tasks import PriorTask, TokenizerTask
from test_training import (
    CodeData,
    ImageData,
    RegressionTask,
    TinyAE,
    TinyAEConfig,
    XYData,
    full_state,
)

WORLD = 2
BAD_STEP = 2  # rank 1 alone sees a NaN loss here: both ranks must skip it


def config(run_dir: Path, batch_size: int, max_steps: int) -> TrainerConfig:
    return TrainerConfig(
        run_name="ddp",
        runs_dir=run_dir,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=1e-2,
        decay_steps=6,
        warmup_steps=1,
        grad_clip=0.5,
        log_every=2,
        checkpoint_every=4,
        grid_every=None,
        progress="off",
        ema_decay=0.9,
    )


def _worker(
    rank: int, init_file: str, run_dir: str, out_dir: str, max_steps: int, resume: bool
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        info = init_distributed("cpu")
        assert (info.rank, info.world_size) == (rank, WORLD)
        # Different initial weights per rank: the trainer must start everyone from rank 0's.
        task = RegressionTask(bad={BAD_STEP: "loss"} if rank == 1 else None, seed=100 + rank)
        trainer = Trainer(task, XYData(16), config(Path(run_dir), 2, max_steps), dist=info)
        result = trainer.fit(resume=resume)
        gathered = gather_json({"rank": rank, "skipped": result.skipped_steps}, info.device)
        if rank == 0:
            assert gathered == [{"rank": 0, "skipped": 1}, {"rank": 1, "skipped": 1}]
        save_tensors(Path(out_dir) / f"rank{rank}.safetensors", full_state(trainer))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, tag: str, run_dir: Path, max_steps: int, resume: bool) -> dict:
    out = tmp_path / tag
    out.mkdir()
    init_file = tmp_path / f"init-{tag}"
    # fork: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(
        _worker,
        args=(str(init_file), str(run_dir), str(out), max_steps, resume),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    return {r: load_tensors(out / f"rank{r}.safetensors") for r in range(WORLD)}


def _assert_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume_bit_for_bit(tmp_path: Path) -> None:
    run = tmp_path / "whole"
    states = _spawn(tmp_path, "whole", run, max_steps=6, resume=False)
    _assert_equal(states[0], states[1])  # every rank holds the same weights and optimizer state

    # One process with the whole global batch (2 ranks x 2) sees the same samples per step.
    task = RegressionTask(bad={BAD_STEP: "loss"}, seed=100)
    single = Trainer(task, XYData(16), config(tmp_path / "single", 4, 6), dist=DistInfo())
    single.fit()
    ref = full_state(single)
    for k in ref:
        torch.testing.assert_close(states[0][k], ref[k], rtol=1e-5, atol=1e-6)

    # Files were written once, by rank 0.
    root = run / "ddp"
    assert sorted(os.listdir(root / "checkpoints")) == ["step-4", "step-6"]
    lines = (root / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [2, 4, 6]
    assert len(json.loads((root / "checkpoints" / "step-6" / "rng.json").read_text())["ranks"]) == 2
    meta = ckpt.read_trainer_json(root / "checkpoints" / "step-6")
    assert meta["world_size"] == WORLD and meta["global_batch"] == 4

    # 4 steps, then a resumed run to 6, ends exactly where the 6-step run did, on every rank.
    _spawn(tmp_path, "first", tmp_path / "split", max_steps=4, resume=False)
    resumed = _spawn(tmp_path, "second", tmp_path / "split", max_steps=6, resume=True)
    for r in range(WORLD):
        _assert_equal(states[r], resumed[r])


def _env_worker(rank: int, port: int, out_dir: str) -> None:
    # What torchrun sets for each process.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed("cpu")
    try:
        assert dist.get_backend() == "gloo" and info.device.type == "cpu"
        ranks = gather_json({"rank": info.rank, "world": info.world_size}, info.device)
        if info.is_main:
            (Path(out_dir) / "ranks.json").write_text(json.dumps(ranks))
    finally:
        dist.destroy_process_group()


def test_init_distributed_reads_the_torchrun_environment(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _env_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork"
    )
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks == [{"rank": 0, "world": 2}, {"rank": 1, "world": 2}]


# -- the two real tasks: the prior under DistributedDataParallel, the tokenizer step bucketed ------
def _task(kind: str, seed: int) -> PriorTask | TokenizerTask:
    torch.manual_seed(seed)
    if kind == "tokenizer":  # no dropout: the ranks' and the single process's RNGs differ
        return TokenizerTask(TinyAE(TinyAEConfig(dropout=0.0)), disc_lr=5e-3)
    from latentgen import registry

    prior = registry.build(
        "prior",
        {
            "type": "transformer",
            "vocab_size": 16,
            "block_size": 5,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
            # A key bias gets a zero gradient up to rounding, which Adam would blow up to a full
            # step of noise that differs between 1 and 2 processes.
            "bias": False,
            "conditions": {"label": {"vocab_size": 3}},
        },
    )
    return PriorTask(
        prior, {"label": registry.build("conditioner", {"type": "class_label", "num_classes": 3})}
    )


def _task_config(run_dir: Path, batch_size: int) -> TrainerConfig:
    return TrainerConfig(
        run_name="task",
        runs_dir=run_dir,
        max_steps=3,
        batch_size=batch_size,
        grad_accum=2,  # the prior's first micro-batch runs under DDP's no_sync
        lr=1e-2,
        warmup_steps=1,
        grad_clip=0.5,
        checkpoint_every=100,
        grid_every=None,
        progress="off",
        ema_decay=0.9,
    )


def _weights_and_moments(trainer: Trainer) -> dict[str, torch.Tensor]:
    # Buffers (the tiny tokenizer's code usage counts) are per rank by design: left out.
    buffers = {
        f"model.{n}.{k}" for n, m in trainer.task.modules().items() for k, _ in m.named_buffers()
    }
    buffers |= {f"ema.{k[len('model.') :]}" for k in buffers}
    return {k: v for k, v in full_state(trainer).items() if k not in buffers}


def _task_worker(rank: int, init_file: str, kind: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        info = init_distributed("cpu")
        data = ImageData(16) if kind == "tokenizer" else CodeData(16)
        trainer = Trainer(
            _task(kind, seed=100 + rank), data, _task_config(Path(run_dir), 2), dist=info
        )
        trainer.fit()
        wrapped = {n: type(m).__name__ for n, m in trainer._ddp.items()}
        assert wrapped == ({"prior": "DistributedDataParallel"} if kind == "prior" else {})
        save_tensors(Path(out_dir) / f"rank{rank}.safetensors", _weights_and_moments(trainer))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prior", "tokenizer"])
def test_prior_under_ddp_and_tokenizer_step_match_one_process(tmp_path: Path, kind: str) -> None:
    """2 ranks x (2 x accum 2) == 1 process x (4 x accum 2): same weights, moments and EMA."""
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(
        _task_worker,
        args=(str(tmp_path / "init"), kind, str(tmp_path / "ddp"), str(out)),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    ranks = [load_tensors(out / f"rank{r}.safetensors") for r in range(WORLD)]
    _assert_equal(ranks[0], ranks[1])
    data = ImageData(16) if kind == "tokenizer" else CodeData(16)
    single = Trainer(
        _task(kind, seed=100), data, _task_config(tmp_path / "one", 4), dist=DistInfo()
    )
    single.fit()
    ref = _weights_and_moments(single)
    assert ref.keys() == ranks[0].keys()
    for k in ref:
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # Training moved the weights: equality is not that of two untouched copies.
    start = _task(kind, seed=100).modules()[kind].state_dict()
    assert any(
        not torch.equal(start[k], ref[f"model.{kind}.{k}"])
        for k in start
        if f"model.{kind}.{k}" in ref
    )
