"""A reservoir of recent encoder outputs, the pool k-means init and dead-code restarts draw from.

Drawn from the current batch alone, a codebook fills only as fast as one batch has rows: at
K = 16384 and 8 images of 64 codes (512 rows) a restart can re-seed at most 512 codes, and
k-means has fewer points than centroids. The reservoir keeps the last ``capacity`` rows of the
lookup space over all ranks (a ring buffer), so a restart re-seeds every dead code from
distinct rows of many batches and k-means sees K points or more.

Every rank holds the same rows: ``add`` gathers each rank's rows (the same number from each, the
smallest rank batch, drawn at random) with ``all_gather``, so draws made from the reservoir need
no further collective apart from the one broadcast that ``draw`` does to be safe.

Staging: rows added by a training forward are pending until the trainer commits the step (a
skipped step, perhaps with non-finite latents, adds nothing). The rows are not saved in a
checkpoint (up to ``capacity x d`` floats): a resumed run refills the reservoir.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latentgen.staged_state import StagedState
from latentgen.tokenizers.quantizers.common import all_reduce_min_, draw_distinct, is_distributed

__all__ = ["Reservoir"]


class Reservoir(nn.Module, StagedState):
    """Ring buffer of the last ``capacity`` lookup-space rows ``[capacity, d]`` over all ranks.

    Args:
        capacity: rows kept (over all ranks together).
        dim: width ``d`` of a row (the quantizer's lookup dimension).
    """

    rows: Tensor

    def __init__(self, capacity: int, dim: int) -> None:
        super().__init__()
        self.capacity = capacity
        # Non-persistent: refilled after a resume rather than stored in every checkpoint.
        self.register_buffer("rows", torch.zeros(capacity, dim), persistent=False)
        self.filled = 0  # rows written so far (at most capacity)
        self.next = 0  # ring position of the next write
        self._pending: list[Tensor] = []

    def __len__(self) -> int:
        return min(self.capacity, self.filled + sum(int(p.shape[0]) for p in self._pending))

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Collective: add rows ``x [N, d]`` of this rank (all ranks call it in lockstep)."""
        x = x.detach().float()
        if is_distributed():
            n = int(all_reduce_min_(torch.tensor([x.shape[0]], device=x.device))[0])
            if x.shape[0] > n:  # a random subset, so no part of the images is favoured
                x = x[torch.randperm(x.shape[0], device=x.device)[:n]]
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            x = torch.cat(parts)  # [world * n, d], the same on every rank
        if self.staging:
            self._pending.append(x)
        else:
            self._write(x)

    def _write(self, x: Tensor) -> None:
        x = x[-self.capacity :]  # only the newest rows survive a wrap anyway
        n = x.shape[0]
        first = min(n, self.capacity - self.next)
        self.rows[self.next : self.next + first] = x[:first]
        self.rows[: n - first] = x[first:]
        self.next = (self.next + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)

    def contents(self) -> Tensor:
        """The rows held now ``[len(self), d]`` (committed, then pending), oldest first."""
        held = self.rows[: self.filled] if self.filled < self.capacity else self.rows
        if self.filled == self.capacity and self.next:
            held = torch.cat((self.rows[self.next :], self.rows[: self.next]))
        out = torch.cat((held, *self._pending)) if self._pending else held
        return out[-self.capacity :]

    def draw(self, n: int) -> Tensor:
        """Up to ``n`` distinct rows ``[m, d]`` (``m <= n``) of the reservoir, the same on every
        rank (see ``draw_distinct``)."""
        return draw_distinct(self.contents(), n)

    @torch.no_grad()
    def commit_state(self) -> None:
        for x in self._pending:
            self._write(x)
        self._pending.clear()
        super().commit_state()

    @torch.no_grad()
    def discard_state(self) -> None:
        self._pending.clear()
        super().discard_state()
