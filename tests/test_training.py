"""The shared training loop: bit-for-bit resume, NaN guard, atomic checkpoints, accumulation, EMA.

Stand-ins defined here (a tiny conv autoencoder with a discriminator implementing the VQGAN
training protocol, a tiny prior) keep the tests independent of the real models.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import Tensor, nn

from latentgen.conditioners.base import Conditioner, Conditioning
from latentgen.errors import CheckpointError, DataError, SpecError
from latentgen.files import load_tensors
from latentgen.hookspecs import hookimpl
from latentgen.priors.base import Prior
from latentgen.specs import ComponentConfig
from latentgen.tokenizers.base import Tokenizer, TokenizerOutput, TrainableTokenizer
from latentgen.training import run_checkpoints as ckpt
from latentgen.training.config import (
    PriorTrainConfig,
    TokenizerTrainConfig,
    TrainerConfig,
    load_train_config,
)
from latentgen.training.ema import EMA
from latentgen.training.loop import Trainer, TrainingDivergedError
from latentgen.training.schedule import load_schedule_state, lr_factor, warmup_cosine
from latentgen.training.tasks import PriorTask, Task, TokenizerTask


# -- stand-ins -------------------------------------------------------------------------------------
class TinyAEConfig(ComponentConfig):
    type: Literal["test.tiny_ae"] = "test.tiny_ae"
    codebook_size: int = Field(16, ge=2)
    dim: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    adversarial: bool = True


class TinyAE(TrainableTokenizer):
    """Conv encoder (f=2) -> nearest-code VQ (straight-through) -> conv decoder, + a tiny critic."""

    Config = TinyAEConfig

    def __init__(self, config: TinyAEConfig) -> None:
        super().__init__(config)
        d = config.dim
        self.enc = nn.Conv2d(3, d, 2, stride=2)
        self.drop = nn.Dropout(config.dropout)  # makes the global RNG matter for resume
        self.codebook = nn.Embedding(config.codebook_size, d)
        self.dec = nn.ConvTranspose2d(d, 3, 2, stride=2)
        self.disc = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 1)
        )
        self.register_buffer("usage", torch.zeros(config.codebook_size))
        self.has_discriminator = config.adversarial

    vocab_size = property(lambda self: self.config.codebook_size)
    downsample = property(lambda self: 2)
    in_channels = property(lambda self: 3)

    def _quantize(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.drop(self.enc(images)).permute(0, 2, 3, 1)  # [B, h, w, d]
        dist = (z.unsqueeze(-2) - self.codebook.weight).pow(2).sum(-1)  # [B, h, w, K]
        codes = dist.argmin(-1)  # [B, h, w]
        q = self.codebook(codes)
        loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()
        return q.permute(0, 3, 1, 2), codes, loss

    def encode(self, images: Tensor) -> Tensor:
        self.check_images(images)
        return self._quantize(images)[1]

    def decode(self, codes: Tensor) -> Tensor:
        return torch.tanh(self.dec(self.codebook(codes).permute(0, 3, 1, 2)))

    def forward(self, images: Tensor) -> TokenizerOutput:
        q, codes, qloss = self._quantize(images)
        if self.training:
            self.usage += torch.bincount(codes.flatten(), minlength=self.vocab_size).float()
        return TokenizerOutput(torch.tanh(self.dec(q)), codes, qloss)

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("disc.")]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.disc.parameters())

    def generator_loss(self, images: Tensor, step: int) -> tuple[Tensor, dict[str, float], Any]:
        out = self(images)
        rec = (out.recon - images).abs().mean()
        loss = rec + out.quant_loss
        logs = {"rec": float(rec.detach())}
        if self.has_discriminator:
            g = -self.disc(out.recon).mean()
            loss = loss + 0.1 * g
            logs["g_adv"] = float(g.detach())
        return loss, logs, out

    def discriminator_loss(self, images: Tensor, recon: Tensor, step: int) -> tuple[Tensor, dict]:
        real, fake = self.disc(images), self.disc(recon.detach())
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()  # hinge
        return loss, {"d_real": float(real.detach().mean())}


class TinyAEPlugin:
    @staticmethod
    @hookimpl
    def register_tokenizers(register):
        register(TinyAE)


class TinyPriorConfig(ComponentConfig):
    type: Literal["test.tiny_prior"] = "test.tiny_prior"
    vocab_size: int = 16
    num_classes: int = 3
    cond_dropout: float = 0.3  # Prior.loss drops conditions: the resume test replays the draws


class TinyPrior(Prior):
    """Each code predicted from its left neighbour and the class (a bigram model with dropout)."""

    Config = TinyPriorConfig

    def __init__(self, config: TinyPriorConfig) -> None:
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size + 1, 8)
        self.cls = nn.Embedding(config.num_classes + 1, 8)  # last row: null (dropped) class
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, config.vocab_size)

    vocab_size = property(lambda self: self.config.vocab_size)
    condition_names = property(lambda self: ("label",))

    def _logits(self, codes: Tensor, conds: Any) -> Tensor:
        b = codes.shape[0]
        seq = codes.reshape(b, -1)  # [B, n]
        prev = torch.cat([seq.new_full((b, 1), self.vocab_size), seq[:, :-1]], 1)  # [B, n]
        c = conds["label"]
        tok = c.tokens[:, 0]
        if c.drop is not None:
            tok = torch.where(c.drop, torch.full_like(tok, self.config.num_classes), tok)
        h = self.drop(self.emb(prev) + self.cls(tok)[:, None])  # [B, n, 8]
        return self.head(h)  # [B, n, K]

    def log_prob(self, codes: Tensor, conds: Any = None) -> Tensor:
        logits = self._logits(codes, conds).log_softmax(-1)
        return logits.gather(-1, codes.reshape(codes.shape[0], -1, 1)).squeeze(-1).sum(-1)

    def sample(
        self, conds=None, grid=(2, 2), sampler=None, generator=None, num_samples=None, prefix=None
    ) -> Tensor:
        b = conds["label"].batch_size
        codes = torch.zeros(b, grid[0] * grid[1], dtype=torch.long)
        for i in range(codes.shape[1]):
            logits = self._logits(codes.view(b, *grid), conds)[:, i]
            codes[:, i] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        return codes.view(b, *grid)


class TinyLabelConfig(ComponentConfig):
    type: Literal["test.tiny_label"] = "test.tiny_label"
    num_classes: int = 3


class TinyLabel(Conditioner):
    Config = TinyLabelConfig

    vocab_size = property(lambda self: self.config.num_classes)

    def encode(self, raw: Any) -> Conditioning:
        tokens = torch.as_tensor(raw, dtype=torch.long).reshape(-1, 1)  # [B, 1]
        return Conditioning(tokens=tokens, vocab_size=self.vocab_size)


class ImageData(torch.utils.data.Dataset):
    """Seeded random images in [-1, 1] with labels."""

    def __init__(self, n: int = 24, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class CodeData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.codes = torch.randint(0, 16, (n, 2, 2), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"codes": self.codes[i], "label": self.labels[i]}


class RegressionTask(Task):
    """A linear model on (x, y) with optional NaN injection (guard and accumulation tests)."""

    def __init__(self, bad: dict[int, str] | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Linear(4, 1)
        self.bad = bad or {}
        self.weights_at: dict[int, Tensor] = {}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, ctx: Any) -> dict[str, Any]:
        self.weights_at[ctx.step] = self.model.weight.detach().clone()
        for batch in ctx.micro_batches:
            loss = (self.model(batch["x"]) - batch["y"]).pow(2).mean()
            kind = self.bad.get(ctx.step)
            if kind == "loss":
                loss = loss + float("nan")  # gradients stay finite: only the loss check sees it
            elif kind == "grad":
                loss = loss + (self.model.weight * float("inf")).sum() * 0  # inf * 0 = nan grads
            ctx.backward(loss, "model")
        return {"loss": loss.detach(), "grad_norm": ctx.update("model")}


class XYData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def trainer_config(tmp_path: Path, **kw: Any) -> TrainerConfig:
    base = dict(
        run_name="run",
        runs_dir=tmp_path,
        max_steps=6,
        batch_size=2,
        lr=1e-2,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=100,
        grid_every=None,
        progress="off",
        grad_clip=1.0,
        device="cpu",  # bit-for-bit checks need CPU kernels; CUDA has its own test below
    )
    base.update(kw)
    return TrainerConfig(**base)


def tokenizer_task(seed: int = 0, **cfg: Any) -> TokenizerTask:
    torch.manual_seed(seed)
    tok = TinyAE(TinyAEConfig(**cfg))
    return TokenizerTask(tok, grid_images=ImageData(4, seed=9).images, disc_lr=5e-3)


def prior_task(seed: int = 0) -> PriorTask:
    torch.manual_seed(seed)
    return PriorTask(TinyPrior(TinyPriorConfig()), {"label": TinyLabel(TinyLabelConfig())})


def full_state(trainer: Trainer) -> dict[str, Tensor]:
    """Every tensor a run holds: weights, EMA, flattened optimizer states."""
    out = {}
    for name, m in trainer.task.modules().items():
        out.update({f"model.{name}.{k}": v for k, v in m.state_dict().items()})
    for name, e in trainer.emas.items():
        out.update({f"ema.{name}.{k}": v for k, v in e.state_dict().items()})
    for name, opt in trainer.optimizers.items():
        _, tensors = ckpt.flatten_state(opt.state_dict(), f"opt.{name}")
        out.update(tensors)
    return out


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


# -- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tokenizer", "prior"])
def test_resume_continues_bit_for_bit(tmp_path: Path, kind: str) -> None:
    """2N steps in one go == N steps, then --resume for N more (weights, EMA, optimizer state)."""
    make_task = tokenizer_task if kind == "tokenizer" else prior_task
    data = ImageData() if kind == "tokenizer" else CodeData()
    # 24 items / (2 x accum 2) = 6 steps per epoch: the resumed half crosses an epoch boundary.
    common = dict(grad_accum=2, ema_decay=0.9, decay_steps=10, checkpoint_every=5)

    whole = Trainer(make_task(), data, trainer_config(tmp_path / "a", max_steps=10, **common))
    whole.fit()

    first = Trainer(make_task(), data, trainer_config(tmp_path / "b", max_steps=5, **common))
    first.fit()
    metrics = tmp_path / "b" / "run" / "metrics.jsonl"
    with open(metrics, "a") as fh:  # as if the first run had logged step 7 before dying
        fh.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    # A fresh process would rebuild the model from scratch: other initial weights must not matter.
    second = Trainer(
        make_task(seed=123), data, trainer_config(tmp_path / "b", max_steps=10, **common)
    )
    result = second.fit(resume=True)

    assert result.step == 10 and second.step == whole.step
    assert_same_state(full_state(whole), full_state(second))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [2, 4, 5, 6, 8, 10]  # the stale line after the checkpoint was dropped
    # And the half-way state really was different (the test can fail).
    mid = load_tensors(
        tmp_path / "b" / "run" / "checkpoints" / "step-5" / f"model.{kind}.safetensors"
    )
    final = whole.task.modules()[kind].state_dict()
    assert any(not torch.equal(mid[k], final[k]) for k in mid)


@pytest.mark.cuda
def test_cuda_bf16_run_checkpoints_and_resumes(tmp_path: Path) -> None:
    cfg = dict(device="cuda", amp="auto", decay_steps=4, checkpoint_every=2, ema_decay=0.9)
    first = Trainer(tokenizer_task(), ImageData(), trainer_config(tmp_path, max_steps=2, **cfg))
    assert first.amp  # bf16 autocast by default on CUDA
    first.fit()
    rng = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "rng.json").read_text())
    assert rng["ranks"][0]["cuda"] is not None
    second = Trainer(tokenizer_task(), ImageData(), trainer_config(tmp_path, max_steps=4, **cfg))
    result = second.fit(resume=True)
    assert result.step == 4 and math.isfinite(result.metrics["loss"])
    assert next(second.task.modules()["tokenizer"].parameters()).is_cuda


def test_resume_refuses_another_spec_or_trainer_options(tmp_path: Path) -> None:
    data = ImageData()
    Trainer(tokenizer_task(), data, trainer_config(tmp_path, max_steps=2)).fit()
    other = Trainer(tokenizer_task(codebook_size=8), data, trainer_config(tmp_path, max_steps=4))
    with pytest.raises(CheckpointError) as err:
        other.fit(resume=True)
    msg = str(err.value)
    old = ckpt.spec_hash(tokenizer_task().describe())[:12]
    new = ckpt.spec_hash(other.task.describe())[:12]
    assert old in msg and new in msg and "codebook_size: 16 -> 8" in msg

    with pytest.raises(CheckpointError, match=r"lr: 0\.01 -> 0\.02"):
        Trainer(tokenizer_task(), data, trainer_config(tmp_path, max_steps=4, lr=2e-2)).fit(
            resume=True
        )


def test_fresh_run_does_not_overwrite_and_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(RegressionTask(), XYData(), trainer_config(tmp_path)).fit(resume=True)
    Trainer(RegressionTask(), XYData(), trainer_config(tmp_path, max_steps=2)).fit()
    with pytest.raises(CheckpointError, match="already has checkpoints"):
        Trainer(RegressionTask(), XYData(), trainer_config(tmp_path, max_steps=2)).fit()


# -- NaN guard -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    task = RegressionTask(bad={3: kind})
    result = Trainer(task, XYData(), trainer_config(tmp_path, max_steps=6, log_every=1)).fit()
    assert result.skipped_steps == 1
    assert torch.equal(task.weights_at[3], task.weights_at[4])  # step 3 changed nothing
    assert not torch.equal(task.weights_at[2], task.weights_at[3])  # the others did
    assert torch.isfinite(task.model.weight).all()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines] == [0, 0, 0, 1, 1, 1]


def test_skipped_first_step_still_advances_the_schedule(tmp_path: Path) -> None:
    import warnings

    cfg = trainer_config(tmp_path, max_steps=3, log_every=1, warmup_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lr_scheduler-before-optimizer warning either
        result = Trainer(RegressionTask(bad={0: "loss"}), XYData(), cfg).fit()
    assert result.skipped_steps == 1
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The rate each step used: warmup 1/2 (skipped step 0), 2/2, then the cosine's start.
    assert [r["lr/model"] for r in lines] == [0.005, 0.01, 0.01]


def test_too_many_bad_steps_stop_with_last_good_checkpoint(tmp_path: Path) -> None:
    task = RegressionTask(bad={s: "loss" for s in range(4, 100)})
    cfg = trainer_config(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=3)
    with pytest.raises(TrainingDivergedError) as err:
        Trainer(task, XYData(), cfg).fit()
    good = tmp_path / "run" / "checkpoints" / "step-4"
    assert str(good) in str(err.value) and "3 steps in a row" in str(err.value)
    # No checkpoint was written during the bad streak (step 6 would have been one).
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]
    meta = ckpt.read_trainer_json(good)
    ckpt.verify_files(good, meta)
    saved = load_tensors(good / "model.model.safetensors")
    assert torch.equal(saved["weight"], task.model.weight.detach())  # skipped steps: no change


# -- atomic checkpoints ----------------------------------------------------------------------------
def test_failed_checkpoint_write_leaves_previous_intact(tmp_path: Path, monkeypatch) -> None:
    cfg = trainer_config(tmp_path, max_steps=4, checkpoint_every=2)
    calls = {"n": 0}
    real = ckpt.save_tensors

    def flaky(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] > 4:  # the second checkpoint dies after writing its model file
            raise OSError("disk full (simulated)")
        real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        Trainer(RegressionTask(), XYData(), cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-2"]  # no step-4, no temp dir left behind
    monkeypatch.setattr(ckpt, "save_tensors", real)
    result = Trainer(RegressionTask(), XYData(), cfg).fit(resume=True)  # step-2 still loads
    assert result.step == 4


def test_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    Trainer(RegressionTask(), XYData(), trainer_config(tmp_path, max_steps=2, decay_steps=4)).fit()
    path = tmp_path / "run" / "checkpoints" / "step-2"
    (path / "optimizer.model.json").write_text("{}")
    cfg = trainer_config(tmp_path, max_steps=4, decay_steps=4)
    with pytest.raises(CheckpointError, match=r"optimizer\.model\.json \(sha256 differs\)"):
        Trainer(RegressionTask(), XYData(), cfg).fit(resume=True)


# -- gradient accumulation -------------------------------------------------------------------------
def test_grad_accumulation_matches_a_bigger_batch(tmp_path: Path) -> None:
    runs = {}
    for name, bs, accum in (("accum", 2, 2), ("big", 4, 1)):
        task = RegressionTask()
        cfg = trainer_config(
            tmp_path / name, max_steps=5, batch_size=bs, grad_accum=accum, grad_clip=None
        )
        Trainer(task, XYData(), cfg).fit()
        runs[name] = task.model.state_dict()
    for k in runs["big"]:
        torch.testing.assert_close(runs["accum"][k], runs["big"][k], rtol=1e-5, atol=1e-6)
    start = RegressionTask().model.state_dict()
    assert not torch.allclose(start["weight"], runs["big"]["weight"])


# -- EMA and schedule ------------------------------------------------------------------------------
def test_ema_follows_the_closed_form() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    m[0].weight.data.fill_(1.0)
    ema = EMA(m, decay=0.8)
    s0 = ema.state_dict()["0.weight"].clone()
    m[0].weight.data.fill_(3.0)
    m[1].num_batches_tracked.fill_(7)
    for _ in range(5):
        ema.update()
    # s_k = p + d^k (s_0 - p) for a constant target p
    torch.testing.assert_close(ema.shadow["0.weight"], 3.0 + 0.8**5 * (s0 - 3.0))
    assert int(ema.shadow["1.num_batches_tracked"]) == 7  # counters are copied, not averaged
    with ema.average_parameters():
        torch.testing.assert_close(m[0].weight, ema.shadow["0.weight"])
    assert torch.all(m[0].weight == 3.0)  # swapped back


def test_ema_of_a_module_without_parameters_copies_its_buffers() -> None:
    m = nn.Module()
    m.register_buffer("palette", torch.zeros(4, 3))
    ema = EMA(m, 0.9)
    m.palette.fill_(2.0)
    ema.update()
    assert torch.equal(ema.state_dict()["palette"], m.palette) and ema.num_updates == 1


def test_ema_averages_tied_weights_under_both_names() -> None:
    m = nn.Module()
    m.a = nn.Linear(2, 2, bias=False)
    m.b = nn.Linear(2, 2, bias=False)
    m.b.weight = m.a.weight
    ema = EMA(m, 0.5)
    m.a.weight.data.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["a.weight"], ema.shadow["b.weight"])
    torch.testing.assert_close(ema.shadow["a.weight"], m.a.weight.detach() - 1.0)


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = warmup_cosine(opt, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))  # non-increasing after warmup
    assert math.isclose(lrs[9], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14:] == [pytest.approx(0.1)] * 6
    # The closed form, bit for bit: no recursive drift over the steps.
    kw = dict(warmup_steps=4, decay_steps=14, min_lr_ratio=0.1, schedule="cosine")
    assert lrs == [1.0 * lr_factor(i, **kw) for i in range(20)]


def test_schedule_state_of_the_previous_release_resumes_on_the_same_rates() -> None:
    """0.1.0 saved {"step": last trained step, "base_lrs"} with the optimizer at that rate."""
    kw = dict(warmup_steps=2, decay_steps=10, min_lr_ratio=0.1, schedule="cosine")
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    ref = warmup_cosine(ref_opt, **kw)
    want = []
    for _ in range(12):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = warmup_cosine(opt, **kw)
    opt.param_groups[0]["lr"] = want[4]  # what 0.1.0 left after training step 4
    load_schedule_state(sched, {"step": 4, "base_lrs": [0.5]})
    got = []
    for _ in range(5, 12):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == want[5:]


# -- state files -----------------------------------------------------------------------------------
def test_optimizer_state_round_trips_without_pickle(tmp_path: Path) -> None:
    p = nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.5, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    ckpt.save_state(tmp_path, "opt", opt.state_dict())
    back = ckpt.load_state(tmp_path, "opt")
    want = opt.state_dict()
    assert back["param_groups"] == want["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0]  # int keys come back as ints
    for k, v in want["state"][0].items():
        assert torch.equal(back["state"][0][k], v)
    assert b"pickle" not in (tmp_path / "opt.json").read_bytes()
    with pytest.raises(CheckpointError, match="cannot store object"):
        ckpt.flatten_state({"x": object()})


# -- what a run writes -----------------------------------------------------------------------------
def test_run_writes_metrics_grids_pruned_checkpoints_and_export(tmp_path: Path, latentgen_plugin):
    latentgen_plugin(TinyAEPlugin, name="test-tiny-ae")
    task = tokenizer_task()
    cfg = trainer_config(
        tmp_path,
        max_steps=6,
        log_every=3,
        checkpoint_every=2,
        keep_last=2,
        grid_every=3,
        ema_decay=0.5,
    )
    result = Trainer(task, ImageData(), cfg).fit()
    run = tmp_path / "run"
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert {
            "loss",
            "rec",
            "disc_loss",
            "grad_norm",
            "lr/generator",
            "lr/discriminator",
            "samples_per_s",
        } <= set(r)
        assert math.isfinite(r["loss"])
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["step-3.png", "step-6.png"]
    from PIL import Image

    assert Image.open(run / "grids" / "step-6.png").size == (4 * 8, 2 * 8)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6]
    meta = ckpt.read_trainer_json(run / "checkpoints" / "step-6")
    assert meta["step"] == 6 and meta["spec_hash"] == ckpt.spec_hash(task.describe())
    # The export holds the EMA weights, and loads back through the registry.
    from latentgen.artifact import load_component

    assert result.export == run / "final"
    loaded = load_component(run, "tokenizer")
    for k, v in loaded.state_dict().items():
        assert torch.equal(
            v, load_tensors(run / "checkpoints" / "step-6" / "ema.tokenizer.safetensors")[k]
        )


def test_data_too_small_for_one_step(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one step's global batch of 32"):
        Trainer(
            RegressionTask(), XYData(16), trainer_config(tmp_path, batch_size=16, grad_accum=2)
        ).fit()


def test_unknown_optimizer_name_is_explained(tmp_path: Path) -> None:
    class Wrong(RegressionTask):
        def train_step(self, ctx):
            ctx.backward(self.model.weight.sum(), "generator")

    with pytest.raises(
        SpecError, match=r"unknown optimizer 'generator'; this task has \['model'\]"
    ):
        Trainer(Wrong(), XYData(), trainer_config(tmp_path)).fit()


# -- configs ---------------------------------------------------------------------------------------
def test_trainer_config_validates() -> None:
    ok = TrainerConfig(run_name="a", max_steps=10, batch_size=2, lr=1e-3)
    assert ok.effective_decay_steps == 10 and ok.resume_view()["decay_steps"] == 10
    for bad in (
        {"lr": 0},
        {"batch_size": 0},
        {"betas": (0.9, 1.0)},
        {"run_name": "../x"},
        {"warmup_steps": 20},
        {"ema_decay": 1.0},
        {"typo": 1},
    ):
        with pytest.raises(ValidationError):
            TrainerConfig(**{"run_name": "a", "max_steps": 10, "batch_size": 2, "lr": 1e-3, **bad})
    for name, f in TrainerConfig.model_fields.items():
        assert f.description, name


def test_train_config_files(tmp_path: Path, latentgen_plugin) -> None:
    from latentgen.data.base import ImageDataset

    class RandConfig(ComponentConfig):
        type: Literal["test.rand"] = "test.rand"

    class Rand(ImageDataset):
        Config = RandConfig

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8)}

    class Plugin:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            register(Rand)

    latentgen_plugin(TinyAEPlugin, name="test-tiny-ae")
    latentgen_plugin(Plugin, name="test-rand-data")
    trainer = {"run_name": "r", "max_steps": 3, "batch_size": 1, "lr": 1e-3}
    f = tmp_path / "cfg.yaml"
    import yaml

    f.write_text(
        yaml.safe_dump(
            {
                "tokenizer": {"type": "test.tiny_ae", "codebook_size": 8},
                "data": {"type": "test.rand"},
                "trainer": trainer,
            }
        )
    )
    cfg = load_train_config(f, TokenizerTrainConfig)
    assert cfg.tokenizer_config.codebook_size == 8
    with pytest.raises(SpecError, match="exactly one of `tokenizer`"):
        load_train_config({"data": {"type": "test.rand"}, "trainer": trainer}, TokenizerTrainConfig)
    with pytest.raises(SpecError, match="tokeniser: Extra inputs are not permitted"):
        load_train_config(
            {
                "data": {"type": "test.rand"},
                "trainer": trainer,
                "tokenizer": {"type": "test.tiny_ae"},
                "tokeniser": 1,
            },
            TokenizerTrainConfig,
        )
    assert "tokenizer_path" in PriorTrainConfig.model_fields


def test_numpy_and_python_rng_are_restored() -> None:
    import random

    state = ckpt.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.restore_rng(json.loads(json.dumps(state)))
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# -- the tokenizer training protocol ---------------------------------------------------------------
class FrozenPatchesConfig(ComponentConfig):
    type: Literal["test.frozen_patches"] = "test.frozen_patches"


class FrozenPatches(Tokenizer):
    """A tokenizer with weights but no training objective (not a TrainableTokenizer)."""

    Config = FrozenPatchesConfig
    vocab_size = property(lambda self: 4)
    downsample = property(lambda self: 2)
    in_channels = property(lambda self: 3)

    def __init__(self, config: FrozenPatchesConfig) -> None:
        super().__init__(config)
        self.proj = nn.Conv2d(3, 4, 2, stride=2)

    def encode(self, images: Tensor) -> Tensor:
        return self.proj(images).argmax(1)  # [B, h, w]

    def decode(self, codes: Tensor) -> Tensor:
        return F.interpolate(codes[:, None].float().expand(-1, 3, -1, -1), scale_factor=2) / 4


class NoCritic(TinyAE):
    """Claims a discriminator but keeps the base discriminator_loss."""

    discriminator_loss = TrainableTokenizer.discriminator_loss


def test_tokenizer_task_refuses_a_tokenizer_without_the_training_protocol() -> None:
    with pytest.raises(SpecError) as err:
        TokenizerTask(FrozenPatches(FrozenPatchesConfig()))
    msg = str(err.value)
    assert "FrozenPatches" in msg and "test.frozen_patches" in msg
    assert "TrainableTokenizer" in msg and "generator_loss(images, step)" in msg
    with pytest.raises(
        SpecError, match=r"NoCritic\.has_discriminator is True .*discriminator_loss"
    ):
        TokenizerTask(NoCritic(TinyAEConfig()))
    # Without a discriminator the base discriminator_loss is fine: one optimizer, no critic.
    task = TokenizerTask(NoCritic(TinyAEConfig(adversarial=False)))
    assert list(task.optimizer_parameters()) == ["generator"]


class VectorLossConfig(TinyAEConfig):
    type: Literal["test.vector_loss"] = "test.vector_loss"  # type: ignore[assignment]


class VectorLoss(TinyAE):
    """Returns one loss per sample instead of a scalar: the contract must catch it."""

    Config = VectorLossConfig

    def generator_loss(self, images: Tensor, step: int) -> tuple[Tensor, dict[str, float], Any]:
        loss, logs, out = super().generator_loss(images, step)
        return loss.expand(images.shape[0]), logs, out


def test_tokenizer_contract_checks_the_training_protocol(latentgen_plugin) -> None:
    from latentgen.testing import TokenizerContract

    class Plugin:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register(TinyAE)
            register(VectorLoss)

    latentgen_plugin(Plugin(), name="protocol-check")

    class Good(TokenizerContract):
        config: Any = {"type": "test.tiny_ae"}
        image_size = 8

    class Bad(TokenizerContract):
        config: Any = {"type": "test.vector_loss"}
        image_size = 8

    Good().test_training_protocol()
    with pytest.raises(AssertionError):
        Bad().test_training_protocol()


def test_cli_names_what_an_untrainable_tokenizer_lacks(tmp_path: Path, latentgen_plugin) -> None:
    import yaml
    from click.testing import CliRunner

    from latentgen.cli import main

    class Plugin:
        @staticmethod
        @hookimpl
        def register_tokenizers(register):
            register(FrozenPatches)

    latentgen_plugin(Plugin(), name="frozen-patches")
    cfg = {
        "tokenizer": {"type": "test.frozen_patches"},
        "data": {"type": "shapes", "size": 8, "image_size": 16},
        "trainer": {
            "run_name": "t",
            "runs_dir": str(tmp_path),
            "max_steps": 1,
            "batch_size": 2,
            "lr": 1e-3,
            "progress": "off",
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "tokenizer", "--config", str(tmp_path / "cfg.yaml")])
    assert res.exit_code == 1, res.output
    assert "cannot be trained by `latentgen train tokenizer`" in res.output
    assert "TrainableTokenizer" in res.output
    assert not (tmp_path / "t" / "checkpoints").exists()


# A VQ-VAE of 16x16 images to 8x8 codes of 16, for the command-line tests below.
_TINY_VQVAE: dict[str, Any] = {
    "type": "vqvae",
    "resolution": 16,
    "ch": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "z_channels": 8,
    "norm_groups": 4,
    "quantizer": {"type": "vq", "codebook_size": 16, "dim": 8},
}


# -- subnormal floats ------------------------------------------------------------------------------
def _flushes_here() -> bool:
    """Whether this thread's arithmetic treats a subnormal float as zero."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


def test_trainer_applies_flush_denormal(tmp_path: Path) -> None:
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    try:
        Trainer(tokenizer_task(), ImageData(), trainer_config(tmp_path, flush_denormal=True))
        assert _flushes_here()
        Trainer(tokenizer_task(), ImageData(), trainer_config(tmp_path, flush_denormal=False))
        assert not _flushes_here()
    finally:
        torch.set_flush_denormal(False)


_FLUSH_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(2)
# subnormals made by numpy before torch computes anything (made later by torch, with the flag
# on, they would be zeros already)
x = np.full((1 << 22,), 1e-39, dtype=np.float32)
from latentgen.cli import main
main.main(["train", "prior", "--config", sys.argv[1]], standalone_mode=False)
y = torch.from_numpy(x) * 1.0  # one multiply, split over both threads
print("nonzero", int((y != 0).sum()))
"""


@pytest.mark.parametrize("flush", [True, False])
def test_train_cli_flushes_denormals_on_every_thread(tmp_path: Path, flush: bool) -> None:
    # torch sets the flag per thread, and its worker threads inherit it only when they start.
    # `latentgen train prior` encodes its data (threads start there) before it builds its
    # trainer, so it must set the flag first, or the worker thread's half of this multiply
    # still produces subnormals.
    import subprocess
    import sys

    import yaml
    from click.testing import CliRunner

    from latentgen.cli import main

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    tokenizer = dict(_TINY_VQVAE)
    data = {"type": "shapes", "size": 64, "image_size": 16}
    trainer = {
        "runs_dir": str(tmp_path),
        "max_steps": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "grid_every": None,
        "progress": "off",
        "device": "cpu",
    }
    tok = {"tokenizer": tokenizer, "data": data, "trainer": {**trainer, "run_name": "tok"}}
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(tok))
    res = CliRunner().invoke(main, ["train", "tokenizer", "--config", str(tmp_path / "tok.yaml")])
    assert res.exit_code == 0, res.output
    spec = {
        "tokenizer": tokenizer,
        "prior": {
            "type": "transformer",
            "vocab_size": 16,
            "block_size": 64,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
        },
    }
    prior_trainer = {**trainer, "run_name": "prior", "flush_denormal": flush}
    prior = {
        "spec": spec,
        "tokenizer_path": str(tmp_path / "tok"),
        "data": data,
        "trainer": prior_trainer,
    }
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(prior))
    res2 = subprocess.run(
        [sys.executable, "-c", _FLUSH_SCRIPT, str(tmp_path / "prior.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert (tmp_path / "prior" / "final").exists()
    assert int(res2.stdout.split("nonzero")[-1]) == (0 if flush else 1 << 22)


# -- the command line, end to end with the built-in components ------------------------------------
def test_cli_trains_both_stages_and_evaluates(tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from latentgen.cli import main

    tokenizer = dict(_TINY_VQVAE)
    data = {"type": "shapes", "size": 16, "image_size": 16}
    trainer = {
        "runs_dir": str(tmp_path / "runs"),
        "max_steps": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "checkpoint_every": 2,
        "grid_every": 2,
        "progress": "off",
    }
    (tmp_path / "tok.yaml").write_text(
        yaml.safe_dump(
            {"tokenizer": tokenizer, "data": data, "trainer": {**trainer, "run_name": "tok"}}
        )
    )
    spec = {
        "tokenizer": tokenizer,
        "prior": {
            "type": "transformer",
            "vocab_size": 16,
            "block_size": 65,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
            "conditions": {"label": {"vocab_size": 6}},
        },
        "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
    }
    (tmp_path / "prior.yaml").write_text(
        yaml.safe_dump(
            {
                "spec": spec,
                "tokenizer_path": str(tmp_path / "runs" / "tok"),
                "data": data,
                "trainer": {**trainer, "run_name": "prior"},
            }
        )
    )
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({**data, "size": 4}))
    run = CliRunner().invoke

    res = run(main, ["train", "tokenizer", "--config", str(tmp_path / "tok.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "tok" / "final" / "component.json").is_file()
    res = run(
        main,
        [
            "eval",
            "tokenizer",
            str(tmp_path / "runs" / "tok"),
            "--data",
            str(tmp_path / "data.yaml"),
            "--no-lpips",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    assert scores["images"] == 4 and scores["codebook_size"] == 16
    assert -1 <= scores["ssim"] <= 1 and math.isfinite(scores["psnr_db"])
    assert 0 < scores["codebook_usage"] <= 1 and 1 <= scores["perplexity"] <= 16

    res = run(main, ["train", "prior", "--config", str(tmp_path / "prior.yaml")])
    assert res.exit_code == 0, res.output
    final = tmp_path / "runs" / "prior" / "final"
    assert (final / "pipeline.json").is_file()
    assert (tmp_path / "runs" / "prior" / "code_cache" / "codes.npy").is_file()
    res = run(main, ["eval", "prior", str(final), "--data", str(tmp_path / "data.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    nll = json.loads(res.output)
    assert math.isclose(nll["bits_per_code"], nll["nll_nats_per_code"] / math.log(2))
    assert 0 < nll["nll_nats_per_code"] < 2 * math.log(16)  # near log K after 2 steps

    # A second run under the same name must not overwrite the first.
    res = run(main, ["train", "prior", "--config", str(tmp_path / "prior.yaml")])
    assert res.exit_code == 1 and "already has checkpoints" in res.output
