"""Time one tokenizer training step on CPU: forward, and forward + backward.

Model: ch 64, ch_mult [1, 1, 2, 2, 4], 2 ResNet blocks per level, attention at 16x16, z 256,
1024 codes, batch 4, at 64x64 and 128x128 images.

Rows:
  vqvae        L1 + codebook loss (``generator_loss``)
  vqgan        + LPIPS + PatchGAN: the generator step (with the adaptive weight's two extra
               gradients) and, in fwd+bwd, also the discriminator step. Skipped with a note when
               the LPIPS weights are not on disk.

Columns: ``fwd`` is ``generator_loss`` with autograd on (what a training step runs before
backward), ``fwd(no_grad)`` the plain forward for evaluation, ``fwd+bwd`` the whole step without
the optimizer. Best and median over ``--repeats`` runs after ``--warmup`` runs; the machine is
shared, so compare medians taken in the same invocation. ``--naive`` swaps in straightforward
taming-style blocks (bmm attention, ``x * sigmoid(x)``, no in-place ops, upsample then
conv) for comparison.

    OMP_NUM_THREADS=2 python benchmarks/tokenizer_step.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentgen import registry
from latentgen.tokenizers import networks


def naive_blocks() -> None:
    """Replace the block forwards with direct taming-style code (the comparison baseline)."""

    def swish(x):
        return x * torch.sigmoid(x)

    def res_forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h

    def attn_forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [B, N, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, N]
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, N, N]
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)

    def up_forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    networks.ResnetBlock.forward = res_forward  # type: ignore[method-assign]
    networks.Upsample.forward = up_forward  # type: ignore[method-assign]
    networks.AttnBlock.forward = attn_forward  # type: ignore[method-assign]


def config(kind: str, size: int, channels_last: bool) -> dict:
    cfg = {
        "type": kind,
        "ch": 64,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "z_channels": 256,
        "resolution": size,  # so that "16" names the 16x16 level at this image size
        "quantizer": {"type": "vq", "codebook_size": 1024, "dim": 256},
        "channels_last": channels_last,
    }
    if kind == "vqgan":
        cfg.update(perceptual_weight=1.0, disc_start=0, disc_warmup_steps=0)
    return cfg


def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def bench(kind: str, size: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    tok = registry.build("tokenizer", config(kind, size, args.channels_last)).train()
    x = torch.rand(4, 3, size, size) * 2 - 1

    def fwd_no_grad():
        with torch.no_grad():
            tok(x)

    def fwd():
        return tok.generator_loss(x, step=1)

    def fwd_bwd():
        tok.zero_grad(set_to_none=True)
        loss, _, out = tok.generator_loss(x, step=1)
        loss.backward()
        if tok.has_discriminator:
            d, _ = tok.discriminator_loss(x, out.recon, step=1)
            d.backward()

    out = {}
    out["fwd(no_grad)"] = timeit(fwd_no_grad, args.warmup, args.repeats)
    out["fwd"] = timeit(fwd, args.warmup, args.repeats)
    out["fwd+bwd"] = timeit(fwd_bwd, args.warmup, args.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--rows", nargs="+", default=["vqvae", "vqgan"], choices=["vqvae", "vqgan"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--naive", action="store_true", help="taming-style blocks, for comparison")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.naive:
        naive_blocks()

    from latentgen.metrics.lpips import lpips_available

    variant = ("naive" if args.naive else "ours") + (" channels_last" if args.channels_last else "")
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 4, {variant}")
    print(f"{'row':<8}{'size':>6}  {'column':<14}{'best ms':>9}{'median ms':>11}")
    for kind in args.rows:
        if kind == "vqgan" and not lpips_available():
            print("vqgan: skipped, LPIPS weights not found (see latentgen.metrics.lpips)")
            continue
        for size in args.sizes:
            for col, (best, med) in bench(kind, size, args).items():
                print(f"{kind:<8}{size:>6}  {col:<14}{best:>9.0f}{med:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
