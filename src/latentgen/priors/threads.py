"""The torch thread count of a sampling loop whose steps are small (the ``threads`` option).

A decode step of a small prior is a chain of small ops (a 45 us matmul). Splitting each across
threads costs more than it saves: waking and joining OpenMP threads, and on a busy machine
spinning while waiting for a core. On a 2-core EPYC, an 8 x 256 x 1024 matmul ran 45 us on one
thread and 0.6-2 ms on two; 8 x 512 x 2048 ran the same on one or two when idle; under load,
two threads made whole transformer decode steps 30x slower. So a sampling loop runs on one
thread on CPU when its largest per-step op is under ~64 MFLOP, unless the caller says otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from latentgen.errors import InputError

__all__ = ["SMALL_STEP_FLOP", "decode_threads"]

#: Largest per-step op (FLOP) below which ``"auto"`` runs the loop on one thread.
SMALL_STEP_FLOP = 64e6


@contextlib.contextmanager
def decode_threads(threads: Any, step_flop: float, device: torch.device) -> Iterator[None]:
    """Run the block with the loop's torch thread count, restored afterwards.

    ``threads``: ``"auto"`` (one thread on CPU when ``step_flop``, the largest op of a step, is
    below ``SMALL_STEP_FLOP``; else unchanged), a positive int, or None (leave it alone).
    """
    valid_int = isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1
    if threads is not None and threads != "auto" and not valid_int:
        raise InputError(f"threads must be 'auto', None or a positive int, got {threads!r}.")
    before = torch.get_num_threads()
    want = before
    if valid_int:
        want = threads
    elif threads == "auto" and device.type == "cpu" and step_flop < SMALL_STEP_FLOP:
        want = 1
    if want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)
