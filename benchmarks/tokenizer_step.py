"""Time one tokenizer training step on CPU: forward, and forward + backward.

Model: ch 64, ch_mult [1, 1, 2, 2, 4], 2 ResNet blocks per level, attention at 16x16, z 256,
1024 codes, batch 4, at 64x64 and 128x128 images.

Rows:
  vqvae        L1 + codebook loss (``generator_loss``)
  vqgan        + LPIPS + PatchGAN with the adaptive weight (its gradients at the last layer
               are part of "fwd"); fwd+bwd adds the discriminator step. Skipped with a note
               when the LPIPS weights are not on disk.

Columns: ``fwd`` is ``generator_loss`` with autograd on (what a training step runs before
backward), ``fwd(no_grad)`` the plain forward for evaluation, ``fwd+bwd`` the whole step without
the optimizer. Best and median over ``--repeats`` runs after ``--warmup`` runs. The machine may be
shared: ``--variants ours naive`` alternates the variants run by run so both see the same load.
``naive`` is straightforward taming-style code: bmm attention, ``x * sigmoid(x)``, no in-place
ops, upsample then conv, and the adaptive weight by differentiating both losses at the last
layer (LPIPS and discriminator backward twice); ``ours-cl`` is ours in channels_last.

    OMP_NUM_THREADS=2 python benchmarks/tokenizer_step.py --threads 2 --variants ours naive
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
from latentgen.tokenizers.losses import adaptive_weight
from latentgen.tokenizers.vqgan import VQGAN


# -- the baseline: straightforward taming-style code ----------------------------------------------
def _swish(x):
    return x * torch.sigmoid(x)


def _res_forward(self, x):
    h = self.conv1(_swish(self.norm1(x)))
    h = self.conv2(self.dropout(_swish(self.norm2(h))))
    if self.in_channels != self.out_channels:
        x = self.nin_shortcut(x)
    return x + h


def _attn_forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x)
    q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [B, N, C]
    k = self.k(h).reshape(b, c, hh * ww)  # [B, C, N]
    v = self.v(h).reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, N, N]
    out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self.proj_out(out)


def _up_forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _naive_generator_terms(self, images, out, step):
    # The reference's adaptive weight: differentiate both losses at the last layer, which runs
    # LPIPS's and the discriminator's backward twice per step.
    logs = {}
    nll = self._nll_loss(images, out.recon, logs)
    loss = nll + self.config.codebook_weight * out.quant_loss.mean()
    ramp = self.gan_weight(step)
    if ramp == 0.0:
        return loss, logs
    gen = self._scored(out.recon)
    lam = adaptive_weight(nll, gen, self.decoder.last_layer) * self.config.disc_weight
    return loss + lam * ramp * gen, logs


_PATCHES = {
    (networks.ResnetBlock, "forward"): _res_forward,
    (networks.AttnBlock, "forward"): _attn_forward,
    (networks.Upsample, "forward"): _up_forward,
    (VQGAN, "_generator_terms"): _naive_generator_terms,
}
_ORIGINAL = {key: getattr(*key) for key in _PATCHES}


def use(variant: str) -> None:
    """Install the "ours" or the "naive" implementation of the patched methods."""
    for (cls, name), fn in (_PATCHES if variant == "naive" else _ORIGINAL).items():
        setattr(cls, name, fn)


# -- measurement ---------------------------------------------------------------------------------
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


def steps(kind: str, size: int, channels_last: bool) -> dict[str, Callable[[], object]]:
    """The three timed callables of one row, on a fresh seeded model."""
    torch.manual_seed(0)
    tok = registry.build("tokenizer", config(kind, size, channels_last)).train()
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

    return {"fwd(no_grad)": fwd_no_grad, "fwd": fwd, "fwd+bwd": fwd_bwd}


def measure(fns: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, list]:
    """Times per variant; variants alternate run by run so they see the same machine load."""
    times: dict[str, list[float]] = {v: [] for v in fns}
    for i in range(args.warmup + args.repeats):
        for variant, fn in fns.items():
            use(variant.split()[0])
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[variant].append((time.perf_counter() - t0) * 1e3)
    use("ours")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--rows", nargs="+", default=["vqvae", "vqgan"], choices=["vqvae", "vqgan"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["ours"],
        choices=["ours", "naive", "ours-cl"],
        help="ours; naive (taming-style baseline); ours-cl (channels_last)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from latentgen.metrics.lpips import lpips_available

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 4")
    print(f"{'row':<7}{'size':>5}  {'column':<13}{'variant':<9}{'best ms':>8}{'median ms':>10}")
    for kind in args.rows:
        if kind == "vqgan" and not lpips_available():
            print("vqgan: skipped, LPIPS weights not found (see latentgen.metrics.lpips)")
            continue
        for size in args.sizes:
            models = {v: steps(kind, size, v == "ours-cl") for v in args.variants}
            for v in args.variants:
                # One full step first: the allocator's first large blocks are fresh pages
                # (page faults), which would otherwise land in the first column's times.
                use(v.split("-")[0])
                models[v]["fwd+bwd"]()
            for col in ("fwd(no_grad)", "fwd", "fwd+bwd"):
                fns = {v.replace("-cl", " cl"): models[v][col] for v in args.variants}
                for variant, ts in measure(fns, args).items():
                    print(
                        f"{kind:<7}{size:>5}  {col:<13}{variant:<9}{min(ts):>8.0f}"
                        f"{statistics.median(ts):>10.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
