"""Helpers shared by the quantizers: fp32 regions, nearest-code search, k-means, usage counting and
the ``torch.distributed`` collectives that keep every rank's codebook identical.

Every collective here is a no-op when ``torch.distributed`` is not initialised, so the same code
runs in one process, in several CPU processes (gloo) and on many GPUs (nccl).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from latentgen.errors import InputError
from latentgen.staged_state import StagedState

__all__ = [
    "UsageCounter",
    "all_reduce_min_",
    "all_reduce_sum_",
    "broadcast_",
    "check_indices",
    "check_latents",
    "draw_distinct",
    "fp32_region",
    "is_distributed",
    "is_rank0",
    "kmeans",
    "nearest_codes",
    "perplexity",
    "sample_rows",
]

# Rows of the [N, K] distance matrix computed at once: caps its memory at 2**24 floats (64 MiB)
# whatever the batch size and codebook size.
_DIST_CHUNK_ELEMENTS = 2**18  # the addmm tile stays in cache: ~3x faster than 2**24 at K=16384


# -- torch.distributed --------------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether codebook statistics should be reduced across ranks (an initialised process group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    """True on rank 0, and in a single process."""
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (no-op outside torch.distributed); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_(t: Tensor) -> Tensor:
    """Minimum of ``t`` over ranks in place (no-op outside torch.distributed); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` with rank ``src``'s copy in place (no-op outside torch.distributed)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


# -- numerics -----------------------------------------------------------------------------------
def fp32_region(t: Tensor) -> AbstractContextManager[object]:
    """Turn autocast off on ``t``'s device: code inside runs in the dtype of its tensors.

    Nearest-code search in bf16 picks the wrong code whenever two distances agree to ~3 digits,
    and EMA sums lose small updates; the quantizers therefore cast to fp32 inside this region.
    """
    return torch.autocast(device_type=t.device.type, enabled=False)


def nearest_codes(x: Tensor, codes: Tensor) -> Tensor:
    """Nearest code (squared euclidean, in fp32) of each row: ``[N, d], [K, d] -> [N]`` long."""
    x, codes = x.float(), codes.float()
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row so argmin ignores it.
    c2 = codes.pow(2).sum(dim=1)  # [K]
    rows = max(1, _DIST_CHUNK_ELEMENTS // codes.shape[0])
    out = []
    for chunk in x.split(rows):
        d = torch.addmm(c2.unsqueeze(0), chunk, codes.t(), alpha=-2.0)  # [n, K]
        out.append(d.argmin(dim=1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.long)


def perplexity(counts: Tensor) -> float:
    """``exp(entropy)`` of the distribution given by non-negative ``counts``; 0.0 when all are 0."""
    p = counts.detach().double().cpu()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()  # 0 * log(tiny) = 0 for empty codes
    return math.exp(float(entropy))


def sample_rows(x: Tensor, n: int) -> Tensor:
    """``n`` rows of ``x`` drawn at random on rank 0 and broadcast, so every rank gets the same."""
    out = x.new_empty(n, x.shape[1])
    if is_rank0():
        # Without replacement when there are enough rows: distinct restarts do not duplicate codes.
        pick = (
            torch.randperm(x.shape[0], device=x.device)[:n]
            if x.shape[0] >= n
            else torch.randint(0, x.shape[0], (n,), device=x.device)
        )
        out.copy_(x[pick])
    return broadcast_(out)


@torch.no_grad()
def draw_distinct(x: Tensor, n: int) -> Tensor:
    """Up to ``n`` distinct rows ``[m, d]`` of ``x [N, d]`` (``m <= n``; equal rows count once),
    drawn at random on rank 0 and broadcast, so every rank gets the same rows.

    Re-seeding two dead codes with one vector would leave one of them dead again (the lookup
    picks the lower index), so a restart takes fewer rows rather than repeat one.
    """
    pool = torch.unique(x.detach().float(), dim=0)  # [U, d]
    m = int(broadcast_(torch.tensor([min(n, int(pool.shape[0]))], device=x.device))[0])
    out = pool.new_empty(m, x.shape[1])
    if is_rank0():
        out.copy_(pool[torch.randperm(pool.shape[0], device=x.device)[:m]])
    return broadcast_(out)


@torch.no_grad()
def kmeans(
    x: Tensor, k: int, iters: int, spherical: bool = False, shared: bool = False
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means in fp32; under torch.distributed it clusters the union of all ranks' rows.

    Centroids start from ``k`` distinct rows of rank 0's ``x`` (repeating rows only if it has
    fewer than ``k`` distinct ones), then each iteration sums the assignments of every rank
    with an all-reduce, so all ranks run the same iterations on the same statistics. A
    centroid that gets no points keeps its position. ``spherical`` re-normalises centroids to
    unit length (cosine k-means).
    ``shared``: ``x`` is already the same on every rank (a ``Reservoir``), so nothing is summed
    over ranks (that would count each row once per rank).

    Returns:
        centroids ``[k, d]`` and the number of points assigned to each in the last pass ``[k]``.
    """
    x = x.detach().float()
    d = x.shape[1]
    # Seeds at distinct rows (a blank background repeats one latent many times, and centroids
    # seeded on one point stay duplicates); repeats only when there are fewer than k.
    centroids = draw_distinct(x, k)  # [m, d], identical on all ranks
    if centroids.shape[0] < k:
        centroids = torch.cat((centroids, sample_rows(x, k - centroids.shape[0])))  # [k, d]
    counts = x.new_zeros(k)
    for _ in range(iters):
        idx = nearest_codes(x, centroids)  # [N]
        counts = torch.bincount(idx, minlength=k).float()  # [k]
        sums = x.new_zeros(k, d).index_add_(0, idx, x)  # [k, d]
        if not shared:
            all_reduce_sum_(counts)
            all_reduce_sum_(sums)
        new = sums / counts.clamp_min(1.0).unsqueeze(1)
        if spherical:
            new = F.normalize(new, dim=1)
        centroids = torch.where(counts.unsqueeze(1) > 0, new, centroids)
    # An all-reduce gives the same bits on every rank in gloo and nccl, but nothing promises it;
    # one broadcast makes "every rank holds the same codebook" true by construction.
    return broadcast_(centroids.contiguous()), broadcast_(counts)


# -- input checks -------------------------------------------------------------------------------
def check_latents(z: Tensor, dim: int, who: str) -> None:
    """Raise InputError unless ``z`` is a float ``[B, dim, h, w]`` tensor."""
    if z.ndim != 4 or z.shape[1] != dim:
        raise InputError(
            f"{who} takes latents of shape [B, {dim}, h, w], got {tuple(z.shape)}. Pass the "
            f"encoder output with {dim} channels (set the quantizer's `dim` to the encoder's "
            f"output channels)."
        )
    if not z.is_floating_point():
        raise InputError(f"{who} takes float latents, got dtype {z.dtype}; cast with z.float().")


def check_indices(indices: Tensor, codebook_size: int, who: str) -> None:
    """Raise InputError unless ``indices`` is an integer ``[B, h, w]`` tensor in ``[0, K)``."""
    if indices.ndim != 3:
        raise InputError(
            f"{who}.embed takes codes of shape [B, h, w], got {tuple(indices.shape)}; add or "
            f"remove batch dimensions so the codes form one grid per image."
        )
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise InputError(
            f"{who}.embed takes integer codes, got dtype {indices.dtype}; use .long()."
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise InputError(
            f"{who}.embed got codes in [{int(indices.min())}, {int(indices.max())}] but the "
            f"codebook has {codebook_size} codes, so codes must lie in [0, {codebook_size}). The "
            f"codes probably come from a tokenizer or prior with another vocabulary size."
        )


# -- usage --------------------------------------------------------------------------------------
class UsageCounter(nn.Module, StagedState):
    """Counts how often each code is chosen since the last ``reset()``: a whole pass, not a window.

    In training forwards the batch counts are all-reduced (the quantizers need global counts for
    EMA and dead-code statistics anyway), so every rank holds the same totals. Evaluation
    forwards count only locally, because evaluation is often run on rank 0 alone and a
    collective there would hang; call ``sync()`` on every rank at the end of a distributed
    evaluation pass to add the other ranks' evaluation counts.

    The counts are non-persistent buffers: they follow ``.to(device)`` but are not saved in a
    state_dict (a checkpoint holds the model, not the tallies of a past evaluation). Training
    counts are staged (``StagedState``): a step the trainer skips is not counted.
    """

    counts: Tensor
    unsynced: Tensor

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.long), False)
        # The part of `counts` that this rank has seen but the others have not (eval forwards).
        self.register_buffer("unsynced", torch.zeros(codebook_size, dtype=torch.long), False)

    @torch.no_grad()
    def update(self, indices: Tensor, reduce: bool) -> Tensor:
        """Add a batch of codes; ``reduce`` sums the batch over ranks. Returns the batch counts."""
        batch = torch.bincount(indices.detach().flatten(), minlength=self.codebook_size)  # [K]
        if reduce:  # a training forward: counted when the trainer commits the step
            all_reduce_sum_(batch)
            self.stage("counts", self.staged("counts") + batch)
            return batch
        if is_distributed():
            self.unsynced += batch
        self.counts += batch
        return batch

    @torch.no_grad()
    def sync(self) -> None:
        """Collective: add the other ranks' evaluation counts, so all ranks agree. Call on all."""
        if not is_distributed():
            self.unsynced.zero_()
            return
        total = all_reduce_sum_(self.unsynced.clone())
        self.counts += total - self.unsynced
        self.unsynced.zero_()

    @torch.no_grad()
    def reset(self) -> None:
        """Zero the counts (start a new pass)."""
        self.discard_state()
        self.counts.zero_()
        self.unsynced.zero_()

    def summary(self) -> dict[str, float]:
        """``usage`` (fraction of codes used), ``perplexity`` (exp entropy), ``dead_codes``."""
        used = int((self.counts > 0).sum())
        return {
            "usage": used / self.codebook_size,
            "perplexity": perplexity(self.counts),
            "dead_codes": float(self.codebook_size - used),
        }
