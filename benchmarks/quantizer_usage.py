"""Codebook collapse demo: codebook usage of a plain ``vq`` against the usual remedies.

A tiny MLP autoencoder (data -> 16-d latent -> quantizer -> data) learns random clustered 2-D and
8-D data with K = 1024 codes. Printed per variant: the fraction of codes used over a whole
evaluation pass, the perplexity of the code histogram, dead codes, and reconstruction MSE.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantizer_usage.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.tokenizers.quantizers.base import Quantizer
from latentgen.tokenizers.quantizers.vq import (
    EMAQuantizer,
    EMAQuantizerConfig,
    VectorQuantizer,
    VectorQuantizerConfig,
)

K, LATENT = 1024, 16
REMEDIES = dict(lookup_dim=8, l2_normalize=True, kmeans_init=True, dead_code_threshold=1.0,
                dead_code_steps=20)  # fmt: skip
VARIANTS = {
    "vq (plain)": lambda: VectorQuantizer(VectorQuantizerConfig(codebook_size=K, dim=LATENT)),
    "vq + l2 + lookup_dim=8 + kmeans + dead-code": lambda: VectorQuantizer(
        VectorQuantizerConfig(codebook_size=K, dim=LATENT, **REMEDIES)
    ),
    "ema (plain)": lambda: EMAQuantizer(EMAQuantizerConfig(codebook_size=K, dim=LATENT)),
    "ema + l2 + lookup_dim=8 + kmeans + dead-code": lambda: EMAQuantizer(
        EMAQuantizerConfig(codebook_size=K, dim=LATENT, **REMEDIES)
    ),
}


def sample(centres: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points ``[n, d]`` around random centres."""
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    return centres[pick] + 0.05 * torch.randn(n, centres.shape[1], generator=g)


def run(data_dim: int, make_quantizer, steps: int, batch: int) -> dict[str, float]:
    """Train the autoencoder for ``steps`` and return usage over one evaluation pass."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    centres = 2 * torch.randn(4 * K, data_dim, generator=g)  # more clusters than codes
    enc = nn.Sequential(nn.Linear(data_dim, 64), nn.GELU(), nn.Linear(64, LATENT))
    dec = nn.Sequential(nn.Linear(LATENT, 64), nn.GELU(), nn.Linear(64, data_dim))
    q: Quantizer = make_quantizer()
    params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = enc(x).view(-1, 1, 1, LATENT).permute(0, 3, 1, 2)  # [n, LATENT, 1, 1]
        out = q(z)
        recon = dec(out.z_q.flatten(1))
        return F.mse_loss(recon, x), out.loss

    for _ in range(steps):
        rec, ql = step(sample(centres, batch, g))
        opt.zero_grad()
        (rec + ql).backward()
        opt.step()
    q.eval()
    q.reset_usage()
    with torch.no_grad():
        mse = sum(step(sample(centres, batch, g))[0].item() for _ in range(16)) / 16
    return {**q.usage(), "mse": mse}


def main() -> None:
    """Print usage per data dimension and variant."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"K={K}, latent dim={LATENT}, {args.steps} steps of {args.batch} points")
    print(f"{'data':>4}  {'variant':<46} {'usage':>6} {'perplexity':>10} {'dead':>5} "
          f"{'mse':>8} {'s':>5}")  # fmt: skip
    for data_dim in (2, 8):
        for name, make in VARIANTS.items():
            t0 = time.perf_counter()
            r = run(data_dim, make, args.steps, args.batch)
            print(
                f"{data_dim:>3}D  {name:<46} {r['usage']:>6.3f} {r['perplexity']:>10.1f} "
                f"{int(r['dead_codes']):>5} {r['mse']:>8.4f} {time.perf_counter() - t0:>5.1f}"
            )


if __name__ == "__main__":
    main()
