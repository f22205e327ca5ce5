"""Exponential moving average of a module's weights, as used for sampling in most generative models.

``shadow <- decay * shadow + (1 - decay) * weight`` after every optimizer step; buffers
(BatchNorm statistics, codebook usage counts) are copied as they are. The averaged weights are
what grids and the exported model use (arXiv 1803.05407 for the averaging idea; Karras et al.
arXiv 2312.02696 for why it matters in generative training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from latentgen.errors import CheckpointError

__all__ = ["EMA"]


class EMA:
    """Shadow copy of ``module``'s state dict, updated with ``update()`` after each step.

    Floating-point parameters are averaged; every other entry (integer buffers, running
    statistics) is copied, because averaging a counter or a usage histogram means nothing.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}; e.g. 0.999.")
        self.module = module
        self.decay = float(decay)
        self.num_updates = 0
        # By identity, so a tied weight (one tensor under two keys) is averaged under both.
        params = {id(p) for p in module.parameters() if p.is_floating_point()}
        state = module.state_dict(keep_vars=True)
        self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in state.items()}
        self._averaged = sorted(k for k, v in state.items() if id(v) in params)
        self._copied = sorted(k for k, v in state.items() if id(v) not in params)

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow weights one step towards the module's current weights."""
        state = self.module.state_dict(keep_vars=True)
        if self._averaged:
            shadow = [self.shadow[k] for k in self._averaged]
            current = [state[k].detach() for k in self._averaged]
            # lerp(s, p, 1 - d) = s + (1 - d) (p - s) = d s + (1 - d) p
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)
        for k in self._copied:
            self.shadow[k].copy_(state[k].detach())
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like ``module.state_dict()``."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, Tensor], num_updates: int = 0) -> None:
        """Restore shadow weights saved by ``state_dict``; keys and shapes must match exactly."""
        missing = sorted(set(self.shadow) - set(tensors))
        extra = sorted(set(tensors) - set(self.shadow))
        bad = [k for k in self.shadow if k in tensors and tensors[k].shape != self.shadow[k].shape]
        if missing or extra or bad:
            raise CheckpointError(
                f"EMA weights do not match the model: missing {missing[:5]}, unexpected "
                f"{extra[:5]}, shape mismatch {bad[:5]}. Was the checkpoint made by another model?"
            )
        for k, v in tensors.items():
            self.shadow[k].copy_(v)
        self.num_updates = num_updates

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Load the averaged weights into ``module`` (default: the tracked module)."""
        (module or self.module).load_state_dict(self.shadow, strict=True)

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[nn.Module]:
        """Swap the averaged weights into the module for the ``with`` block, then swap back."""
        state = self.module.state_dict()
        backup = {k: v.detach().clone() for k, v in state.items()}
        self.copy_to()
        try:
            yield self.module
        finally:
            self.module.load_state_dict(backup, strict=True)
