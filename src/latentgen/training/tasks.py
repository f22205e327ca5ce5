"""What the ``Trainer`` trains: a ``Task`` owns the models, their optimizers and one step's losses.

The trainer owns everything generic (data order, devices, AMP, accumulation, gradient
all-reduce, clipping, NaN guard, EMA, checkpoints, logging). A task's ``train_step(ctx)`` runs
the forward passes for ``ctx.micro_batches`` and calls ``ctx.backward(loss, optimizer)`` and
``ctx.update(optimizer)``; one step may update several optimizers in turn, which is how
``TokenizerTask`` alternates VQGAN's generator and discriminator (arXiv 2012.09841, sec. 3.2):

    def train_step(self, ctx):
        for batch in ctx.micro_batches:
            with ctx.autocast():
                loss = self.model.loss(batch["x"])
            ctx.backward(loss, "model")
        ctx.update("model")
        return {"loss": loss}

Tokenizers that train adversarially implement this protocol (``latentgen.tokenizers.vqgan``)::

    generator_loss(images, step) -> (loss, logs, TokenizerOutput)
    discriminator_loss(images, recon, step) -> (loss, logs)
    has_discriminator: bool
    generator_parameters() / discriminator_parameters()

A tokenizer without it is trained on ``mse(recon, images) + quant_loss``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentgen.checkpoint import (
    atomic_directory,
    atomic_write_json,
    load_module,
    read_json,
    save_tensors,
    sha256_file,
)
from latentgen.errors import CheckpointError, SpecError
from latentgen.priors.base import Prior

if TYPE_CHECKING:
    from PIL.Image import Image

    from latentgen.conditioners.base import Conditioner, Conditioning
    from latentgen.specs import SamplerConfig
    from latentgen.tokenizers.base import Tokenizer
    from latentgen.training.config import TrainerConfig

__all__ = [
    "TOKENIZER_FILE",
    "PriorTask",
    "StepContext",
    "Task",
    "TokenizerTask",
    "WarmupCosine",
    "decay_groups",
    "image_grid",
    "load_tokenizer",
    "save_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FORMAT = "latentgen.tokenizer"


class StepContext(Protocol):
    """The helpers a task's ``train_step`` gets from the trainer for one optimizer step."""

    step: int
    #: This rank's micro-batches for this step (``grad_accum`` of them), already on the device.
    micro_batches: list[Any]
    device: torch.device

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed-precision context for forward passes (a no-op when AMP is off)."""
        ...

    def backward(self, loss: Tensor, optimizer: str) -> None:
        """Backpropagate ``loss / grad_accum`` into the parameters of ``optimizer`` only."""
        ...

    def update(self, optimizer: str) -> float:
        """All-reduce, check, clip and apply ``optimizer``'s gradients; return their norm.

        A non-finite loss or gradient on any rank skips the rest of the step on every rank.
        """
        ...


# -- learning-rate schedule ------------------------------------------------------------------------
class WarmupCosine:
    """Linear warmup then cosine decay to ``min_lr_ratio`` (or constant), set per step.

    ``set_step(s)`` writes ``lr = base_lr * factor(s)`` into every param group; the state is the
    step and the base rates, so it is a pure function of the step and resumes exactly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        decay_steps: int,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
    ) -> None:
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio
        self.schedule = schedule
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step = 0

    def factor(self, step: int) -> float:
        """Multiplier of the base rate at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    def set_step(self, step: int) -> None:
        """Set the learning rates for ``step``."""
        self.step = step
        f = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups: decay on weights with 2+ dims, none on biases, norms and scalars."""
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    rest = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


# -- the task interface ----------------------------------------------------------------------------
class Task(ABC):
    """Models + optimizers + one training step. Subclass it to train something new."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Named modules whose weights are checkpointed (``model.<name>.safetensors``)."""

    @abstractmethod
    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each named optimizer (one name per optimizer, e.g. 'generator')."""

    @abstractmethod
    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        """One optimizer step over ``ctx.micro_batches``; returns scalars to log."""

    def describe(self) -> dict[str, Any]:
        """JSON description of what is trained (model configs); resuming requires it to match."""
        return {}

    def ema_modules(self) -> list[str]:
        """Names (from ``modules()``) whose weights get an EMA when ``ema_decay`` is set."""
        return list(self.modules())

    def learning_rate(self, optimizer: str, config: TrainerConfig) -> float:
        """Peak learning rate of ``optimizer`` (default: ``config.lr``)."""
        return config.lr

    def configure_optimizers(self, config: TrainerConfig) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per entry of ``optimizer_parameters`` (override for something else)."""
        out: dict[str, torch.optim.Optimizer] = {}
        for name, params in self.optimizer_parameters().items():
            groups = decay_groups(params, config.weight_decay)
            out[name] = torch.optim.AdamW(
                groups,
                lr=self.learning_rate(name, config),
                betas=(config.betas[0], config.betas[1]),
            )
        return out

    def configure_schedulers(
        self, optimizers: Mapping[str, torch.optim.Optimizer], config: TrainerConfig
    ) -> dict[str, WarmupCosine]:
        """One warmup + cosine schedule per optimizer."""
        return {
            name: WarmupCosine(
                opt,
                config.warmup_steps,
                config.effective_decay_steps,
                config.min_lr_ratio,
                config.lr_schedule,
            )
            for name, opt in optimizers.items()
        }

    def to(self, device: torch.device) -> Task:
        """Move every module to ``device``."""
        for m in self.modules().values():
            m.to(device)
        return self

    def make_grid(self, step: int) -> Image | None:
        """A PNG-able picture of progress (reconstructions, samples), or None."""
        return None

    def export(self, path: Path) -> Path | None:
        """Write the trained model(s) for use outside training; None when there is nothing."""
        return None


def image_grid(rows: list[Tensor]) -> Image:
    """Rows of image batches ``[n, C, H, W]`` in [-1, 1] -> one PIL image (a row per batch)."""
    from PIL import Image as PILImage

    from latentgen.data.base import to_pil

    rows = [r.detach().float().cpu() for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[2], rows[0].shape[3]
    canvas = PILImage.new("RGB", (n * w, len(rows) * h))
    for i, row in enumerate(rows):
        for j, img in enumerate(to_pil(row)):
            canvas.paste(img.convert("RGB"), (j * w, i * h))
    return canvas


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# -- stage 1 ---------------------------------------------------------------------------------------
class TokenizerTask(Task):
    """Trains a tokenizer on image batches (``batch["image"]``, ``[B, C, H, W]`` in [-1, 1]).

    With ``has_discriminator`` each step first updates the generator (encoder, quantizer,
    decoder) on ``generator_loss`` and then the discriminator on ``discriminator_loss`` with the
    step's reconstructions detached, as in Taming Transformers (arXiv 2012.09841).

    Args:
        tokenizer: the tokenizer to train.
        grid_images: ``[n, C, H, W]`` images whose reconstructions ``make_grid`` draws.
        disc_lr: discriminator learning rate (None: the trainer's ``lr``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        grid_images: Tensor | None = None,
        disc_lr: float | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.grid_images = grid_images
        self.disc_lr = disc_lr
        self.adversarial = bool(getattr(tokenizer, "has_discriminator", False))
        self.protocol = callable(getattr(tokenizer, "generator_loss", None))
        if self.adversarial and not callable(getattr(tokenizer, "discriminator_loss", None)):
            raise SpecError(
                f"{type(tokenizer).__name__}.has_discriminator is True but it has no "
                "discriminator_loss(images, recon, step); implement it or set the flag False."
            )

    def modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        tok = self.tokenizer
        if not self.protocol:
            return {"generator": list(tok.parameters())}
        params = {"generator": list(tok.generator_parameters())}  # type: ignore[operator]
        if self.adversarial:
            params["discriminator"] = list(tok.discriminator_parameters())  # type: ignore[operator]
        return params

    def learning_rate(self, optimizer: str, config: TrainerConfig) -> float:
        if optimizer == "discriminator" and self.disc_lr is not None:
            return self.disc_lr
        return config.lr

    def describe(self) -> dict[str, Any]:
        return {"task": "tokenizer", "tokenizer": self.tokenizer.config.model_dump(mode="json")}

    def _generator_loss(self, images: Tensor, step: int) -> tuple[Tensor, dict[str, Any], Any]:
        if self.protocol:
            return self.tokenizer.generator_loss(images, step)  # type: ignore[operator]
        out = self.tokenizer(images)
        rec = F.mse_loss(out.recon.float(), images.float())
        logs = {"rec_loss": rec.detach(), "quant_loss": out.quant_loss.detach(), **out.stats}
        return rec + out.quant_loss, logs, out

    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        logs: dict[str, Any] = {}
        n = len(ctx.micro_batches)
        recons = []
        for batch in ctx.micro_batches:
            with ctx.autocast():
                loss, glogs, out = self._generator_loss(batch["image"], ctx.step)
            ctx.backward(loss, "generator")
            recons.append(out.recon.detach())
            _accumulate(logs, {"loss": loss.detach(), **glogs}, n)
        logs["grad_norm"] = ctx.update("generator")
        if self.adversarial:
            dlogs: dict[str, Any] = {}
            for batch, recon in zip(ctx.micro_batches, recons):
                with ctx.autocast():
                    dloss, d = self.tokenizer.discriminator_loss(  # type: ignore[operator]
                        batch["image"], recon, ctx.step
                    )
                ctx.backward(dloss, "discriminator")
                _accumulate(dlogs, {"disc_loss": dloss.detach(), **d}, n)
            dlogs["disc_grad_norm"] = ctx.update("discriminator")
            logs.update(dlogs)
        return logs

    @torch.no_grad()
    def make_grid(self, step: int) -> Image | None:
        if self.grid_images is None:
            return None
        tok = self.tokenizer
        was_training = tok.training
        tok.eval()
        try:
            images = self.grid_images.to(_device_of(tok))
            recon = tok.decode(tok.encode(images))  # [n, C, H, W]
        finally:
            tok.train(was_training)
        return image_grid([images, recon.clamp(-1, 1)])

    def export(self, path: Path) -> Path:
        return save_tokenizer(self.tokenizer, path)


# -- stage 2 ---------------------------------------------------------------------------------------
class PriorTask(Task):
    """Trains a prior on cached code grids (``batch["codes"]``, ``[B, h, w]``) and conditions.

    Each conditioner ``name`` reads its raw data from ``batch[condition_keys[name]]`` (default
    ``batch[name]``), as stored by ``build_code_cache``.

    Args:
        prior: the prior to train.
        conditioners: the pipeline's conditioners by name (not trained here).
        tokenizer: decodes samples for ``make_grid`` and goes into the exported pipeline.
        condition_keys: dataset key of each condition (default: its name).
        cond_drop_prob: chance of replacing each condition by the prior's null embedding, for
            classifier-free guidance (arXiv 2207.12598).
        grid_batch: a batch from the code cache; ``make_grid`` decodes its codes in one row and
            samples with its conditions in the next.
        data_fingerprint: the code cache's tokenizer fingerprint, checked on resume.
        sampler: default sampler of the exported pipeline (and of the sample grids).
    """

    def __init__(
        self,
        prior: Prior,
        conditioners: Mapping[str, Conditioner] | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        condition_keys: Mapping[str, str] | None = None,
        cond_drop_prob: float = 0.0,
        grid_batch: Mapping[str, Any] | None = None,
        data_fingerprint: str | None = None,
        sampler: SamplerConfig | None = None,
    ) -> None:
        if not 0.0 <= cond_drop_prob < 1.0:
            raise SpecError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}.")
        self.prior = prior
        self.conditioners = dict(conditioners or {})
        self.tokenizer = tokenizer
        keys = dict(condition_keys or {})
        self.condition_keys = {n: keys.get(n, n) for n in self.conditioners}
        self.cond_drop_prob = cond_drop_prob
        self.grid_batch = grid_batch
        self.data_fingerprint = data_fingerprint
        self.sampler = sampler

    def modules(self) -> dict[str, nn.Module]:
        return {"prior": self.prior}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"prior": list(self.prior.parameters())}

    def describe(self) -> dict[str, Any]:
        return {
            "task": "prior",
            "prior": self.prior.config.model_dump(mode="json"),
            "conditioners": {
                n: c.config.model_dump(mode="json") for n, c in self.conditioners.items()
            },
            "condition_keys": self.condition_keys,
            "cond_drop_prob": self.cond_drop_prob,
            "data_fingerprint": self.data_fingerprint,
        }

    def to(self, device: torch.device) -> PriorTask:
        super().to(device)
        for c in self.conditioners.values():
            c.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        return self

    def conditions(
        self, batch: Mapping[str, Any], drop_prob: float = 0.0
    ) -> dict[str, Conditioning]:
        """Encode the batch's raw conditions; with ``drop_prob`` mark random rows as dropped."""
        device = _device_of(self.prior)
        conds = {}
        for name, cond in self.conditioners.items():
            key = self.condition_keys[name]
            if key not in batch:
                raise SpecError(
                    f"conditioner '{name}' reads batch key '{key}', but the batch has "
                    f"{sorted(batch)}. Rebuild the code cache with that key, or map it with "
                    f"condition_keys: {{{name}: <key>}}."
                )
            c = cond.encode(batch[key]).to(device)
            if drop_prob > 0:
                # The global RNG is checkpointed, so the dropped rows replay exactly on resume.
                drop = torch.rand(c.batch_size, device=device) < drop_prob  # [B]
                c = c.with_drop(drop if c.drop is None else (c.drop | drop))
            conds[name] = c
        return conds

    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        logs: dict[str, Any] = {}
        n = len(ctx.micro_batches)
        for batch in ctx.micro_batches:
            conds = self.conditions(batch, self.cond_drop_prob)
            with ctx.autocast():
                loss = self.prior.loss(batch["codes"], conds)
            ctx.backward(loss, "prior")
            _accumulate(logs, {"loss": loss.detach()}, n)
        logs["grad_norm"] = ctx.update("prior")
        logs["bits_per_dim"] = Prior.bits_per_dim(float(logs["loss"]))
        return logs

    @torch.no_grad()
    def make_grid(self, step: int) -> Image | None:
        if self.tokenizer is None or self.grid_batch is None:
            return None
        device = _device_of(self.prior)
        batch = {
            k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.grid_batch.items()
        }
        codes = batch["codes"]  # [n, h, w]
        was_training = self.prior.training
        self.prior.eval()
        try:
            conds = self.conditions(batch)
            kwargs: dict[str, Any] = {
                "grid": (int(codes.shape[1]), int(codes.shape[2])),
                "sampler": self.sampler,
            }
            if not conds:
                kwargs["num_samples"] = int(codes.shape[0])
            samples = self.prior.sample(conds or None, **kwargs)  # [n, h, w]
        finally:
            self.prior.train(was_training)
        return image_grid([self.tokenizer.decode(codes), self.tokenizer.decode(samples)])

    def export(self, path: Path) -> Path | None:
        if self.tokenizer is None:
            return None
        from latentgen.pipeline import Pipeline

        pipe = Pipeline(self.tokenizer, self.prior, self.conditioners, self.sampler)
        return pipe.save_pretrained(path)


def _accumulate(logs: dict[str, Any], new: Mapping[str, Any], n: int) -> None:
    # Mean over micro-batches; tensors stay on the device until the trainer logs them.
    for k, v in new.items():
        if isinstance(v, Tensor):
            v = v.detach().float()
        elif not isinstance(v, int | float):
            continue
        logs[k] = logs.get(k, 0.0) + v / n


# -- a trained tokenizer on disk -------------------------------------------------------------------
def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` (config, sha256) + ``tokenizer.safetensors``, atomically.

    This is stage 1's product: ``latentgen train prior`` builds its pipeline from it.
    """
    from latentgen import __version__
    from latentgen.data.code_cache import tokenizer_fingerprint

    path = Path(path)
    with atomic_directory(path) as tmp:
        save_tensors(
            tmp / "tokenizer.safetensors",
            tokenizer.state_dict(),
            {"latentgen.component": "tokenizer", "latentgen.type": tokenizer.config.type},
        )
        atomic_write_json(
            tmp / TOKENIZER_FILE,
            {
                "format": TOKENIZER_FORMAT,
                "format_version": 1,
                "latentgen_version": __version__,
                "config": tokenizer.config.model_dump(mode="json"),
                "file": "tokenizer.safetensors",
                "sha256": sha256_file(tmp / "tokenizer.safetensors"),
                "fingerprint": tokenizer_fingerprint(tokenizer),
            },
        )
    return path


def _locate_tokenizer(path: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """``("pipeline" | "tokenizer", dir, its JSON)`` for a pipeline, tokenizer or run dir."""
    path = Path(path)
    if (path / "pipeline.json").is_file():
        from latentgen.pipeline import Pipeline

        return "pipeline", path, Pipeline.read_manifest(path)
    if (path / TOKENIZER_FILE).is_file():
        meta = read_json(path / TOKENIZER_FILE, what="tokenizer file")
        if not isinstance(meta, dict) or meta.get("format") != TOKENIZER_FORMAT:
            raise CheckpointError(f"{path / TOKENIZER_FILE} is not a latentgen tokenizer file.")
        return "tokenizer", path, meta
    if (path / "final").is_dir():
        return _locate_tokenizer(path / "final")
    raise CheckpointError(
        f"{path} holds no trained tokenizer: expected pipeline.json, {TOKENIZER_FILE}, or a run "
        "dir with final/. Train one with `latentgen train tokenizer --config cfg.yaml`."
    )


def tokenizer_config_at(path: str | Path) -> dict[str, Any]:
    """The config (as JSON) of the trained tokenizer at ``path``, without loading its weights."""
    kind, _, meta = _locate_tokenizer(path)
    return dict(meta["spec"]["tokenizer"] if kind == "pipeline" else meta["config"])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a trained tokenizer from a pipeline dir, a ``save_tokenizer`` dir or a run dir."""
    from latentgen import registry
    from latentgen.checkpoint import load_tensors

    kind, path, meta = _locate_tokenizer(path)
    if kind == "pipeline":
        from latentgen.pipeline import Pipeline

        return Pipeline.from_pretrained(path).tokenizer
    weights = path / str(meta.get("file", "tokenizer.safetensors"))
    if weights.is_file() and meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(
            f"{weights} does not match the sha256 in {path / TOKENIZER_FILE}; the file was "
            "changed or damaged. Export the tokenizer again."
        )
    tok: Tokenizer = registry.build("tokenizer", meta["config"])
    load_module(tok, load_tensors(weights, what=str(weights)), what=str(weights))
    return tok
