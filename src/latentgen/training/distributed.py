"""Data-parallel training over ``torch.distributed``, launched with ``torchrun``.

    torchrun --nproc-per-node 8 -m latentgen train prior --config cfg.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_distributed`` reads them and joins the group (nccl on CUDA, gloo on CPU). Without them
the same code runs as one process. There is no process launching here: that is torchrun's job
(and the tests', which spawn processes themselves).

How gradients are averaged across ranks depends on the task (``Task.ddp_modules``):

- the prior runs under ``torch.nn.parallel.DistributedDataParallel``: its loss is one module's
  forward with one optimizer, so DDP overlaps the all-reduce with the backward pass (and skips
  it, with ``no_sync``, for all micro-batches but the last);
- the tokenizer step is averaged with bucketed all-reduces (``all_reduce_grads``) once per
  optimizer, after gradient accumulation. DDP cannot serve it: one module holds both the
  generator and the discriminator, stepped by two optimizers in turn; the generator's forward
  runs the discriminator with its parameters frozen (DDP fixes the set of parameters that
  require gradients when it is built), and VQGAN's adaptive weight takes ``autograd.grad`` at
  the decoder's last layer inside the loss, which DDP does not support (it reduces only
  gradients accumulated into ``.grad``).
  One all-reduce per optimizer and step is exact for any task; it gives up only the overlap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latentgen.errors import SpecError

__all__ = [
    "DistInfo",
    "all_reduce_grads",
    "all_reduce_mean",
    "all_true",
    "barrier",
    "broadcast_module",
    "gather_json",
    "init_distributed",
    "is_distributed",
    "shutdown_distributed",
]

# Gradients are all-reduced in flat buckets of about this many bytes: big enough to reach the
# link's bandwidth, small enough not to double peak memory.
_BUCKET_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the world size, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"environment variable {name}={value!r} must be an integer.") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SpecError("device 'cuda' was asked for but torch sees no CUDA GPU; use 'auto'/'cpu'.")
    if local_rank >= torch.cuda.device_count():
        raise SpecError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "launch at most that many processes per node (torchrun --nproc-per-node)."
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (or one already set up); else single process.

    ``device`` is ``'auto'``, ``'cpu'`` or ``'cuda'``; on CUDA each process takes
    ``cuda:LOCAL_RANK``. The backend is nccl for CUDA and gloo for CPU.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        return DistInfo(rank, world, local_rank, _pick_device(device, local_rank))
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise SpecError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}.")
    dev = _pick_device(device, local_rank)
    if world > 1:
        if not dist.is_available():
            raise SpecError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    """Leave the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _buckets(tensors: list[Tensor]) -> Iterable[list[Tensor]]:
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (
            size + t.numel() * t.element_size() > _BUCKET_BYTES or t.dtype != bucket[0].dtype
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks, in place.

    A parameter with a gradient on some rank but not on this one takes part with zeros, so all
    ranks issue the same collectives; one with no gradient on any rank keeps ``grad = None``,
    which the optimizer skips exactly as it would in a single process.
    """
    if not is_distributed():
        return
    params = list(params)
    if not params:
        return
    world = dist.get_world_size()
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)  # [n_params], 1 where any rank has a gradient
    grads = []
    for p, any_grad in zip(params, has.tolist()):
        if not any_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])  # [sum numel]
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
        flat.div_(world)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def all_reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks (every rank must pass the same keys)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank, so all ranks take the same branch."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (identical starting weights)."""
    if not is_distributed():
        return
    for t in module.state_dict().values():
        dist.broadcast(t, src=src)


def gather_json(obj: Any, device: torch.device) -> list[Any] | None:
    """Every rank's JSON-able ``obj``, as a list on rank 0 (None elsewhere).

    Sent as UTF-8 bytes in a padded uint8 tensor: no pickling, unlike ``gather_object``.
    """
    if not is_distributed():
        return [obj]
    data = json.dumps(obj).encode()
    world = dist.get_world_size()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n.item()) for n in lengths))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    bufs = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf)
    if dist.get_rank() != 0:
        return None
    return [
        json.loads(b[: int(n.item())].cpu().numpy().tobytes().decode())
        for b, n in zip(bufs, lengths)
    ]
