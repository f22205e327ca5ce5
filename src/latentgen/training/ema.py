"""Exponential moving average of a module's weights, as used for sampling in most generative models.

``averaged <- decay * averaged + (1 - decay) * weight`` after every optimizer step; buffers
(BatchNorm statistics, codebook usage counts) are copied as they are. The averaged weights are
what grids and the exported model use (arXiv 1803.05407 for the averaging idea; Karras et al.
arXiv 2312.02696 for why it matters in generative training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from latentgen.artifact import check_state_dict

__all__ = ["EMA"]


class EMA:
    """Moving average of ``module``'s weights (``torch.optim.swa_utils.AveragedModel``).

    Floating-point parameters are averaged by ``get_ema_multi_avg_fn(decay)``; buffers (running
    statistics, codebook usage counts) are copied as they are, because averaging a counter or a
    usage histogram means nothing. What this class adds to ``AveragedModel``: the state dict of
    the averaged weights keyed like ``module``'s, and swapping them into ``module`` for a block.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}; e.g. 0.999.")
        self.module = module
        self.decay = float(decay)
        self.averaged = AveragedModel(
            module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False
        )
        # AveragedModel's first update copies the weights instead of averaging them; take it
        # now, so every optimizer step is one EMA step away from the initial weights.
        self.averaged.update_parameters(module)

    @property
    def num_updates(self) -> int:
        """Optimizer steps averaged in so far."""
        return int(self.averaged.n_averaged) - 1

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The averaged weights (live tensors), keyed like ``module.state_dict()``."""
        return self.averaged.module.state_dict()

    @torch.no_grad()
    def update(self) -> None:
        """Move the averaged weights one step towards the module's current weights."""
        if next(self.module.parameters(), None) is not None:
            self.averaged.update_parameters(self.module)
            return
        # AveragedModel cannot average an empty parameter list (its foreach grouping fails);
        # a module of buffers only (a k-means palette) just has them copied.
        for mine, theirs in zip(self.averaged.module.buffers(), self.module.buffers()):
            mine.copy_(theirs)
        self.averaged.n_averaged += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like ``module.state_dict()``."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, Tensor], num_updates: int = 0) -> None:
        """Restore shadow weights saved by ``state_dict``; keys and shapes must match exactly."""
        check_state_dict(
            self.shadow,
            tensors,
            "EMA weights",
            hint="Was the checkpoint made by another model?",
        )
        shadow = self.shadow
        for k, v in tensors.items():
            shadow[k].copy_(v)
        self.averaged.n_averaged.fill_(num_updates + 1)

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
