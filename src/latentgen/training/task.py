"""The ``Task`` interface: what the ``Trainer`` trains (models, optimizers, one step's losses).

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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from latentgen.training.optim import decay_groups
from latentgen.training.schedule import warmup_cosine

if TYPE_CHECKING:
    from PIL.Image import Image

    from latentgen.training.config import TrainerConfig

__all__ = ["StepContext", "Task", "mean_over_micro_batches", "module_device"]


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

    def module(self, optimizer: str) -> nn.Module:
        """What to call for this micro-batch's forward of ``Task.ddp_modules()[optimizer]``.

        Its ``DistributedDataParallel`` wrapper in a multi-process run (gradients are averaged
        during the backward of the last micro-batch), the module itself in one process.
        """
        ...


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

    def ddp_modules(self) -> dict[str, nn.Module]:
        """Modules to run under ``DistributedDataParallel``, keyed by their optimizer's name.

        Each one's ``forward`` computes the loss (DDP hooks into forward) and its trainable
        parameters are exactly that optimizer's; ``train_step`` calls it through
        ``ctx.module(name)``. The gradients of every other optimizer are averaged over ranks by a
        bucketed all-reduce in ``ctx.update``. Default: none.
        """
        return {}

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
    ) -> dict[str, LRScheduler]:
        """One warmup + cosine schedule per optimizer, stepped once after every training step."""
        return {
            name: warmup_cosine(
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


def mean_over_micro_batches(logs: dict[str, Any], new: Mapping[str, Any], n: int) -> None:
    """Add ``new / n`` into ``logs`` per key; non-numbers are dropped.

    Tensors stay on the device until the trainer logs them (no sync per micro-batch).
    """
    for k, v in new.items():
        if isinstance(v, Tensor):
            v = v.detach().float()
        elif not isinstance(v, int | float):
            continue
        logs[k] = logs.get(k, 0.0) + v / n


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for an empty module."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
