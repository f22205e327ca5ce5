"""Training faults (issue 9, items 8-11): a skipped batch changes no state, resuming with changed
options, a resume that finishes a missing export, stale temp directories and full disks.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from safetensors import SafetensorError
from torch import Tensor, nn

from latentgen import registry
from latentgen.cli import main
from latentgen.errors import CheckpointError, DiskFullError, SpecError
from latentgen.files import atomic_directory, load_tensors, save_tensors
from latentgen.staged_state import commit_all, set_staging, staged_modules
from latentgen.tokenizers.quantizers.base import Quantizer
from latentgen.training import run_checkpoints as ckpt
from latentgen.training.config import TrainerConfig
from latentgen.training.distributed import init_distributed
from latentgen.training.loop import EXPORT_RECORD, Trainer, TrainingDivergedError
from latentgen.training.task import Task
from latentgen.training.tokenizer_task import TokenizerTask


def config(tmp_path: Path, **kw: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(
        run_name="run",
        runs_dir=tmp_path,
        max_steps=6,
        batch_size=2,
        lr=1e-2,
        lr_schedule="constant",  # the skipped step shifts step numbers, not learning rates
        decay_steps=100,  # fixed, so runs may be extended with --resume
        log_every=1,
        checkpoint_every=100,
        grid_every=None,
        progress="off",
        grad_clip=1.0,
        ema_decay=0.9,
        device="cpu",
    )
    base.update(kw)
    return TrainerConfig(**base)


class Dummy(torch.utils.data.Dataset):
    """Items the tasks below ignore: they pick their batch by step, to line up two runs."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"i": torch.tensor(i)}


def module_state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and every buffer, saved or not (usage counts are not in the state dict)."""
    out = {f"p.{k}": v.detach().clone() for k, v in module.named_parameters()}
    out.update({f"b.{k}": v.detach().clone() for k, v in module.named_buffers()})
    return out


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"state differs in {differ}"


# -- item 8: one NaN batch changes no state --------------------------------------------------------
def batches(n: int, nan_at: int | None, seed: int = 0) -> list[tuple[int, Tensor]]:
    """``n`` good latent batches [2, 4, 3, 3] with ids, and a NaN one inserted at ``nan_at``."""
    g = torch.Generator().manual_seed(seed)
    good = [(i, torch.randn(2, 4, 3, 3, generator=g)) for i in range(n)]
    if nan_at is not None:
        good.insert(nan_at, (-1, torch.full((2, 4, 3, 3), float("nan"))))
    return good


class QuantizerTask(Task):
    """A 1x1 conv "encoder" and a quantizer trained to reconstruct latents, batch chosen by step."""

    def __init__(self, quantizer_config: dict[str, Any], plan: list[tuple[int, Tensor]]) -> None:
        torch.manual_seed(0)
        self.model = nn.Module()
        self.model.enc = nn.Conv2d(4, 4, 1)
        self.model.quantizer = registry.build("quantizer", quantizer_config)
        self.plan = plan

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, ctx: Any) -> dict[str, Any]:
        ident, x = self.plan[ctx.step]
        torch.manual_seed(1000 + ident)  # random draws follow the batch, not the step number
        out = self.model.quantizer(self.model.enc(x))
        loss = F.mse_loss(out.z_q, x) + out.loss
        ctx.backward(loss, "model")
        return {"loss": loss.detach(), "grad_norm": ctx.update("model")}


QUANTIZERS = {
    "vq": {"type": "vq", "codebook_size": 8, "dim": 4, "kmeans_init": True,
           "dead_code_threshold": 1.0, "dead_code_steps": 2},
    "vq-l2-factorized": {"type": "vq", "codebook_size": 8, "dim": 4, "lookup_dim": 2,
                         "l2_normalize": True, "dead_code_threshold": 2.0, "dead_code_steps": 3},
    "ema": {"type": "ema", "codebook_size": 8, "dim": 4, "kmeans_init": True,
            "dead_code_threshold": 1.0, "dead_code_steps": 2},
    "ema-plain": {"type": "ema", "codebook_size": 8, "dim": 4},
    "gumbel": {"type": "gumbel", "codebook_size": 8, "dim": 4, "anneal_steps": 4},
    "fsq": {"type": "fsq", "levels": [3, 3], "dim": 4},
}  # fmt: skip


def run(tmp_path: Path, task: Task, steps: int, **kw: Any) -> Trainer:
    trainer = Trainer(task, Dummy(), config(tmp_path, max_steps=steps, **kw))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("nan_at", [0, 3])
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_a_nan_batch_leaves_the_quantizer_as_if_it_never_came(tmp_path, name, nan_at):
    n = 6
    clean = run(tmp_path / "clean", QuantizerTask(QUANTIZERS[name], batches(n, None)), n)
    dirty = run(tmp_path / "dirty", QuantizerTask(QUANTIZERS[name], batches(n, nan_at)), n + 1)
    assert dirty.skipped_steps == 1 and clean.skipped_steps == 0
    # Weights, codebook, EMA sums, k-means flag, dead-code window, usage counts, anneal step:
    assert_same_state(module_state(clean.task.model), module_state(dirty.task.model))
    assert_same_state(clean.emas["model"].state_dict(), dirty.emas["model"].state_dict())
    quantizer = dirty.task.model.quantizer
    assert isinstance(quantizer, Quantizer) and not quantizer.staging  # off after fit
    assert int(quantizer.usage_counter.counts.sum()) == n * 2 * 3 * 3  # the NaN batch: not counted


def _ddp_worker(rank: int, init_file: str, run_dir: str, out: str, nan_at: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        plan = batches(4, None, seed=10 + rank)
        if nan_at is not None:  # rank 1 alone gets a NaN batch; rank 0's batch there is fine
            extra = (-1, torch.full((2, 4, 3, 3), float("nan"))) if rank == 1 else (
                -2, torch.randn(2, 4, 3, 3))  # fmt: skip
            plan.insert(nan_at, extra)
        task = QuantizerTask(QUANTIZERS["ema"], plan)
        cfg = config(Path(run_dir), max_steps=len(plan))
        trainer = Trainer(task, Dummy(), cfg, dist=init_distributed("cpu"))
        assert trainer.fit().skipped_steps == (nan_at is not None)
        save_tensors(Path(out) / f"rank{rank}.safetensors", module_state(task.model))
    finally:
        dist.destroy_process_group()


def test_a_nan_batch_on_one_rank_leaves_every_ranks_codebook_untouched(tmp_path):
    """The EMA sums are all-reduced, so rank 1's NaN would reach rank 0's codebook too."""
    states = {}
    for tag, nan_at in (("clean", None), ("dirty", 1)):
        out = tmp_path / tag
        out.mkdir()
        mp.start_processes(
            _ddp_worker,
            args=(str(tmp_path / f"init-{tag}"), str(out / "runs"), str(out), nan_at),
            nprocs=2,
            join=True,
            start_method="fork",
        )
        states[tag] = [load_tensors(out / f"rank{r}.safetensors") for r in range(2)]
    assert_same_state(states["dirty"][0], states["dirty"][1])
    assert_same_state(states["clean"][0], states["dirty"][0])
    assert torch.isfinite(states["dirty"][0]["b.quantizer.codebook"]).all()


def test_staged_updates_equal_direct_updates_with_accumulation():
    """Staging changes when state is written, not what: two micro-batches, then commit."""
    cfg = QUANTIZERS["ema"] | {"dead_code_steps": 1}
    x = [t for _, t in batches(2, None)]
    direct = registry.build("quantizer", cfg).train()
    staged = registry.build("quantizer", cfg).train()
    staged.load_state_dict(direct.state_dict())
    before = module_state(staged)
    torch.manual_seed(0)
    direct_idx = [direct(t).indices for t in x]
    parts = staged_modules(staged)
    assert len(parts) == 2  # the quantizer and its usage counter
    set_staging(parts, True)
    torch.manual_seed(0)
    staged_idx = [staged(t).indices for t in x]
    assert_same_state(module_state(staged), before)  # nothing written yet
    commit_all(parts)
    assert all(torch.equal(a, b) for a, b in zip(direct_idx, staged_idx))
    assert_same_state(module_state(direct), module_state(staged))
    assert not torch.equal(module_state(direct)["b.codebook"], before["b.codebook"])


class VQGANTask(TokenizerTask):
    """The real tokenizer task, fed batch-by-step so a run with a NaN batch lines up."""

    def __init__(self, tokenizer: Any, plan: list[tuple[int, Tensor]]) -> None:
        super().__init__(tokenizer)
        self.plan = plan

    def train_step(self, ctx: Any) -> dict[str, Any]:
        ident, images = self.plan[ctx.step]
        torch.manual_seed(1000 + ident)
        ctx.micro_batches = [{"image": images}]
        return super().train_step(ctx)


def images(n: int, nan_at: int | None) -> list[tuple[int, Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = [(i, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1) for i in range(n)]
    if nan_at is not None:
        out.insert(nan_at, (-1, torch.full((2, 3, 8, 8), float("nan"))))
    return out


def tiny_vqgan(norm: str) -> Any:
    torch.manual_seed(0)
    return registry.build("tokenizer", {
        "type": "vqgan", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
        "z_channels": 4, "resolution": 8, "norm_groups": 4, "perceptual_weight": 0.0,
        "disc_start": 0, "disc_warmup_steps": 0, "disc_num_layers": 1, "disc_ndf": 4,
        "disc_norm": norm,
        "quantizer": {"type": "ema", "codebook_size": 8, "dim": 4, "kmeans_init": True},
    })  # fmt: skip


@pytest.mark.parametrize("norm", ["batch", "actnorm"])
def test_a_nan_batch_leaves_the_vqgan_and_its_discriminator_untouched(tmp_path, norm):
    n = 3
    clean = run(tmp_path / "clean", VQGANTask(tiny_vqgan(norm), images(n, None)), n)
    dirty = run(tmp_path / "dirty", VQGANTask(tiny_vqgan(norm), images(n, 0)), n + 1)
    assert dirty.skipped_steps == 1
    # BatchNorm running statistics / ActNorm's data init, codebook, weights, EMA of them all.
    assert_same_state(module_state(clean.task.tokenizer), module_state(dirty.task.tokenizer))
    assert_same_state(clean.emas["tokenizer"].state_dict(), dirty.emas["tokenizer"].state_dict())
    assert all(torch.isfinite(v).all() for v in dirty.task.tokenizer.state_dict().values()
               if v.is_floating_point())  # fmt: skip


class TwoOptimizers(Task):
    """Optimizer a updates first, then b; b's loss is NaN on the steps in ``bad``."""

    def __init__(self, bad: set[int]) -> None:
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 1), nn.Linear(3, 1)
        self.bad = bad
        self.a_at: dict[int, Tensor] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"a": self.a, "b": self.b}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"a": list(self.a.parameters()), "b": list(self.b.parameters())}

    def train_step(self, ctx: Any) -> dict[str, Any]:
        self.a_at[ctx.step] = self.a.weight.detach().clone()
        x = torch.randn(4, 3)
        ctx.backward(self.a(x).pow(2).mean(), "a")
        ctx.update("a")
        loss_b = self.b(x).pow(2).mean() + (float("nan") if ctx.step in self.bad else 0.0)
        ctx.backward(loss_b, "b")
        ctx.update("b")
        return {}


def test_a_step_skipped_by_its_second_update_does_not_apply_the_first(tmp_path):
    task = TwoOptimizers(bad={2})
    trainer = run(tmp_path, task, 5, ema_decay=None)
    assert trainer.skipped_steps == 1
    assert torch.equal(task.a_at[2], task.a_at[3])  # a's passed update was not applied either
    assert not torch.equal(task.a_at[1], task.a_at[2])


# -- item 9: resume with changed options -----------------------------------------------------------
class Regression(Task):
    """A linear model; the loss is NaN on the steps in ``bad``."""

    def __init__(self, bad: set[int] | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.bad = bad or set()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, ctx: Any) -> dict[str, Any]:
        x = torch.randn(4, 4)
        loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        if ctx.step in self.bad:
            loss = loss + float("nan")
        ctx.backward(loss, "model")
        return {"loss": loss.detach(), "grad_norm": ctx.update("model")}

    def export(self, path: Path) -> Path:
        with atomic_directory(path) as tmp:
            save_tensors(tmp / "model.safetensors", self.model.state_dict())
        return path


def test_guard_prints_the_command_that_resumes_with_new_options(tmp_path):
    cfg = config(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=2, ema_decay=None)
    command = "latentgen train tokenizer --config cfg.yaml"
    trainer = Trainer(Regression(bad=set(range(4, 100))), Dummy(), cfg, command=command)
    with pytest.raises(TrainingDivergedError) as err:
        trainer.fit()
    msg = str(err.value)
    step4 = tmp_path / "run" / "checkpoints" / "step-4"
    assert msg == (
        "2 steps in a row (steps 4..5) had a non-finite loss or gradient; training stopped. "
        "Lower lr, set grad_clip, or use amp: off in the trainer config, then continue from the "
        f"last good checkpoint, {step4}, with: latentgen train tokenizer --config cfg.yaml "
        "--resume --allow-change amp,grad_clip,lr"
    ), msg
    # From Python, the same advice as a call.
    with pytest.raises(TrainingDivergedError, match=r"fit\(resume=True, allow_change=\("):
        Trainer(Regression(bad=set(range(4, 100))), Dummy(), cfg.model_copy()).fit(resume=True)
    # Diverging before the first checkpoint: start again, there is nothing to resume.
    early = cfg.model_copy(update={"run_name": "early"})
    with pytest.raises(TrainingDivergedError, match=r"start the run again \(no checkpoint was "
                       r"written yet\) with: latentgen train tokenizer --config cfg.yaml$"):
        Trainer(Regression(bad=set(range(100))), Dummy(), early, command=command).fit()


def test_resume_with_allowed_changes_is_recorded(tmp_path):
    Trainer(Regression(), Dummy(), config(tmp_path, max_steps=4, checkpoint_every=2)).fit()
    new = config(tmp_path, max_steps=6, checkpoint_every=2, lr=1e-3, grad_clip=0.5)
    with pytest.raises(CheckpointError) as err:
        Trainer(Regression(), Dummy(), new).fit(resume=True)
    assert str(err.value).endswith(
        "To continue this run with the new values, resume with: "
        "Trainer(task, dataset, config).fit(resume=True, allow_change=('grad_clip', 'lr'))"
    ), str(err.value)

    trainer = Trainer(Regression(), Dummy(), new)
    trainer.fit(resume=True, allow_change=("lr", "grad_clip", "warmup_steps"))
    assert trainer.schedulers["model"].base_lrs == [1e-3, 1e-3]  # the new lr, not the saved one
    meta = ckpt.read_trainer_json(tmp_path / "run" / "checkpoints" / "step-6")
    assert meta["resume"]["lr"] == 1e-3
    [change] = meta["resume_changes"]
    assert change["step"] == 4
    assert change["changed"] == {"grad_clip": [1.0, 0.5], "lr": [1e-2, 1e-3]}
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in lines if r.get("event") == "resume_changed_options"]
    assert len(events) == 1 and events[0]["changed"]["grad_clip"] == [1.0, 0.5]
    assert [r["lr/model"] for r in lines if "lr/model" in r][-1] == pytest.approx(1e-3)
    # The next resume compares with the new values and keeps the history.
    again = config(tmp_path, max_steps=8, checkpoint_every=2, lr=1e-3, grad_clip=0.5)
    Trainer(Regression(), Dummy(), again).fit(resume=True)
    meta = ckpt.read_trainer_json(tmp_path / "run" / "checkpoints" / "step-8")
    assert [c["step"] for c in meta["resume_changes"]] == [4]


@pytest.mark.parametrize(
    ("allow", "resume", "needle"),
    [
        (("seed",), True, "seed cannot change within a run"),
        (("colour",), True, "colour is not a trainer option that resume checks"),
        (("lr",), False, "only applies when resuming"),
    ],
)
def test_allow_change_refuses_what_it_cannot_do(tmp_path, allow, resume, needle):
    with pytest.raises(SpecError, match=needle):
        Trainer(Regression(), Dummy(), config(tmp_path)).fit(resume=resume, allow_change=allow)


def cli_config(tmp_path: Path, **trainer: Any) -> Path:
    cfg = {
        "tokenizer": {"type": "vqvae", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                      "attn_resolutions": [], "z_channels": 4, "resolution": 8, "norm_groups": 4,
                      "quantizer": {"type": "fsq", "levels": [3, 3], "dim": 4}},
        "data": {"type": "shapes", "size": 8, "image_size": 8},
        "trainer": {"run_name": "tok", "runs_dir": str(tmp_path / "runs"), "max_steps": 2,
                    "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "grid_every": None,
                    "decay_steps": 8, "progress": "off", "device": "cpu", **trainer},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_resume_allow_change_is_the_command_it_suggests(tmp_path):
    path = cli_config(tmp_path)
    assert CliRunner().invoke(main, ["train", "tokenizer", "--config", str(path)]).exit_code == 0
    path = cli_config(tmp_path, max_steps=4, lr=5e-4)
    res = CliRunner().invoke(main, ["train", "tokenizer", "--config", str(path), "--resume"])
    assert res.exit_code != 0
    suggested = f"latentgen train tokenizer --config {path} --resume --allow-change lr"
    assert suggested in res.output, res.output
    res = CliRunner().invoke(main, suggested.split()[1:])
    assert res.exit_code == 0, res.output
    assert "trained to step 4" in res.output
    meta = ckpt.read_trainer_json(tmp_path / "runs" / "tok" / "checkpoints" / "step-4")
    assert meta["resume_changes"][0]["changed"] == {"lr": [1e-3, 5e-4]}


# -- item 10: a resume finishes the export ---------------------------------------------------------
def test_resume_exports_when_the_run_stopped_before_its_export(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_steps=4, checkpoint_every=2)

    def killed(self: Trainer) -> None:
        raise KeyboardInterrupt  # the process dies between the last checkpoint and the export

    monkeypatch.setattr(Trainer, "_export", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(Regression(), Dummy(), cfg).fit()
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert ckpt.latest_checkpoint(run_dir).name == "step-4" and not (run_dir / "final").exists()
    trainer = Trainer(Regression(), Dummy(), cfg)
    result = trainer.fit(resume=True)
    assert result.export == run_dir / "final" and result.step == 4
    assert json.loads((run_dir / EXPORT_RECORD).read_text())["step"] == 4
    saved = ckpt.load_tensors(run_dir / "checkpoints" / "step-4" / "ema.model.safetensors")
    exported = ckpt.load_tensors(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(saved[k], exported[k]) for k in saved)  # EMA weights, as at the end
    # Once exported, a resume has nothing to do and leaves final/ alone.
    stamp = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    assert Trainer(Regression(), Dummy(), cfg).fit(resume=True).export is None
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_full_disk_during_the_export_says_how_to_finish_it(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_steps=2, checkpoint_every=2)
    task = Regression()

    def full(path: Path) -> Path:
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
            '"No space left on device" })'
        )

    monkeypatch.setattr(task, "export", full)
    with pytest.raises(DiskFullError) as err:
        Trainer(task, Dummy(), cfg).fit()
    msg = str(err.value)
    final, step2 = tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-2"
    assert msg.startswith(
        f"cannot write the export {final}: the disk is full (No space left on device) in "
        f"{final.parent}. Nothing of it was kept; "
    ), msg
    assert f"checkpoint {step2} holds the trained model and is intact" in msg
    assert msg.endswith(
        "then continue with: Trainer(task, dataset, config).fit(resume=True) (it exports "
        "without training again)"
    ), msg
    assert Trainer(Regression(), Dummy(), cfg).fit(resume=True).export == final


# -- item 11: stale temp directories and full disks ------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_start_and_resume_remove_temps_of_dead_writers_only(tmp_path):
    cfg = config(tmp_path, max_steps=2, checkpoint_every=2, ema_decay=None)
    Trainer(Regression(), Dummy(), cfg).fit()
    run_dir = tmp_path / "run"
    ckdir = run_dir / "checkpoints"
    dead, live = dead_pid(), os.getppid()  # pytest's parent outlives this test
    stale = [ckdir / f".step-4.tmp-{dead}-0123abcd", run_dir / f".final.tmp-{dead}-00ff00ff"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    stale.append(run_dir / f".metrics.jsonl.tmp-{dead}-deadbeef")
    stale[-1].write_text("{}")
    busy = ckdir / f".step-6.tmp-{live}-abcdef01"
    busy.mkdir()
    # A kill between atomic_directory's two renames leaves the only copy of step-2 aside.
    os.replace(ckdir / "step-2", ckdir / f".step-2.old-{dead}-11112222")
    result = Trainer(Regression(), Dummy(), cfg.model_copy(update={"max_steps": 4})).fit(
        resume=True
    )
    assert result.step == 4  # resumed from the step-2 that was put back
    assert not any(p.exists() for p in stale)
    assert busy.is_dir()  # a live process's write is not touched
    assert sorted(p.name for p in ckdir.iterdir()) == [busy.name, "step-2", "step-4"]


def test_a_fresh_start_cleans_too(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / f".step-2.tmp-{dead_pid()}-0123abcd").mkdir()
    Trainer(Regression(), Dummy(), config(tmp_path, max_steps=2, checkpoint_every=2)).fit()
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-2"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
            '"No space left on device" })'
        ),
    ],
    ids=["oserror", "safetensors"],
)
def test_a_full_disk_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch, error):
    cfg = config(tmp_path, max_steps=4, checkpoint_every=2)
    real = ckpt.save_tensors
    calls = {"n": 0}

    def flaky(path: Path, tensors: Any, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 5:  # the second checkpoint's first file
            raise error
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    command = "latentgen train tokenizer --config c.yaml"
    with pytest.raises(DiskFullError) as err:
        Trainer(Regression(), Dummy(), cfg, command=command).fit()
    ckdir = tmp_path / "run" / "checkpoints"
    assert str(err.value) == (
        "cannot write checkpoint step-4: the disk is full (No space left on device) while "
        f"writing model.model.safetensors in {ckdir}. Nothing of it was kept; the previous "
        f"checkpoint {ckdir / 'step-2'} is intact. Free space on that disk, then continue "
        "with: latentgen train tokenizer --config c.yaml --resume"
    )
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(ckdir)) == ["step-2"]  # no temp directory left
    monkeypatch.undo()
    assert Trainer(Regression(), Dummy(), cfg).fit(resume=True).step == 4


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def broken(path: Path, tensors: Any, metadata: Any = None) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt, "save_tensors", broken)
    cfg = config(tmp_path, max_steps=2, checkpoint_every=2)
    with pytest.raises(OSError) as err:
        Trainer(Regression(), Dummy(), cfg).fit()
    assert not isinstance(err.value, DiskFullError) and err.value.errno == errno.EIO
