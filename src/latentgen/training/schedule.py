"""The learning-rate schedule: linear warmup, then cosine decay to a floor (or constant).

    scheduler = warmup_cosine(optimizer, warmup_steps=500, decay_steps=20_000)
    # lr of step s = base_lr * lr_factor(s, ...); scheduler.step() after every training step

A ``torch.optim.lr_scheduler.LambdaLR`` over the closed form ``lr_factor``: the rate of step
``s`` is a pure function of ``s``, so a resumed run (``last_epoch`` is checkpointed) continues on
exactly the same rates. ``LinearLR`` + ``CosineAnnealingLR`` in a ``SequentialLR`` would update
the rate recursively, step by step, and drift from the closed form in the last bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = ["load_schedule_state", "lr_factor", "warmup_cosine"]


def lr_factor(
    step: int, *, warmup_steps: int, decay_steps: int, min_lr_ratio: float, schedule: str
) -> float:
    """Multiplier of the base rate at ``step`` (0-based): warmup, then cosine or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    schedule: str = "cosine",
) -> LambdaLR:
    """A ``LambdaLR`` giving step ``s`` the rate ``base_lr * lr_factor(s)``."""
    # A partial, not a lambda object with attributes: LambdaLR would store those attributes in
    # its state dict and a resume would bring back the old schedule options.
    factor = partial(
        lr_factor,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        min_lr_ratio=min_lr_ratio,
        schedule=schedule,
    )
    return LambdaLR(optimizer, factor)


def load_schedule_state(
    scheduler: LRScheduler, state: Mapping[str, Any], base_lrs: list[float] | None = None
) -> None:
    """``scheduler.load_state_dict``, also reading the state latentgen 0.1.0 wrote.

    ``base_lrs`` replaces the saved peak rates (a resume that changes ``lr``). The optimizer's
    current rates are then derived again from the closed form, so a resume with other schedule
    options uses them from its first step. 0.1.0 stored ``{"step": s, "base_lrs": [...]}``, with
    ``s`` the last step trained; ``LambdaLR`` is one ``step()`` further.
    """
    if not isinstance(scheduler, LambdaLR):
        scheduler.load_state_dict(dict(state))
        return
    if "last_epoch" not in state:
        state = {
            **scheduler.state_dict(),
            "base_lrs": [float(x) for x in state["base_lrs"]],
            "last_epoch": int(state["step"]) + 1,
        }
    scheduler.load_state_dict(dict(state))
    if base_lrs is not None:
        scheduler.base_lrs = list(base_lrs)
    step = scheduler.last_epoch
    # The expression LambdaLR.get_lr uses, so an unchanged run resumes on identical rates.
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lrs):
        group["lr"], group["initial_lr"] = lr, base
    scheduler._last_lr = lrs  # what get_last_lr() reports; LambdaLR has no setter for it
