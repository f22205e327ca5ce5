"""Reconstruction quality and codebook usage of a small ``vqvae`` after a fixed CPU budget.

For each dataset (Fashion-MNIST padded to 32x32, the built-in shapes at 32x32) and each
quantizer variant, a small VQ-VAE (f = 4, so 8x8 = 64 codes per image) is trained for
``--steps`` optimizer steps with L1 + quantizer loss (no LPIPS, no discriminator) and then
evaluated on held-out images:

- PSNR and SSIM (``latentgen.metrics.image``) and LPIPS (VGG16, on the first
  ``--lpips-images``; only when its weights are on disk, see ``latentgen.metrics.lpips``);
- codebook usage over the WHOLE evaluation pass (the quantizer's ``reset_usage()`` /
  ``usage()``): the fraction of the K codes chosen at least once, the perplexity of the code
  histogram and the number of dead codes. Use enough images: at K = 16384 the default 4096
  images give 262,144 codes, 16 x K;
- the same models on a few real photos from ``skimage.data``, centre-cropped and resized to
  64x64 (grayscale for the 1-channel Fashion-MNIST models): PSNR, SSIM and LPIPS.

Quantizer variants, each at K = 1024 and K = 16384:

    vq      plain VQ-VAE quantizer (https://arxiv.org/abs/1711.00937), no tricks
    vq-l2   l2-normalised 8-d lookup (ViT-VQGAN, https://arxiv.org/abs/2110.04627), k-means init
            and dead-code restarts (Jukebox, https://arxiv.org/abs/2005.00341)
    vq-l2-res  vq-l2 whose k-means init and restarts draw from a reservoir of the last 4 K
            encoder outputs (``reservoir_size``) instead of the current batch: k-means waits
            until the reservoir holds K rows, and a restart re-seeds every dead code at once
    ema     EMA codebook (VQ-VAE appendix A.1), no tricks
    fsq     finite scalar quantization (https://arxiv.org/abs/2309.15505), levels [8,8,4,4] =
            1024 and [8,8,8,8,4] = 16384

The goals checked at the end (from the codebook-collapse issue): vq-l2 uses >= 95% of the codes
at K = 1024 and >= 90% at K = 16384, while plain vq uses far fewer. At small batches the batch
cannot fill a large codebook; the reservoir variant is for that case (issue 13: >= 90% at
K = 16384 with batch 8 on Fashion-MNIST):

    LG_THREADS=2 lg python benchmarks/tokenizer_quality.py --datasets fashion_mnist \\
        --quantizers vq-l2,vq-l2-res --sizes 16384 --batch-size 8 --steps 400 --no-photos

Training goes through latentgen's own engine, ``Trainer(TokenizerTask(tok), dataset, cfg)``,
in a temporary run folder (one final checkpoint and export per model, deleted at the end), so
the benchmark measures the code path ``latentgen train tokenizer`` runs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tokenizer_quality.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tokenizer_quality.py --steps 50 \\
        --datasets shapes --quantizers vq,vq-l2 --sizes 1024

The default run (16 models, 80 steps of batch 64 each) takes about 7 minutes on an idle 2-core
CPU (a K=1024 model ~10 s of training + 6 s of evaluation, a K=16384 one ~23 s + 15 s, most of
it the nearest-code search) and was measured at 11.7 and 16.9 minutes on the shared machine
while other jobs ran. When other jobs share the cores, ``--threads 1`` is often faster than 2
(two OpenMP threads spin waiting for each other).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _photos import load_photo  # benchmarks/_photos.py (this script's folder is on sys.path)
from torch import Tensor
from torch.utils.data import Dataset

from latentgen import registry
from latentgen.metrics.image import psnr, ssim
from latentgen.metrics.lpips import LPIPS, lpips_available
from latentgen.training.config import TrainerConfig
from latentgen.training.loop import Trainer
from latentgen.training.tasks import TokenizerTask

DATASETS = ("fashion_mnist", "shapes")
QUANTIZERS = ("vq", "vq-l2", "vq-l2-res", "ema", "fsq")
SIZES = (1024, 16384)
# FSQ levels per codebook size (products 1024 and 16384; FSQ paper, table 1, uses similar sets).
FSQ_LEVELS = {1024: (8, 8, 4, 4), 16384: (8, 8, 8, 8, 4)}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PHOTO_SIZE = 64
LATENT_DIM = 32  # quantizer `dim`: channels of quant_conv's output
GOALS = {1024: 0.95, 16384: 0.90}  # vq-l2 usage targets from the issue


@dataclass
class Result:
    """One trained model: its variant, evaluation figures and timings."""

    dataset: str
    quantizer: str
    codebook_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    photos: dict[str, dict[str, float]] = field(default_factory=dict)


# -- models ----------------------------------------------------------------------------------------
def quantizer_config(
    name: str, k: int, dead_code_steps: int | None = None, dead_code_threshold: float = 1.0
) -> dict[str, Any]:
    """The quantizer config of variant ``name`` at codebook size ``k``."""
    if name == "vq":
        return {"type": "vq", "codebook_size": k, "dim": LATENT_DIM}
    if name == "ema":
        return {"type": "ema", "codebook_size": k, "dim": LATENT_DIM}
    if name == "fsq":
        if k not in FSQ_LEVELS:
            raise SystemExit(f"no FSQ levels for K={k}; pick --sizes from {sorted(FSQ_LEVELS)}.")
        return {"type": "fsq", "levels": FSQ_LEVELS[k], "dim": LATENT_DIM}
    if name in ("vq-l2", "vq-l2-res"):
        cfg = {
            "type": "vq",
            "codebook_size": k,
            "dim": LATENT_DIM,
            "lookup_dim": 8,
            "l2_normalize": True,
            "kmeans_init": True,
            "dead_code_threshold": dead_code_threshold,
            "dead_code_steps": dead_code_steps or 1,
        }
        if name == "vq-l2-res":
            cfg["reservoir_size"] = 4 * k  # recent encoder outputs of ~4K / (B * 64) steps
        return cfg
    raise SystemExit(f"unknown quantizer variant {name!r}; pick from {', '.join(QUANTIZERS)}.")


def default_dead_code_steps(k: int, batch_size: int, codes_per_image: int) -> int:
    """Restart window W (steps) of the vq-l2 variant: long enough to see about 3 K codes.

    Dead-code restarts re-seed every code chosen fewer than ``dead_code_threshold`` times in
    the window from rows of the current batch (B * 64 encoder outputs). A window of 3 K
    outputs misses a live code holding 1/K of the data with probability e^-3 = 5%, so few live
    codes are restarted for nothing; a shorter window restarts more codes than one batch has
    distinct rows (duplicates, which stay dead), a longer one fills a large codebook slowly
    (each restart adds at most B * 64 codes, so filling K takes about K / (B * 64) windows).
    """
    return max(2, math.ceil(3 * k / (batch_size * codes_per_image)))


def tokenizer_config(in_channels: int, quantizer: dict[str, Any], ch: int) -> dict[str, Any]:
    """A small f=4 VQ-VAE for 32x32 images (about 0.3M parameters at ch=16)."""
    return {
        "type": "vqvae",
        "in_channels": in_channels,
        "resolution": 32,
        "ch": ch,
        "ch_mult": (1, 2, 2),  # f = 4: 32x32 -> 8x8 codes
        "num_res_blocks": 1,
        "attn_resolutions": (),  # the 8x8 middle block still has one attention layer
        "z_channels": 32,
        "norm_groups": 8,
        "quantizer": quantizer,
        "recon_loss": "l1",
        "channels_last": True,  # measurably faster for these narrow convs on CPU
    }


# -- data ------------------------------------------------------------------------------------------
class _ImagesOnly(Dataset[dict[str, Tensor]]):
    """Items ``{"image": ...}`` of a latentgen dataset (skips collating unused conditions)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.base[index]["image"]}


def datasets(name: str, eval_images: int) -> tuple[Dataset[Any], Tensor, int]:
    """(training dataset, held-out images ``[N, C, 32, 32]``, channels) of ``name``."""
    if name == "fashion_mnist":
        common = {"type": "fashion_mnist", "image_size": 32, "resize": "pad", "channels": 1}
        train = registry.build("dataset", {**common, "split": "train"})
        test = registry.build("dataset", {**common, "split": "test", "limit": eval_images})
        channels = 1
    elif name == "shapes":
        # Item i is rendered from seed + i: seeds 0.. for training, 10**7.. for the test set.
        train = registry.build("dataset", {"type": "shapes", "size": 60_000, "seed": 0})
        test = registry.build("dataset", {"type": "shapes", "size": eval_images, "seed": 10**7})
        channels = 3
    else:
        raise SystemExit(f"unknown dataset {name!r}; pick from {', '.join(DATASETS)}.")
    held_out = torch.stack([test[i]["image"] for i in range(len(test))])  # [N, C, 32, 32]
    return _ImagesOnly(train), held_out, channels


def photos(gray: bool) -> dict[str, Tensor]:
    """skimage's sample photos, centre-cropped and resized to 64x64, ``[1, C, 64, 64]``."""
    return {name: load_photo(name, PHOTO_SIZE, gray) for name in PHOTOS}


# -- training and evaluation -----------------------------------------------------------------------
def train(
    tok: Any, dataset: Dataset[Any], args: argparse.Namespace, run_name: str, runs_dir: Path
) -> dict[str, float]:
    """Train ``tok`` in place for ``args.steps`` steps; returns the last logged metrics."""
    cfg = TrainerConfig(
        run_name=run_name,
        runs_dir=runs_dir,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        betas=(0.9, 0.99),
        warmup_steps=min(10, args.steps - 1),
        lr_schedule="cosine",
        grad_clip=1.0,
        amp="off",
        device="cpu",
        log_every=max(1, args.steps // 5),
        checkpoint_every=args.steps,  # one checkpoint, at the end
        grid_every=None,
        progress="off",
        seed=args.seed,
    )
    result = Trainer(TokenizerTask(tok), dataset, cfg).fit()
    return {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}


@torch.no_grad()
def evaluate(
    tok: Any, images: Tensor, lpips: LPIPS | None, lpips_images: int, batch: int = 256
) -> dict[str, float]:
    """PSNR/SSIM over ``images``, LPIPS over the first ``lpips_images``, usage over all codes."""
    tok.eval()
    tok.quantizer.reset_usage()  # usage counts the whole pass below, nothing before it
    p, s, lp = [], [], []
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        recon = tok(x).recon.clamp(-1, 1)  # [b, C, H, W]; forward also counts the codes
        p.append(psnr(recon, x))
        s.append(ssim(recon, x))
        n_lp = min(lpips_images - start, x.shape[0])
        if lpips is not None and n_lp > 0:
            lp.append(lpips(recon[:n_lp], x[:n_lp]))
    out = {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean())}
    out["lpips"] = float(torch.cat(lp).mean()) if lp else float("nan")
    out.update(tok.quantizer.usage())
    return out


@torch.no_grad()
def evaluate_photos(
    tok: Any, images: dict[str, Tensor], lpips: LPIPS | None
) -> dict[str, dict[str, float]]:
    """PSNR, SSIM and LPIPS of each photo's reconstruction."""
    tok.eval()
    out = {}
    for name, x in images.items():
        recon = tok.decode(tok.encode(x)).clamp(-1, 1)  # [1, C, 64, 64]
        out[name] = {
            "psnr": float(psnr(recon, x)[0]),
            "ssim": float(ssim(recon, x)[0]),
            "lpips": float(lpips(recon, x)[0]) if lpips is not None else float("nan"),
        }
    return out


# -- report ----------------------------------------------------------------------------------------
def _fmt(v: float, spec: str) -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def quality_table(results: Sequence[Result]) -> str:
    """The main markdown table."""
    head = (
        "| dataset | quantizer | K | PSNR dB | SSIM | LPIPS | usage | perplexity | dead codes "
        "| train L1 | train s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        m = r.metrics
        rows.append(
            f"| {r.dataset} | {r.quantizer} | {r.codebook_size} | {m['psnr']:.2f} | "
            f"{m['ssim']:.3f} | {_fmt(m['lpips'], '.3f')} | {100 * m['usage']:.1f}% | "
            f"{m['perplexity']:.0f} | {m['dead_codes']:.0f} | {_fmt(m['rec_loss'], '.4f')} | "
            f"{m['train_s']:.0f} |"
        )
    return "\n".join(rows)


def photo_table(results: Sequence[Result]) -> str:
    """Markdown table of the photo reconstructions: PSNR / LPIPS per photo, and means."""
    names = list(results[0].photos)
    head = "| trained on | quantizer | K | " + " | ".join(names) + " | mean PSNR | mean LPIPS |"
    rows = [head, "|---|---|---:|" + "---:|" * (len(names) + 2)]
    for r in results:
        cells = [f"{r.photos[n]['psnr']:.1f} / {_fmt(r.photos[n]['lpips'], '.3f')}" for n in names]
        mp = sum(r.photos[n]["psnr"] for n in names) / len(names)
        ml = sum(r.photos[n]["lpips"] for n in names) / len(names)
        rows.append(
            f"| {r.dataset} | {r.quantizer} | {r.codebook_size} | "
            + " | ".join(cells)
            + f" | {mp:.2f} | {_fmt(ml, '.3f')} |"
        )
    return "\n".join(rows)


def goal_lines(results: Sequence[Result]) -> list[str]:
    """One line per (dataset, K) with vq-l2 results: usage goal met or not, and plain vq's."""
    by = {(r.dataset, r.quantizer, r.codebook_size): r.metrics["usage"] for r in results}
    lines = []
    for (ds, q, k), usage in by.items():
        if q not in ("vq-l2", "vq-l2-res") or k not in GOALS:
            continue
        verdict = "met" if usage >= GOALS[k] else "NOT met"
        plain = by.get((ds, "vq", k))
        extra = ""
        if plain is not None:
            ratio = f"; {q} uses {usage / plain:.0f}x as many codes" if plain > 0 else ""
            extra = f"; plain vq {100 * plain:.1f}%{ratio}"
        lines.append(
            f"- {ds}, K={k}: {q} usage {100 * usage:.1f}% (goal >= {100 * GOALS[k]:.0f}%): "
            f"{verdict}{extra}"
        )
    return lines


def machine_line(args: argparse.Namespace, total_s: float) -> str:
    """Machine, threads and budget of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()} | steps {args.steps} x batch {args.batch_size} "
        f"(lr {args.lr}, ch {args.ch}) | eval {args.eval_images} images, LPIPS on "
        f"{args.lpips_images} | total {total_s / 60:.1f} min"
    )


# -- main ------------------------------------------------------------------------------------------
def _csv(kind: type, choices: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        items = [kind(t) for t in text.split(",") if t]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: pick from {list(choices or [])}")
        return items

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per model")
    # 64 images = 4096 encoder outputs per batch. k-means init and each dead-code restart draw
    # from one batch, so at K=16384 batch 32 needed ~150 steps to fill the codebook (95%),
    # batch 64 about 50 (see default_dead_code_steps).
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ch", type=int, default=16, help="base channels of encoder/decoder")
    p.add_argument("--eval-images", type=int, default=4096, help="held-out images per dataset")
    p.add_argument("--lpips-images", type=int, default=256, help="of those, scored by LPIPS")
    p.add_argument("--datasets", type=_csv(str, DATASETS), default=list(DATASETS))
    p.add_argument("--quantizers", type=_csv(str, QUANTIZERS), default=list(QUANTIZERS))
    p.add_argument("--sizes", type=_csv(int, sorted(FSQ_LEVELS)), default=list(SIZES))
    p.add_argument(
        "--dead-code-steps",
        type=int,
        default=None,
        help="vq-l2 restart window (default: 3K / (batch * 64) steps, see the source)",
    )
    p.add_argument("--dead-code-threshold", type=float, default=1.0)
    p.add_argument("--no-photos", action="store_true", help="skip the skimage photos")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_images < 1:
        p.error("--steps, --batch-size and --eval-images must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Train and evaluate every (dataset, quantizer, K); print the tables; return the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    lpips = LPIPS.from_pretrained() if lpips_available() and args.lpips_images > 0 else None
    codes_per_image = (32 // 4) ** 2
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tokenizer_quality_") as runs_dir:
        for ds in args.datasets:
            train_set, held_out, channels = datasets(ds, args.eval_images)
            pics = None if args.no_photos else photos(gray=channels == 1)
            for q in args.quantizers:
                for k in args.sizes:
                    window = args.dead_code_steps or default_dead_code_steps(
                        k, args.batch_size, codes_per_image
                    )
                    qcfg = quantizer_config(q, k, window, args.dead_code_threshold)
                    torch.manual_seed(args.seed)  # same initial weights for every variant
                    tok = registry.build("tokenizer", tokenizer_config(channels, qcfg, args.ch))
                    t0 = time.perf_counter()
                    logs = train(tok, train_set, args, f"{ds}-{q}-{k}", Path(runs_dir))
                    t1 = time.perf_counter()
                    r = Result(ds, q, k, evaluate(tok, held_out, lpips, args.lpips_images))
                    r.metrics.update(
                        rec_loss=logs.get("rec_loss", float("nan")),
                        train_s=t1 - t0,
                        eval_s=time.perf_counter() - t1,
                    )
                    if pics is not None:
                        r.photos = evaluate_photos(tok, pics, lpips)
                    results.append(r)
                    m = r.metrics
                    print(
                        f"[{ds} {q} K={k}] psnr {m['psnr']:.2f} usage {100 * m['usage']:.1f}% "
                        f"train {m['train_s']:.0f}s eval {m['eval_s']:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
    total = time.perf_counter() - t_start
    print(f"\n## Tokenizer quality after {args.steps} steps (held-out images)\n")
    print(quality_table(results))
    if not args.no_photos and results:
        print(f"\n## skimage photos ({PHOTO_SIZE}x{PHOTO_SIZE}): PSNR dB / LPIPS\n")
        print(photo_table(results))
    lines = goal_lines(results)
    if lines:
        print("\n## Usage goals (vq-l2, vq-l2-res)\n")
        print("\n".join(lines))
    if lpips is None:
        print("\nLPIPS: n/a (no VGG16/LPIPS weights on disk; see latentgen.metrics.lpips)")
    print("\n" + machine_line(args, total))
    return results


if __name__ == "__main__":
    main()
