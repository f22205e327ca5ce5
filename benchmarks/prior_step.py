"""Train-step time and tokens/s of the priors (PixelSNAIL, the transformer, the masked prior).

One step is forward + backward + AdamW on random codes ``[batch, grid, grid]``. Prints a table;
``--sample`` adds the time to draw one batch of grids (PixelSNAIL: one forward per code; the
transformer: KV cache; the masked prior: its config's passes). ``masked-local`` is the masked
prior with ``local_conv: 3``, ``masked-sc`` with ``self_condition: true`` as well (a self-
conditioned step runs an extra forward pass half the time: read its mean, over many steps).
``transformer-nb`` is the transformer with ``neighbours: [2, 5]``.

    OMP_NUM_THREADS=1 python benchmarks/prior_step.py --priors masked,masked-local,masked-sc \
        --sizes small --grid 8 --vocab 32 --batch 32 --steps 60

    OMP_NUM_THREADS=2 python benchmarks/prior_step.py                  # CPU, small + medium
    python benchmarks/prior_step.py --device cuda --dtype bf16 --sample
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from latentgen.priors.base import Prior
from latentgen.priors.pixelsnail import PixelSNAILConfig, PixelSNAILPrior

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "pixelsnail": {
        "small": dict(
            channel=64, res_channel=64, n_block=2, n_res_block=2, n_head=4,
            key_channel=64, value_channel=64,
        ),
        "medium": dict(
            channel=128, res_channel=128, n_block=4, n_res_block=2, n_head=8,
            key_channel=128, value_channel=128,
        ),
        # VQ-VAE-2's top prior scale; only sensible on a GPU.
        "large": dict(
            channel=256, res_channel=256, n_block=4, n_res_block=4, n_head=8,
            key_channel=128, value_channel=256,
        ),
    },
    "transformer": {
        "small": dict(n_layer=4, n_head=4, n_embd=128),
        "medium": dict(n_layer=8, n_head=8, n_embd=256),
        "large": dict(n_layer=12, n_head=8, n_embd=512),
    },
}  # fmt: skip


def build_pixelsnail(size: str, vocab: int, grid: int) -> Prior:
    """A PixelSNAIL prior of the named size for a ``grid x grid`` code map."""
    cfg = PixelSNAILConfig(
        vocab_size=vocab, max_height=grid, max_width=grid, **SIZES["pixelsnail"][size]
    )
    return PixelSNAILPrior(cfg)


def build_transformer(size: str, vocab: int, grid: int, **options: Any) -> Prior:
    """A transformer prior of the named size, with ``options`` of its config."""
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig

    cfg = TransformerPriorConfig(
        vocab_size=vocab, block_size=grid * grid, **SIZES["transformer"][size], **options
    )
    return TransformerPrior(cfg)


def build_masked(size: str, vocab: int, grid: int, **options: Any) -> Prior:
    """A masked prior of the transformer's named size, with ``options`` of its config."""
    from latentgen.priors.masked import MaskedPrior, MaskedPriorConfig

    cfg = MaskedPriorConfig(
        vocab_size=vocab,
        block_size=grid * grid,
        steps=min(12, grid * grid),
        **SIZES["transformer"][size],
        **options,
    )
    return MaskedPrior(cfg)


BUILDERS: dict[str, Callable[[str, int, int], Prior]] = {
    "pixelsnail": build_pixelsnail,
    "transformer": build_transformer,
    "transformer-nb": lambda s, v, g: build_transformer(s, v, g, neighbours=(2, 5)),
    "masked": build_masked,
    "masked-local": lambda s, v, g: build_masked(s, v, g, local_conv=3),
    "masked-sc": lambda s, v, g: build_masked(s, v, g, local_conv=3, self_condition=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: Prior, codes: torch.Tensor, steps: int, warmup: int, autocast: Any
) -> tuple[float, float]:
    """Median and mean seconds per forward + backward + AdamW step (the mean is the figure
    for a prior whose steps differ, like a self-conditioned one)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        sync(codes.device)
        t0 = time.perf_counter()
        with autocast():
            loss = model.loss(codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(codes.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], sum(times) / len(times)


def time_sample(model: Prior, batch: int, grid: int, autocast: Any) -> float:
    """Seconds to draw ``batch`` grids once."""
    gen = torch.Generator(codes_device(model)).manual_seed(0)
    sync(codes_device(model))
    t0 = time.perf_counter()
    with autocast():
        model.sample(grid=(grid, grid), num_samples=batch, generator=gen)
    sync(codes_device(model))
    return time.perf_counter() - t0


def codes_device(model: Prior) -> torch.device:
    return next(model.parameters()).device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 autocast")
    p.add_argument("--priors", default="pixelsnail,transformer")
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sample", action="store_true", help="also time sampling one batch")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.dtype == "bf16":

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    torch.manual_seed(0)
    tokens = args.batch * args.grid * args.grid
    print(
        f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"grid={args.grid}x{args.grid} vocab={args.vocab} batch={args.batch} "
        f"steps={args.steps} (median and mean; tokens/s from the mean)"
    )
    head = f"{'prior':<14} {'size':<7} {'params':>8} {'step ms':>9} {'mean ms':>9} {'tokens/s':>10}"
    if args.sample:
        head += f" {'sample s':>9}"
    print(head)
    print("-" * len(head))
    for name in args.priors.split(","):
        for size in args.sizes.split(","):
            try:
                model = BUILDERS[name](size, args.vocab, args.grid).to(device)
            except ImportError as e:  # the other prior may not exist yet
                print(f"{name:<14} {size:<7} (not available: {e})")
                continue
            params = sum(t.numel() for t in model.parameters()) / 1e6
            codes = torch.randint(0, args.vocab, (args.batch, args.grid, args.grid), device=device)
            sec, mean = time_steps(model, codes, args.steps, args.warmup, autocast)
            row = (
                f"{name:<14} {size:<7} {params:>7.2f}M {sec * 1e3:>9.1f} {mean * 1e3:>9.1f} "
                f"{tokens / mean:>10.0f}"
            )
            if args.sample:
                row += f" {time_sample(model, args.batch, args.grid, autocast):>9.2f}"
            print(row, flush=True)
            del model


if __name__ == "__main__":
    main()
