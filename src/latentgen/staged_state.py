"""State that a training forward changes outside the optimizer, applied only when the step counts.

Some modules learn in their forward pass rather than through gradients: an EMA codebook moves
its sums, k-means initialises a codebook from the first batch, dead-code counters tick,
BatchNorm tracks running statistics, ActNorm initialises itself. If such a forward sees a batch
whose loss or gradient turns out non-finite, the trainer skips the optimizer step, but the state
would already be poisoned (one NaN batch through an EMA codebook makes every code NaN).

``StagedState`` makes those updates two-phase. A module calls ``self.stage(name, value)``
instead of writing ``self.<name>`` in place, and reads its state with ``self.staged(name)``
(raw values) or ``self.current(name)`` (for the forward graph; a parameter keeps its gradient).
Outside the trainer (``staging`` off, the default) ``stage`` writes at once and a module behaves
as if written plainly. While ``Trainer.fit`` runs, staging is on: the values wait in memory, a
later micro-batch of the same step reads them (so gradient accumulation sees what it would see
without staging), and the trainer calls ``commit_state()`` once every update of the step has
passed the NaN guard, or ``discard_state()`` when it skips the step. Modules whose state
changes inside a library call (BatchNorm) ``remember`` the old values instead and get them back
on discard.

Why this design: it costs no host sync (the guard's decision is already on the host) and no copy
of the model's state per step: only the tensors a forward actually changes are held, and most
of them (EMA sums, new codebooks) are fresh tensors the update computes anyway; commit is one
device copy of each. The alternatives were worse: snapshotting all buffers before every step
copies every codebook on every step, and masking updates with ``torch.where(finite, new, old)``
only catches non-finite *inputs* of the module, not a step the guard skips for a non-finite
loss or gradient elsewhere, on another rank, or in another optimizer's update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StagedState", "commit_all", "discard_all", "set_staging", "staged_modules"]


class StagedState:
    """Mixin for an ``nn.Module`` whose training forward updates state: stage, then commit.

    Subclasses call ``stage``/``remember`` in training-mode code paths only; evaluation
    forwards keep writing directly (they are not part of a training step).
    """

    _staging: bool = False

    def _staged_store(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # Created lazily so subclasses need not call a mixin __init__ (nn.Module's order rules).
        store = self.__dict__.get("_staged_values")
        if store is None:
            store = ({}, {})
            self.__dict__["_staged_values"] = store
        return store

    @property
    def staging(self) -> bool:
        """Whether updates wait for ``commit_state`` (True while the trainer runs)."""
        return self._staging

    def set_staging(self, on: bool) -> None:
        """Turn staging on or off; turning it off commits what is pending."""
        if not on:
            self.commit_state()
        self._staging = bool(on)

    def staged(self, name: str) -> Tensor:
        """The value of state ``name`` as of the last ``stage`` (raw, no gradient)."""
        pending, _ = self._staged_store()
        if name in pending:
            return pending[name]
        value: Tensor = getattr(self, name)
        return value.detach()

    def current(self, name: str) -> Tensor:
        """Like ``staged``, for use in the forward graph: a parameter keeps its gradient."""
        value: Tensor = getattr(self, name)
        pending, _ = self._staged_store()
        if name not in pending:
            return value
        new = pending[name]
        if isinstance(value, nn.Parameter) and value.requires_grad:
            # The value of `new`, exactly (adding an exact zero), with the gradient of `value`.
            return new + (value - value.detach())
        return new

    @torch.no_grad()
    def stage(self, name: str, value: Tensor) -> None:
        """Set state ``name`` to ``value``: now without staging, at ``commit_state`` with it."""
        target: Tensor = getattr(self, name)
        if not self._staging:
            target.data.copy_(value)
            return
        pending, _ = self._staged_store()
        # The committed dtype, so a later micro-batch reads what an unstaged run would read.
        pending[name] = value.detach().to(dtype=target.dtype, device=target.device)

    @torch.no_grad()
    def remember(self, *names: str) -> None:
        """Keep a copy of each named tensor before an in-place change made elsewhere."""
        if not self._staging:
            return
        _, saved = self._staged_store()
        for name in names:
            if name not in saved:
                saved[name] = getattr(self, name).detach().clone()

    @torch.no_grad()
    def commit_state(self) -> None:
        """Write the staged values into the module's tensors (one device copy each)."""
        pending, saved = self._staged_store()
        for name, value in pending.items():
            getattr(self, name).data.copy_(value)
        pending.clear()
        saved.clear()

    @torch.no_grad()
    def discard_state(self) -> None:
        """Forget the staged values and restore remembered ones: the step never happened."""
        pending, saved = self._staged_store()
        for name, value in saved.items():
            getattr(self, name).data.copy_(value)
        pending.clear()
        saved.clear()


def staged_modules(*roots: nn.Module) -> list[StagedState]:
    """Every ``StagedState`` submodule of ``roots`` (each once)."""
    seen: dict[int, StagedState] = {}
    for root in roots:
        for m in root.modules():
            if isinstance(m, StagedState):
                seen.setdefault(id(m), m)
    return list(seen.values())


def set_staging(modules: list[StagedState], on: bool) -> None:
    """Turn staging on or off for each module (off commits what is pending)."""
    for m in modules:
        m.set_staging(on)


def commit_all(modules: list[StagedState]) -> None:
    """Commit each module's staged state (the step passed the NaN guard)."""
    for m in modules:
        m.commit_state()


def discard_all(modules: list[StagedState]) -> None:
    """Discard each module's staged state (the step was skipped)."""
    for m in modules:
        m.discard_state()
