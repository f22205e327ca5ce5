"""The training loop shared by both stages: ``Trainer(task, dataset, config).fit(resume=...)``.

    task = TokenizerTask(tokenizer, grid_images=images[:8])
    result = Trainer(task, dataset, TrainerConfig(run_name="vqgan", max_steps=20_000,
                                                  batch_size=8, lr=4.5e-6)).fit()

What the trainer does around ``task.train_step`` (see ``tasks.py`` for the task side):

- data order: a permutation per epoch from a seeded generator whose state is checkpointed, cut
  into one global batch per step and sharded by rank, so any (epoch, index) is replayable;
- AMP (bf16 autocast on CUDA), gradient accumulation, gradient averaging across ranks (DDP for
  the task's ``ddp_modules``, bucketed all-reduce otherwise; see ``distributed.py``), clipping;
- a NaN/inf guard: a step whose loss or gradient is not finite on any rank is skipped on every
  rank, and changes nothing: optimizer steps wait until every update of the step passed the
  guard, and state that forwards change outside the optimizer (codebooks, usage counts,
  BatchNorm statistics) is staged (``latentgen.staged_state``) and committed only then;
  ``max_bad_steps`` in a row stop training with ``TrainingDivergedError``;
- EMA of the weights, a warmup + cosine schedule, ``metrics.jsonl``, PNG grids, a tqdm bar;
- atomic checkpoints in ``run_dir/checkpoints/step-N/`` from which ``fit(resume=True)``
  continues bit for bit (weights, optimizer moments, RNGs, data position); temp directories of
  killed writes are removed at the next start, a full disk says what is intact, and a resume
  of a finished run whose export is missing exports it;
- ``fit(resume=True, allow_change=("lr", "grad_clip"))`` continues with changed options
  (``CHANGEABLE_ON_RESUME``), recorded in ``trainer.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, default_collate

from latentgen.artifact import load_module
from latentgen.errors import CheckpointError, DataError, LatentgenError, SpecError
from latentgen.files import atomic_write_bytes, atomic_write_json, load_tensors
from latentgen.staged_state import commit_all, discard_all, set_staging, staged_modules
from latentgen.training import run_checkpoints as ckpt
from latentgen.training.config import RESUME_KEYS, TrainerConfig
from latentgen.training.distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_mean,
    all_true,
    barrier,
    broadcast_module,
    gather_json,
    init_distributed,
)
from latentgen.training.ema import EMA
from latentgen.training.schedule import load_schedule_state
from latentgen.training.task import Task

__all__ = ["CHANGEABLE_ON_RESUME", "TrainResult", "Trainer", "TrainingDivergedError"]

#: Trainer options that ``fit(resume=True, allow_change=...)`` (``--allow-change``) may change.
#: The others (seed, ema_decay) would make the checkpoint's state meaningless for the new run.
CHANGEABLE_ON_RESUME = (
    "lr",
    "grad_clip",
    "amp",
    "betas",
    "weight_decay",
    "warmup_steps",
    "decay_steps",
    "min_lr_ratio",
    "lr_schedule",
    "batch_size",
    "grad_accum",
)
#: Options the NaN guard's message suggests changing.
_DIVERGENCE_KNOBS = ("lr", "grad_clip", "amp")
#: Written next to final/ once an export is complete: the step it holds.
EXPORT_RECORD = "export.json"


# LRScheduler's warning when its first step() comes before any optimizer.step().
_SCHEDULE_BEFORE_OPTIMIZER = re.escape("Detected call of `lr_scheduler.step()`")


class TrainingDivergedError(LatentgenError):
    """Too many steps in a row had a non-finite loss or gradient; training stopped."""


class _NonFiniteStep(Exception):
    """Raised inside a step to abandon it on every rank (caught by the trainer)."""


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns."""

    step: int
    run_dir: Path
    checkpoint: Path | None
    export: Path | None
    skipped_steps: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Position:
    """Where the data stream is: the epoch, samples consumed in it, and the order's seed state."""

    epoch: int
    index: int
    epoch_state: Tensor  # generator state that draws this epoch's permutation


class _StepContext:
    """``tasks.StepContext`` implementation handed to ``task.train_step``."""

    def __init__(self, trainer: Trainer, step: int, micro_batches: list[Any]) -> None:
        self.step = step
        self.micro_batches = micro_batches
        self.device = trainer.dist.device
        self._trainer = trainer
        self._loss_ok: dict[str, Tensor] = {}
        #: Optimizers whose update passed the guard; they step when the whole step has.
        self.passed: list[str] = []
        self._backward_calls: dict[str, int] = {}
        self._no_sync = contextlib.ExitStack()  # open from module() to the next backward()

    def close(self) -> None:
        """Leave a ``no_sync`` that a failed step left open, so the next step syncs again."""
        self._no_sync.close()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self._trainer.amp
        )

    def backward(self, loss: Tensor, optimizer: str) -> None:
        params = self._trainer._params_of(optimizer)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise SpecError(
                f"ctx.backward takes a scalar loss tensor, got "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}."
            )
        ok = torch.isfinite(loss.detach())
        prev = self._loss_ok.get(optimizer)
        self._loss_ok[optimizer] = ok if prev is None else (prev & ok)
        # inputs= keeps gradients out of other optimizers' parameters (the discriminator during
        # the generator's update) without toggling requires_grad.
        (loss.float() / len(self.micro_batches)).backward(inputs=params)
        self._backward_calls[optimizer] = self._backward_calls.get(optimizer, 0) + 1
        self._no_sync.close()

    def module(self, optimizer: str) -> nn.Module:
        t = self._trainer
        if optimizer in t._ddp:
            ddp = t._ddp[optimizer]
            # DDP all-reduces in the backward of a forward run outside no_sync: the last one.
            if self._backward_calls.get(optimizer, 0) < len(self.micro_batches) - 1:
                self._no_sync.enter_context(ddp.no_sync())
            return ddp
        modules = t.task.ddp_modules()
        if optimizer not in modules:
            raise SpecError(
                f"ctx.module('{optimizer}'): the task's ddp_modules() has {sorted(modules)}; "
                "add the module there or call it directly."
            )
        return modules[optimizer]

    def update(self, optimizer: str) -> float:
        t = self._trainer
        params = t._params_of(optimizer)
        self._no_sync.close()
        if optimizer not in t._ddp:  # DDP averaged those during the backward pass
            all_reduce_grads(params)
        # clip_grad_norm_ in its two halves: the norm decides the NaN guard before any clipping.
        norm = get_total_norm([p.grad for p in params if p.grad is not None]).to(self.device)
        loss_ok = self._loss_ok.pop(optimizer, torch.ones((), dtype=torch.bool))
        local_ok = bool((loss_ok.to(norm.device) & torch.isfinite(norm)).item())
        # Ranks must agree, or one would step while another skips and the weights would drift.
        if not all_true(local_ok, self.device):
            raise _NonFiniteStep(optimizer)
        if t.config.grad_clip is not None:
            clip_grads_with_norm_(params, t.config.grad_clip, norm)
        if optimizer in self.passed:
            raise SpecError(
                f"ctx.update('{optimizer}') was called twice in one step; call it once per "
                "optimizer, after all of that optimizer's ctx.backward calls."
            )
        # The optimizer steps later (Trainer._commit_step): a later update of this step that
        # fails the guard must leave this optimizer's weights untouched too.
        self.passed.append(optimizer)
        return float(norm)


class _MicroBatches:
    """This rank's micro-batch index lists for the given steps of one epoch's permutation.

    Step ``s`` takes the global batch ``perm[s*gb : (s+1)*gb]``; rank ``r`` its ``r``-th slice of
    ``batch_size * grad_accum``, cut into ``grad_accum`` micro-batches. Lazy, so an epoch of a
    large dataset is not materialised as Python lists.
    """

    def __init__(self, perm: Tensor, steps: range, gb: int, rank: int, cfg: TrainerConfig) -> None:
        self.perm, self.steps, self.gb, self.rank = perm, steps, gb, rank
        self.batch_size, self.accum = cfg.batch_size, cfg.grad_accum

    def __len__(self) -> int:
        return len(self.steps) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size * self.accum
        for s in self.steps:
            start = s * self.gb + self.rank * per_rank
            for chunk in self.perm[start : start + per_rank].split(self.batch_size):
                yield chunk.tolist()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


#: TrainerConfig.flush_denormal's default, for the commands that set the flag before they read one.
FLUSH_DENORMAL_DEFAULT: bool = TrainerConfig.model_fields["flush_denormal"].default


def flush_denormals(on: bool = True) -> bool:
    """Make CPU arithmetic treat subnormal floats as zero (``on``), or not; False if unsupported.

    torch sets the flag on the calling thread. Threads inherit it when they start, so it
    reaches torch's CPU worker threads only if set before the process's first parallel
    operation: call it before building models or data. torch offers no way to set it on
    threads that already run.
    """
    return bool(torch.set_flush_denormal(on))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    # The DataLoader seeds torch per worker from its own generator; derive numpy/random from it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (grids, sampling) without moving any RNG stream the training step uses."""
    state = ckpt.capture_rng(device)
    try:
        yield
    finally:
        ckpt.restore_rng(state, device)


class _MetricsWindow:
    """Sums of the logged scalars since the last metrics line, and the throughput over it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.start, self.steps = time.perf_counter(), 0

    def reset(self) -> None:
        self.sums, self.counts = {}, {}
        self.start, self.steps = time.perf_counter(), 0

    def add(self, logs: Mapping[str, Any]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def tick(self) -> None:
        self.steps += 1

    def flush(self, global_batch: int) -> tuple[dict[str, float], float]:
        """(mean of each key, samples per second) over the window; starts a new window."""
        # Per key: a term that only some steps log (the GAN loss after disc_start) is averaged
        # over those steps.
        means = {k: v / self.counts[k] for k, v in sorted(self.sums.items())}
        rate = self.steps * global_batch / max(time.perf_counter() - self.start, 1e-9)
        self.reset()
        return means, rate


class Trainer:
    """Trains a ``Task`` on a map-style dataset; one instance per run.

    Args:
        task: the models, optimizers and step (``TokenizerTask``, ``PriorTask`` or your own).
        dataset: map-style dataset; items are collated with ``collate_fn``.
        config: trainer options.
        dist: process placement; None reads the torchrun environment (``init_distributed``).
        collate_fn: batches a list of items (default: ``torch.utils.data.default_collate``).
        command: the command line that started this run without ``--resume`` (the CLI passes
            it), so messages can print the exact command that continues it.
    """

    def __init__(
        self,
        task: Task,
        dataset: Dataset[Any],
        config: TrainerConfig,
        *,
        dist: DistInfo | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        command: str | None = None,
    ) -> None:
        self.task = task
        self.command = command
        self.dataset = dataset
        self.config = config
        self.dist = dist if dist is not None else init_distributed(config.device)
        self.collate_fn = collate_fn or default_collate
        flush_denormals(config.flush_denormal)
        dev = self.dist.device
        bf16_ok = dev.type != "cuda" or torch.cuda.is_bf16_supported()
        self.amp = config.amp == "bf16" or (config.amp == "auto" and dev.type == "cuda" and bf16_ok)
        self.run_dir = config.run_dir
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, LRScheduler] = {}
        self.emas: dict[str, EMA] = {}
        self._params: dict[str, list[nn.Parameter]] = {}
        self._ddp: dict[str, DistributedDataParallel] = {}
        self.step = 0
        self.skipped_steps = 0
        self._bad_streak = 0  # skipped steps in a row
        self._last_checkpoint: Path | None = None
        self._last_metrics: dict[str, Any] = {}
        self._step_lrs: dict[str, float] = {}  # learning rates of the last step, for the log
        self._window = _MetricsWindow()
        self._staged: list[Any] = []  # StagedState modules of the task
        self._allow_change: tuple[str, ...] = ()
        self._changes: list[dict[str, Any]] = []  # options changed on resume, oldest first

    # -- helpers -----------------------------------------------------------------------------------
    def _params_of(self, optimizer: str) -> list[nn.Parameter]:
        if optimizer not in self._params:
            raise SpecError(
                f"unknown optimizer '{optimizer}'; this task has {sorted(self._params)}. Use one "
                "of the names its optimizer_parameters() returns."
            )
        return self._params[optimizer]

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.config.batch_size * self.config.grad_accum * self.dist.world_size

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"latentgen: {msg}", file=sys.stderr)

    def resume_command(self, allow_change: Iterable[str] = ()) -> str:
        """The command that continues this run (with ``--allow-change`` for ``allow_change``)."""
        allow = sorted(set(allow_change))
        if self.command is not None:
            extra = f" --allow-change {','.join(allow)}" if allow else ""
            return f"{self.command} --resume{extra}"
        extra = f", allow_change={tuple(allow)!r}" if allow else ""
        return f"Trainer(task, dataset, config).fit(resume=True{extra})"

    # -- data --------------------------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        steps = n // self.global_batch
        if steps == 0:
            raise DataError(
                f"the dataset has {n} samples, fewer than one step's global batch of "
                f"{self.global_batch} (batch_size {self.config.batch_size} x grad_accum "
                f"{self.config.grad_accum} x {self.dist.world_size} process(es)). Lower "
                "batch_size or grad_accum, or use more data."
            )
        return steps

    def _batches(self, pos: _Position) -> Iterator[tuple[list[Any], _Position]]:
        """Yield (this rank's micro-batches, position after them) forever, epoch by epoch."""
        cfg, d = self.config, self.dist
        n = len(self.dataset)  # type: ignore[arg-type]
        gb = self.global_batch
        steps = self._steps_per_epoch()
        while True:
            gen = torch.Generator()
            gen.set_state(pos.epoch_state)
            perm = torch.randperm(n, generator=gen)  # [n], this epoch's order
            next_state = gen.get_state()
            first = -(-pos.index // gb)  # ceil: a resume with another world size skips a partial
            if first < steps:
                micro = _MicroBatches(perm, range(first, steps), gb, d.rank, cfg)
                loader = DataLoader(
                    self.dataset,
                    batch_sampler=micro,
                    num_workers=cfg.num_workers,
                    collate_fn=self.collate_fn,
                    pin_memory=d.device.type == "cuda",
                    worker_init_fn=_worker_init if cfg.num_workers else None,
                    # Its own generator: the default one would consume the global torch RNG
                    # whenever an iterator starts, and resumes would drift.
                    generator=torch.Generator().manual_seed(
                        (cfg.seed * 1_000_003 + pos.epoch * 7919 + d.rank) % 2**63
                    ),
                )
                it = iter(loader)
                for s in range(first, steps):
                    batches = [next(it) for _ in range(cfg.grad_accum)]
                    yield batches, _Position(pos.epoch, (s + 1) * gb, pos.epoch_state)
            pos = _Position(pos.epoch + 1, 0, next_state)

    # -- checkpoints -------------------------------------------------------------------------------
    def _resolve_resume(self, resume: bool | str | Path) -> Path | None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if resume is False:
            if latest is not None:
                raise CheckpointError(
                    f"run dir {self.run_dir} already has checkpoints (latest {latest.name}). "
                    "Pass --resume (fit(resume=True)) to continue it, or pick another run_name."
                )
            return None
        if resume is True:
            if latest is None:
                raise CheckpointError(
                    f"--resume: no checkpoint under {self.run_dir / 'checkpoints'}. Drop "
                    "--resume to start the run, or check run_name and runs_dir."
                )
            return latest
        path = Path(resume)
        if (path / ckpt.TRAINER_FILE).is_file():
            return path
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"{path} is neither a checkpoint (no {ckpt.TRAINER_FILE}) nor a run dir with "
                "checkpoints/step-N; give a checkpoint path or True."
            )
        return found

    def _meta(self, pos: _Position) -> dict[str, Any]:
        from latentgen import __version__

        desc = self.task.describe()
        first_ema = next(iter(self.emas.values()), None)
        return {
            "latentgen_version": __version__,
            "step": self.step,
            "epoch": pos.epoch,
            "index": pos.index,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "skipped_steps": self.skipped_steps,
            "ema_updates": first_ema.num_updates if first_ema else 0,
            "spec_hash": ckpt.spec_hash(desc),
            "task": desc,
            "resume": self.config.resume_view(),
            "resume_changes": self._changes,
            "config": self.config.model_dump(mode="json"),
            "time": time.time(),
        }

    def _save(self, pos: _Position) -> Path:
        path = ckpt.checkpoint_dir(self.run_dir, self.step)
        dev = self.dist.device
        rng = gather_json(ckpt.capture_rng(dev), dev)  # a collective: every rank is here
        error: BaseException | None = None
        if self.dist.is_main:
            assert rng is not None
            try:
                ckpt.write_checkpoint(
                    path,
                    meta=self._meta(pos),
                    modules={n: m.state_dict() for n, m in self.task.modules().items()},
                    ema={n: e.state_dict() for n, e in self.emas.items()},
                    optimizers={n: o.state_dict() for n, o in self.optimizers.items()},
                    schedulers={n: s.state_dict() for n, s in self.schedulers.items()},
                    rng=rng,
                    sampler_state=pos.epoch_state,
                    resume_command=self.resume_command(),
                )
                ckpt.prune_checkpoints(self.run_dir, self.config.keep_last)
            except BaseException as e:  # report on every rank, not hang the others
                error = e
        # Doubles as the barrier after the write: no rank runs ahead of a missing checkpoint.
        if not all_true(error is None, dev):
            if error is not None:
                raise error
            raise CheckpointError(f"rank 0 failed to write checkpoint {path}; see its log.")
        return path

    def _load(self, path: Path) -> _Position:
        meta = ckpt.read_trainer_json(path)
        desc = self.task.describe()
        want = ckpt.spec_hash(desc)
        if meta.get("spec_hash") != want:
            raise CheckpointError(
                f"cannot resume from {path}: it was made for spec "
                f"{str(meta.get('spec_hash'))[:12]} "
                f"but this run's spec is {want[:12]}. Differences (checkpoint -> now): "
                f"{ckpt.describe_differences(meta.get('task', {}), desc)}. Use the config that "
                "made the checkpoint, or start a new run with another run_name."
            )
        changed = self._check_resume_options(path, meta)
        ckpt.verify_files(path, meta)
        for name, module in self.task.modules().items():
            f = path / f"model.{name}.safetensors"
            load_module(module, load_tensors(f, what=str(f)), what=str(f))
        for name, ema in self.emas.items():
            f = path / f"ema.{name}.safetensors"
            ema.load_state_dict(load_tensors(f, what=str(f)), int(meta.get("ema_updates", 0)))
        # The new config's hyperparameters, for the options allowed to change.
        fresh_groups = {n: [dict(g) for g in o.param_groups] for n, o in self.optimizers.items()}
        fresh_base = {n: [float(b) for b in s.base_lrs] for n, s in self.schedulers.items()}
        for name, opt in self.optimizers.items():
            try:
                opt.load_state_dict(ckpt.load_state(path, f"optimizer.{name}"))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: optimizer '{name}' does not fit: {e}") from None
            for group, fresh in zip(opt.param_groups, fresh_groups[name]):
                for key in ("betas", "weight_decay"):
                    if key in changed and key in fresh:
                        group[key] = fresh[key]
        for name, sched in self.schedulers.items():
            base_lrs = fresh_base[name] if "lr" in changed else None
            load_schedule_state(sched, ckpt.load_state(path, f"scheduler.{name}"), base_lrs)
        ranks, sampler_state = ckpt.read_rng(path)
        if int(meta["world_size"]) != self.dist.world_size:
            self._log(
                f"resuming a {meta['world_size']}-process run on {self.dist.world_size}: data "
                "order continues, per-rank random streams restart (not bit for bit)."
            )
        if self.dist.rank < len(ranks) and int(meta["world_size"]) == self.dist.world_size:
            ckpt.restore_rng(ranks[self.dist.rank], self.dist.device)
        else:
            _seed_all(self.config.seed + 7919 * int(meta["step"]) + self.dist.rank)
        self.step = int(meta["step"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self._changes = list(meta.get("resume_changes", []))
        if changed:
            self._changes.append({"step": self.step, "changed": changed, "time": time.time()})
        return _Position(int(meta["epoch"]), int(meta["index"]), sampler_state)

    def _check_resume_options(self, path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Refuse trainer options that differ from the checkpoint's unless allowed to change.

        Returns the allowed changes as ``{key: [checkpoint value, new value]}``.
        """
        now = self.config.resume_view()
        old = meta.get("resume") or {}
        diffs = sorted(k for k in now if old.get(k) != now[k])
        refused = [k for k in diffs if k not in self._allow_change]
        if refused:
            hint = ""
            if refused == ["decay_steps"]:
                hint = (
                    f" To train longer on the same schedule, set decay_steps: "
                    f"{old.get('decay_steps')} (the schedule then stays at its floor)."
                )
            fixed = [k for k in refused if k not in CHANGEABLE_ON_RESUME]
            if not fixed:
                hint += (
                    " To continue this run with the new values, resume with: "
                    f"{self.resume_command([*self._allow_change, *refused])}"
                )
            else:
                hint += f" ({', '.join(fixed)} cannot change within a run.)"
            raise CheckpointError(
                f"cannot resume from {path}: its trainer options differ from this run's, so it "
                f"would not continue the same run. Differences (checkpoint -> now): "
                f"{ckpt.describe_differences(old, now)}. Restore those "
                "options, or start a new run with another run_name." + hint
            )
        changed = {k: [old.get(k), now[k]] for k in diffs}
        if changed:
            self._log(
                "resuming with changed trainer options (allowed): "
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            )
        return changed

    def _truncate_metrics(self) -> None:
        # A resumed run rewrites the steps after its checkpoint; drop their old lines.
        path = self.run_dir / "metrics.jsonl"
        if not (self.dist.is_main and path.is_file()):
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= self.step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError, ValueError):
                continue  # a line torn by a crash
        atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())

    # -- logging and grids -------------------------------------------------------------------------
    def _write_metrics(self, record: Mapping[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _grid(self) -> Path | None:
        if not self.dist.is_main:
            return None
        with _preserved_rng(self.dist.device), contextlib.ExitStack() as stack:
            for ema in self.emas.values():
                stack.enter_context(ema.average_parameters())
            image = self.task.make_grid(self.step)
        if image is None:
            return None
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path = self.run_dir / "grids" / f"step-{self.step}.png"
        atomic_write_bytes(path, buf.getvalue())
        return path

    # -- the loop ----------------------------------------------------------------------------------
    def fit(
        self, resume: bool | str | Path = False, allow_change: Iterable[str] = ()
    ) -> TrainResult:
        """Train to ``config.max_steps``; ``resume`` continues the latest (or a given) checkpoint.

        ``allow_change`` names trainer options (from ``CHANGEABLE_ON_RESUME``) that may differ
        from the checkpoint's, e.g. ``("lr", "grad_clip")`` after the NaN guard stopped a run.
        Resuming a run that reached ``max_steps`` but has no export of its last step exports
        it. Returns the final step, the last checkpoint and the exported model's path.
        """
        self._allow_change = self._check_allow_change(resume, allow_change)
        pos = self._setup(resume)
        try:
            if self.step >= self.config.max_steps:
                return self._finish_without_training()
            batches = self._batches(pos)
            with self._progress_bar() as bar:
                while self.step < self.config.max_steps:
                    micro, pos = next(batches)
                    self._train_step(micro)
                    self.step += 1
                    bar.update(1)
                    self._after_step(pos, bar)
        finally:
            set_staging(self._staged, False)
        export = self._export()
        return TrainResult(
            self.step,
            self.run_dir,
            self._last_checkpoint,
            export,
            self.skipped_steps,
            self._last_metrics,
        )

    @staticmethod
    def _check_allow_change(resume: bool | str | Path, allow: Iterable[str]) -> tuple[str, ...]:
        keys = tuple(dict.fromkeys(allow))
        if not keys:
            return ()
        if resume is False:
            raise SpecError(
                "allow_change (--allow-change) only applies when resuming; add --resume "
                "(fit(resume=True)), or drop it for a new run."
            )
        bad = [k for k in keys if k not in CHANGEABLE_ON_RESUME]
        if bad:
            unknown = [k for k in bad if k not in RESUME_KEYS]
            why = (
                f"{', '.join(unknown)} is not a trainer option that resume checks"
                if unknown
                else f"{', '.join(bad)} cannot change within a run (the checkpoint's state "
                "depends on it)"
            )
            raise SpecError(
                f"--allow-change {','.join(keys)}: {why}. Options that may change on resume: "
                f"{', '.join(CHANGEABLE_ON_RESUME)}. Options resume does not check (max_steps, "
                "log_every, checkpoint_every, ...) need no --allow-change."
            )
        return keys

    def _finish_without_training(self) -> TrainResult:
        """Resumed at or past max_steps: export the last step if a crash or full disk kept it."""
        cfg = self.config
        export = None
        # Rank 0 looks at the files; every rank follows its answer (the export is collective).
        if all_true(self._export_is_current(), self.dist.device):
            self._log(f"step {self.step} >= max_steps {cfg.max_steps}: nothing to train.")
        else:
            self._log(
                f"step {self.step} >= max_steps {cfg.max_steps}: nothing to train, but "
                f"{self.run_dir / 'final'} does not hold step {self.step} (the run stopped "
                f"before its export); exporting it from {self._last_checkpoint}."
            )
            export = self._export()
        return TrainResult(
            self.step, self.run_dir, self._last_checkpoint, export, self.skipped_steps
        )

    def _export_is_current(self) -> bool:
        """Whether ``final/`` holds the current step (per ``export.json``), or there is none."""
        if not self.dist.is_main:
            return True  # rank 0 decides
        try:
            data = json.loads((self.run_dir / EXPORT_RECORD).read_text())
            path = data["path"]
            return int(data["step"]) == self.step and (
                path is None or (self.run_dir / path).exists()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _setup(self, resume: bool | str | Path) -> _Position:
        """Models on the device, optimizers, schedules, EMA and RNGs; the data position to start."""
        cfg, d, task = self.config, self.dist, self.task
        task.to(d.device)
        modules = task.modules()
        for m in modules.values():
            m.train()
        self.optimizers = task.configure_optimizers(cfg)
        self.schedulers = task.configure_schedulers(self.optimizers, cfg)
        self._params = {
            name: [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            for name, opt in self.optimizers.items()
        }
        if d.is_main:  # first: it may put back a checkpoint caught between two renames
            for stale in ckpt.clean_stale_temps(self.run_dir):
                self._log(f"removed {stale}, left by an interrupted write")
        barrier()  # the other ranks look for checkpoints only after that
        start = self._resolve_resume(resume)
        if start is None:
            for m in modules.values():
                broadcast_module(m)  # every rank starts from rank 0's weights
        self._ddp = self._wrap_data_parallel()
        if cfg.ema_decay is not None:
            self.emas = {n: EMA(modules[n], cfg.ema_decay) for n in task.ema_modules()}
        _seed_all(cfg.seed + d.rank)
        pos = _Position(0, 0, torch.Generator().manual_seed(cfg.seed).get_state())
        self._last_checkpoint = start
        if start is not None:
            pos = self._load(start)  # restores the RNGs last, right before the first step
            self._truncate_metrics()
            self._log(f"resumed from {start} at step {self.step}")
            if self._changes and self._changes[-1]["step"] == self.step:
                change = self._changes[-1]
                self._write_metrics({"event": "resume_changed_options", **change})
        self._window = _MetricsWindow()
        # Forwards stage their state updates from here on; _train_step commits or discards.
        self._staged = staged_modules(*modules.values())
        set_staging(self._staged, True)
        return pos

    def _wrap_data_parallel(self) -> dict[str, DistributedDataParallel]:
        """``DistributedDataParallel`` around each of the task's ``ddp_modules`` (several ranks)."""
        if not self.dist.enabled:
            return {}
        out = {}
        for name, module in self.task.ddp_modules().items():
            own = {id(p) for p in module.parameters() if p.requires_grad}
            if own != {id(p) for p in self._params_of(name)}:
                raise SpecError(
                    f"ddp_modules()['{name}'] must hold exactly the trainable parameters of "
                    f"optimizer '{name}' ({len(own)} vs {len(self._params_of(name))}); DDP "
                    "averages the gradients of the parameters it wraps."
                )
            # find_unused_parameters: a step may leave parameters out of the graph (a prior's
            # null condition embeddings when no row is dropped). Buffers are not broadcast:
            # each rank keeps its own, as the tokenizer's bucketed path does.
            out[name] = DistributedDataParallel(
                module, broadcast_buffers=False, find_unused_parameters=True
            )
        return out

    def _train_step(self, micro: list[Any]) -> bool:
        """Run ``task.train_step`` on this step's micro-batches; False when the step was skipped.

        A skipped step (non-finite loss or gradient on any rank) changed no weight, no optimizer
        moment and no EMA; it still counts as a step for the schedule and the data order.
        """
        micro = [_to_device(b, self.dist.device) for b in micro]
        self._step_lrs = {n: float(s.get_last_lr()[0]) for n, s in self.schedulers.items()}
        ctx = _StepContext(self, self.step, micro)
        try:
            with contextlib.closing(ctx):
                logs = self.task.train_step(ctx)
        except _NonFiniteStep as e:
            self._step_schedules(skipped=True)
            self._skip_step(str(e))
            return False
        except BaseException:
            discard_all(self._staged)  # a crash mid-step must not commit on the way out
            raise
        self._commit_step(ctx)
        self._step_schedules(skipped=False)
        self._bad_streak = 0
        for ema in self.emas.values():
            ema.update()
        self._window.add(logs)
        return True

    def _commit_step(self, ctx: _StepContext) -> None:
        """Every update passed the guard: commit staged state, then step the optimizers.

        Staged state first: a codebook re-seeded by k-means or a dead-code restart must be in
        place before the optimizer applies this step's gradient to it, as without staging.
        """
        commit_all(self._staged)
        for name in ctx.passed:
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)

    def _step_schedules(self, skipped: bool) -> None:
        """Advance every learning-rate schedule: the rate is a function of the step number."""
        with warnings.catch_warnings():
            if skipped:  # torch warns when the first step had no optimizer.step(); it is meant
                warnings.filterwarnings("ignore", _SCHEDULE_BEFORE_OPTIMIZER)
            for sched in self.schedulers.values():
                sched.step()

    def _skip_step(self, optimizer: str) -> None:
        """Drop the step's gradients and staged state and count it; too many stop the run."""
        discard_all(self._staged)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._bad_streak += 1
        self.skipped_steps += 1
        self._log(
            f"step {self.step}: non-finite loss or gradient for optimizer '{optimizer}', "
            f"step skipped ({self._bad_streak} in a row, {self.skipped_steps} in all)."
        )
        if self._bad_streak >= self.config.max_bad_steps:
            advice = "Lower lr, set grad_clip, or use amp: off in the trainer config, then "
            if self._last_checkpoint is not None:
                advice += (
                    f"continue from the last good checkpoint, {self._last_checkpoint}, with: "
                    f"{self.resume_command(_DIVERGENCE_KNOBS)}"
                )
            else:
                again = self.command or "Trainer(task, dataset, config).fit()"
                advice += f"start the run again (no checkpoint was written yet) with: {again}"
            raise TrainingDivergedError(
                f"{self._bad_streak} steps in a row (steps "
                f"{self.step - self._bad_streak + 1}..{self.step}) had a non-finite "
                f"loss or gradient; training stopped. {advice}"
            ) from None

    def _after_step(self, pos: _Position, bar: Any) -> None:
        """Metrics, grid and checkpoint when their cadence (or the last step) comes round."""
        cfg = self.config
        last = self.step == cfg.max_steps
        self._window.tick()
        if self.step % cfg.log_every == 0 or last:
            self._log_metrics(bar)
        if cfg.grid_every and self.step % cfg.grid_every == 0:
            self._grid()
        # Not during a streak of skipped steps: the last checkpoint stays the last good one.
        if (self.step % cfg.checkpoint_every == 0 or last) and self._bad_streak == 0:
            self._last_checkpoint = self._save(pos)

    def _log_metrics(self, bar: Any) -> None:
        """Average the window's logs over ranks, write a ``metrics.jsonl`` line, update the bar."""
        means, rate = self._window.flush(self.global_batch)
        means = all_reduce_mean(means, self.dist.device)
        self._last_metrics = {
            "step": self.step,
            "epoch": self.step / self._steps_per_epoch(),
            **means,
            **{f"lr/{n}": lr for n, lr in self._step_lrs.items()},
            "samples_per_s": rate,
            "skipped_steps": self.skipped_steps,
            "time": time.time(),
        }
        self._write_metrics(self._last_metrics)
        if "loss" in means:
            bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{rate:.1f}")

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Any]:
        """A tqdm bar on rank 0 (on a terminal, or always with progress='on'), closed at exit."""
        from tqdm.auto import tqdm

        cfg = self.config
        show = self.dist.is_main and (
            cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        )
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not show, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def _export(self) -> Path | None:
        """Write ``final/`` from the current weights (EMA if on) and record its step."""
        out = None
        error: BaseException | None = None
        if self.dist.is_main:
            final = self.run_dir / "final"
            intact = (
                f"checkpoint {self._last_checkpoint} holds the trained model and is intact"
                if self._last_checkpoint is not None
                else "no checkpoint holds the trained model"
            )
            then = f"{self.resume_command()} (it exports without training again)"
            try:
                with (
                    ckpt.disk_full_guard(f"the export {final}", final.parent, intact, then),
                    contextlib.ExitStack() as stack,
                ):
                    for ema in self.emas.values():
                        stack.enter_context(ema.average_parameters())
                    out = self.task.export(final)
                    # Written last: a resume trusts final/ only when this names its step.
                    name = None if out is None else Path(out).name
                    record = {"step": self.step, "path": name, "time": time.time()}
                    atomic_write_json(self.run_dir / EXPORT_RECORD, record)
            except BaseException as e:  # report on every rank, not hang the others
                error = e
            if out is not None:
                self._log(f"exported the trained model to {out}")
        if not all_true(error is None, self.dist.device):
            if error is not None:
                raise error
            raise CheckpointError(f"rank 0 failed to export {self.run_dir / 'final'}.")
        return out
