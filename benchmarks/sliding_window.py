"""Sliding-window sampling: tokens/s and peak memory of ``exact`` vs ``cached``, and their NLL.

Speed: a 64x64 code grid (1024x1024 pixels at f=16) from a transformer prior with a 16x16
window (block_size 256), vocab 1024, top-k 100, batch 1, configs s (4 layers, 8 heads, 256
wide) and m (8, 8, 512). Each (config, mode) runs in a fresh subprocess so that its peak memory
(CPU: the process's peak resident size; CUDA: torch.cuda.max_memory_allocated) is its own. The
speed-up is in tokens per CPU second, which a shared machine's load does not swing. ``exact``
costs one window forward per code, so by default it is timed on a uniform subset of the codes
(every k-th window placement in generation order, ``--exact-every k``) and tokens/s is that
subset's rate; ``--exact-every 1`` times the whole grid. The weights are untrained: speed does
not depend on them.

Whole generation: a 64x64 code grid drawn through ``Pipeline`` (prior s, ``cached``) and decoded
by the decoder of taming's f=16 VQGAN (1024x1024 pixels), in a fresh process, tiled (the
default ``blend`` mode), with ``--exact-decode`` also tiled in ``exact`` mode, and with
``--whole-decode`` whole; the peak is the process's maximum resident size. Then the largest and
mean difference between the tiled (both modes) and the whole decode of random codes: a
``--diff-grid`` grid (default 24) with ``--diff-tile`` tiles (default 12) for the taming-sized
decoder, and, with ``--vqgan DIR`` (a trained tokenizer component, e.g. the demo's
``out/demo/runs/shapes-vqgan/final``), a 64x64 grid in 16-code tiles of that tokenizer.

A prior without a KV cache (``--cacheless``): an untrained PixelSNAIL of the size of
``compare-shapes-table1.yaml``'s (vocab 32, an 8x8 window, guidance 3, so each window has a
null row too) draws a ``--cacheless-grid`` grid in ``cached`` mode, its wavefront's windows run
one forward each (``FullForwardDecoder.max_windows = 1``, as before they were batched) and
stacked into one forward per wave (the default).

NLL: the same window modes score held-out large grids made from images: rendered ``shapes``
scenes (``--held-out`` of them) and real photos (``photos``: four of scikit-image's sample
photos, the prior trained on sixteen others), each at 256x256 pixels, tokenized by the
zero-training ``toy.palette`` tokenizer (k-means palette of 4x4 patch means, f=4, so a 64x64
code grid per image); a small prior (2 layers, 4 heads, 128 wide, a 16x16 window) is trained
on random 16x16 crops of the training grids, then ``Prior.window_log_prob`` scores the held-out
64x64 grids in ``exact`` and ``cached`` mode (both bands; and the plain ``log_prob`` of their
top-left 16x16 crops, for reference).

    OMP_NUM_THREADS=2 python benchmarks/sliding_window.py
    python benchmarks/sliding_window.py --configs s --skip-nll
    python benchmarks/sliding_window.py --skip-speed --skip-generate --nll-data photos
    python benchmarks/sliding_window.py --skip-speed --skip-nll --whole-decode --exact-decode
    python benchmarks/sliding_window.py --skip-speed --skip-nll --skip-generate \
        --vqgan out/demo/runs/shapes-vqgan/final
    python benchmarks/sliding_window.py --skip-speed --skip-nll --skip-generate --cacheless
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from _child import run_child  # benchmarks/_child.py (this script's folder is on sys.path)

CONFIGS = {
    "s": {"n_layer": 4, "n_head": 8, "n_embd": 256},
    "m": {"n_layer": 8, "n_head": 8, "n_embd": 512},
}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_speed(args: argparse.Namespace, name: str, mode: str) -> dict[str, float]:
    """Time one windowed draw of the grid (``exact``: every k-th placement) in this process."""
    import torch

    from latentgen.priors import window
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    side = args.window
    config = TransformerPriorConfig(vocab_size=1024, block_size=side * side, **CONFIGS[name])
    model = TransformerPrior(config).to(device).eval()
    sampler = SamplerConfig(top_k=100, window=mode)
    every = args.exact_every if mode == "exact" else 1
    full_plan = window.plan_windows
    counted: list[int] = []

    def subset(*a, **k):  # type: ignore[no-untyped-def]
        placements = full_plan(*a, **k)[::every]
        counted.append(sum(len(p.targets) for p in placements))
        return placements

    window.plan_windows = subset  # type: ignore[assignment]  # sample_windowed looks it up here

    def go(grid: tuple[int, int]) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        model.sample(grid=grid, sampler=sampler, generator=gen, num_samples=1)
        if device.type == "cuda":
            torch.cuda.synchronize()

    go((side + side // 2, side + side // 2))  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counted.clear()
    t0, c0 = time.perf_counter(), time.process_time()
    go((args.grid, args.grid))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    # CUDA: the peak of the timed draw; CPU: the peak resident size of the whole process
    # (interpreter, torch, weights, cache and codes), an upper bound on what the draw needs.
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _maxrss_mib()
    n = counted[-1]
    return {
        "codes": n,
        "seconds": seconds,
        "tok_s": n / seconds,
        "tok_cpu_s": n / cpu,
        "peak_mib": peak,
    }


def run_cacheless(args: argparse.Namespace, max_windows: int) -> dict[str, float]:
    """Time one cached-mode draw of a cache-less prior, ``max_windows`` windows a forward."""
    import torch

    from latentgen.conditioners.base import Conditioning
    from latentgen.priors.pixelsnail import PixelSNAILConfig, PixelSNAILPrior
    from latentgen.priors.window import FullForwardDecoder
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    config = PixelSNAILConfig(
        vocab_size=32, channel=64, n_block=2, n_res_block=2, res_channel=64, n_head=4,
        key_channel=32, value_channel=64, max_height=8, max_width=8,
        conditions={"label": {"vocab_size": 6}}, cond_dropout=0.1,
    )  # fmt: skip
    model = PixelSNAILPrior(config).to(args.device).eval()
    FullForwardDecoder.max_windows = max_windows
    sampler = SamplerConfig(window="cached", guidance_scale=3.0)
    label = {"label": Conditioning(torch.tensor([[1]], device=args.device), vocab_size=6)}
    grid = (args.cacheless_grid, args.cacheless_grid)
    t0, c0 = time.perf_counter(), time.process_time()
    model.sample(label, grid=grid, sampler=sampler, generator=torch.Generator().manual_seed(0))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = grid[0] * grid[1]
    return {"codes": n, "seconds": seconds, "tok_s": n / seconds, "tok_cpu_s": n / cpu}


# The decoder of taming's f=16 ImageNet VQGAN (ch 128, ch_mult 1,1,2,2,4, 2 ResNet blocks,
# attention at 16x16, z 256); untrained: memory and time do not depend on the weights.
TAMING_F16 = {
    "type": "vqgan",
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "z_channels": 256,
    "resolution": 256,
    "quantizer": {"type": "vq", "codebook_size": 1024, "dim": 256},
    "perceptual_weight": 0.0,
}


def run_generate(args: argparse.Namespace, decode: str) -> dict[str, float]:
    """One whole ``grid x grid`` generation through ``Pipeline``: cached window + decoding
    (``decode``: ``blend`` or ``exact`` tiles, or ``whole``)."""
    import torch

    from latentgen import Pipeline, registry
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    side = args.window
    config = TransformerPriorConfig(vocab_size=1024, block_size=side * side, **CONFIGS["s"])
    tok = registry.build("tokenizer", TAMING_F16).eval()
    sampler = SamplerConfig(window="cached", top_k=100)
    pipe = Pipeline(tok, TransformerPrior(config).eval(), sampler=sampler)
    px = args.grid * tok.downsample
    gen = torch.Generator().manual_seed(0)
    before = _maxrss_mib()
    t0 = time.perf_counter()
    codes = pipe.sample_codes(1, size=px, generator=gen)
    t1 = time.perf_counter()
    after_sampling = _maxrss_mib()
    if decode == "whole":
        image = pipe.decode(codes, tiled=False)
    else:
        image = pipe.decode(codes, tiled=True, tile_mode=decode)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    assert image.shape == (1, 3, px, px)
    return {
        "pixels": px,
        "startup_mib": before,
        "sampling_peak_mib": after_sampling,
        "peak_mib": _maxrss_mib(),
        "sampling_s": t1 - t0,
        "decode_s": t2 - t1,
    }


def run_tile_difference(args: argparse.Namespace, which: str) -> dict[str, float]:
    """Max and mean |tiled - whole| per tile mode, and the time of each decode, on random codes:
    ``which`` is ``taming`` (the untrained f=16 decoder) or ``vqgan`` (``--vqgan DIR``)."""
    import torch

    from latentgen import registry
    from latentgen.artifact import load_component
    from latentgen.tokenizers.tiling import decode_tiled

    torch.manual_seed(0)
    if which == "vqgan":
        tok = load_component(args.vqgan, kind="tokenizer").eval()
        grid, tile = 64, 16
    else:
        tok = registry.build("tokenizer", TAMING_F16).eval()
        grid, tile = args.diff_grid, args.diff_tile
    codes = torch.randint(0, tok.vocab_size, (1, grid, grid))
    out: dict[str, float] = {"grid": grid, "tile": tile}
    with torch.no_grad():
        t0 = time.process_time()
        whole = tok.decode(codes)
        out["whole_cpu_s"] = time.process_time() - t0
        out["whole_std"] = float(whole.std())
        for mode in ("blend", "exact"):
            t0 = time.process_time()
            tiled = decode_tiled(tok, codes, tile, overlap=tile // 4, mode=mode)  # type: ignore[arg-type]
            out[f"{mode}_cpu_s"] = time.process_time() - t0
            diff = (tiled - whole).abs()
            out[f"{mode}_max"], out[f"{mode}_mean"] = float(diff.max()), float(diff.mean())
    return out


# scikit-image's sample photos (benchmarks/_photos.py): four held out, the others to train on
HELD_OUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TRAIN_PHOTOS = (
    "brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "hubble_deep_field",
    "ihc", "microaneurysms", "moon", "motorcycle_left", "motorcycle_right", "page", "retina",
    "text",
)  # fmt: skip


def run_nll(args: argparse.Namespace, data: str) -> dict[str, float]:
    """Train a small windowed prior on palette codes of ``data`` (``shapes``: rendered shapes
    scenes; ``photos``: scikit-image's photos); score held-out grids in each mode."""
    import torch

    from latentgen import registry
    from latentgen.data.shapes import ShapesConfig, ShapesDataset
    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig

    torch.manual_seed(0)
    side, f = args.window, 4
    px = args.grid * f

    def images(n: int, seed: int) -> torch.Tensor:
        data = ShapesDataset(ShapesConfig(size=n, image_size=px, seed=seed))
        return torch.stack([data[i]["image"] for i in range(n)])

    if data == "photos":
        from _photos import load_photos

        train_images, held_images = (load_photos(n, px) for n in (TRAIN_PHOTOS, HELD_OUT_PHOTOS))
    else:
        train_images, held_images = images(args.train_images, 0), images(args.held_out, 10**6)
    tok = registry.build("tokenizer", {"type": "toy.palette", "vocab_size": 32, "downsample": f})
    tok.fit(train_images)
    with torch.no_grad():
        train = tok.encode(train_images)  # [N, grid, grid]
        held = tok.encode(held_images)
    cfg = TransformerPriorConfig(
        vocab_size=32, block_size=side * side, n_layer=2, n_head=4, n_embd=128
    )
    prior = TransformerPrior(cfg)
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.train_steps)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        r, c = (torch.randint(0, args.grid - side + 1, (2,), generator=gen)).tolist()
        loss = prior.loss(train[idx, r : r + side, c : c + side])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    prior.eval()
    n_codes = held[0].numel()
    out: dict[str, float] = {"train_loss": float(loss.detach()), "train_seconds": train_s}
    with torch.no_grad():
        crops = held[:, :side, :side]
        out["plain_16x16"] = float(-prior.log_prob(crops).mean() / crops[0].numel())
        runs = [("exact", "exact", "middle"), ("cached", "cached", "middle")]
        for key, mode, band in [*runs, ("cached_bottom", "cached", "bottom")]:
            t0 = time.perf_counter()
            lp = prior.window_log_prob(held, window=mode, window_band=band)  # type: ignore[arg-type]
            out[key] = float(-lp.mean() / n_codes)
            out[f"{key}_seconds"] = time.perf_counter() - t0
    return out


def _child(args: argparse.Namespace, one: str) -> dict[str, float] | None:
    """Run ``--one ONE`` in a fresh process (its own peak memory); None when it failed."""
    opts = ("device", "grid", "window", "exact_every", "diff_grid", "diff_tile", "vqgan")
    r = run_child(__file__, "--one", one, args, opts)
    if isinstance(r, str):
        print(f"  {one} failed: {r}")
        return None
    return r


def main() -> None:
    """Run each (config, mode) speed measurement in its own process, then the NLL comparison."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="s,m", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--grid", type=int, default=64, help="code grid side")
    p.add_argument("--window", type=int, default=16, help="window side the prior models")
    p.add_argument(
        "--exact-every", type=int, default=16, help="time exact on every k-th code (1: all)"
    )
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-nll", action="store_true")
    p.add_argument(
        "--nll-data", default="shapes,photos", help="comma list of: shapes, photos (NLL data)"
    )
    p.add_argument(
        "--skip-generate", action="store_true", help="skip the whole-generation memory figure"
    )
    p.add_argument(
        "--whole-decode", action="store_true", help="also run the generation with a whole decode"
    )
    p.add_argument(
        "--exact-decode", action="store_true", help="also run the generation with exact tiles"
    )
    p.add_argument(
        "--diff-grid", type=int, default=24, help="code grid of the taming tiled-vs-whole check"
    )
    p.add_argument("--diff-tile", type=int, default=12, help="tile of that check")
    p.add_argument("--vqgan", default="", help="a trained tokenizer dir for the check too")
    p.add_argument("--train-images", type=int, default=48)
    p.add_argument("--held-out", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cacheless", action="store_true", help="also time a prior without a KV cache")
    p.add_argument("--cacheless-grid", type=int, default=32, help="its code grid side")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "config,mode"
    args = p.parse_args()

    if args.one:
        name, mode = args.one.split(",")
        if name == "generate":
            print(json.dumps(run_generate(args, mode)))
        elif name == "difference":
            print(json.dumps(run_tile_difference(args, mode)))
        elif name == "cacheless":
            print(json.dumps(run_cacheless(args, int(mode))))
        else:
            print(json.dumps(run_speed(args, name, mode)))
        return
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"device={args.device} OMP_NUM_THREADS={threads} grid={args.grid}x{args.grid} "
        f"window={args.window}x{args.window} vocab=1024 top_k=100 batch=1"
    )
    if not args.skip_speed:
        mem = "peak MiB" if args.device.startswith("cuda") else "maxrss MiB"
        print(
            f"{'config':>6} {'mode':>7} {'codes':>6} {'seconds':>8} {'tok/s':>8} "
            f"{'tok/cpu-s':>9} {mem:>12} {'speed-up':>8}"
        )
        for name in args.configs.split(","):
            rates = {}
            for mode in ("exact", "cached"):
                opts = ("device", "grid", "window", "exact_every")
                r = run_child(__file__, "--one", f"{name},{mode}", args, opts)
                if isinstance(r, str):
                    print(f"{name:>6} {mode:>7}  failed: {r}")
                    continue
                # CPU seconds, not wall time: on a shared machine the wall clock swings with the
                # neighbours' load (run with OMP_NUM_THREADS=1 so CPU time is one core's).
                rates[mode] = r["tok_cpu_s"]
                up = f"{r['tok_cpu_s'] / rates['exact']:.1f}x" if "exact" in rates else ""
                print(
                    f"{name:>6} {mode:>7} {r['codes']:>6} {r['seconds']:>8.2f} "
                    f"{r['tok_s']:>8.1f} {r['tok_cpu_s']:>9.1f} {r['peak_mib']:>12.1f} "
                    f"{up:>8}",
                    flush=True,
                )
        if args.exact_every > 1:
            print(
                f"(exact timed on every {args.exact_every}th code of the grid; its tok/s is "
                "that subset's rate, standing for the whole grid)"
            )
    if args.cacheless:
        side = args.cacheless_grid
        print(
            f"a prior without a KV cache (PixelSNAIL, 8x8 window, vocab 32, guidance 3), "
            f"cached mode, {side}x{side} codes, batch 1"
        )
        print(
            f"{'windows/forward':>15} {'seconds':>8} {'tok/s':>8} {'tok/cpu-s':>9} {'speed-up':>8}"
        )
        first = None
        for windows in (1, 64):
            r = run_child(
                __file__, "--one", f"cacheless,{windows}", args, ("device", "cacheless_grid")
            )
            if isinstance(r, str):
                print(f"{windows:>15}  failed: {r}")
                continue
            first = first or r["tok_cpu_s"]
            print(
                f"{windows:>15} {r['seconds']:>8.2f} {r['tok_s']:>8.1f} {r['tok_cpu_s']:>9.1f} "
                f"{r['tok_cpu_s'] / first:>7.1f}x",
                flush=True,
            )
    if not args.skip_generate:
        print(
            f"whole generation, {args.grid}x{args.grid} codes -> "
            f"{args.grid * 16}x{args.grid * 16} px: prior s, cached window, taming f=16 VQGAN "
            "decoder (untrained), batch 1, each in a fresh process (peak = max RSS)"
        )
        decodes = ["blend"] + ["exact"] * args.exact_decode + ["whole"] * args.whole_decode
        for decode in decodes:
            r = _child(args, f"generate,{decode}")
            if r is None:
                continue
            print(
                f"  {decode:>5} decode: sampling {r['sampling_s']:.1f}s, decoding "
                f"{r['decode_s']:.1f}s; peak {r['peak_mib']:.0f} MiB (after start-up and "
                f"weights {r['startup_mib']:.0f} MiB, after sampling {r['sampling_peak_mib']:.0f})"
            )
    for which in ["taming"] + ["vqgan"] * bool(args.vqgan):
        if args.skip_generate and which == "taming":
            continue
        r = _child(args, f"difference,{which}")
        if r is None:
            continue
        name = "taming f=16 decoder (untrained)" if which == "taming" else args.vqgan
        print(
            f"  tiled vs whole decode, {name}, {r['grid']}x{r['grid']} random codes, tile "
            f"{r['tile']} (whole decode's std {r['whole_std']:.3f}, {r['whole_cpu_s']:.1f} CPU s):"
        )
        for mode in ("blend", "exact"):
            print(
                f"    {mode:>5}: max |diff| {r[f'{mode}_max']:.2e}, mean {r[f'{mode}_mean']:.2e}, "
                f"{r[f'{mode}_cpu_s']:.1f} CPU s"
            )
    for data in [] if args.skip_nll else args.nll_data.split(","):
        r = run_nll(args, data)
        what = {
            "shapes": f"{args.held_out} held-out rendered shapes scenes",
            "photos": f"the photos {', '.join(HELD_OUT_PHOTOS)} (trained on {len(TRAIN_PHOTOS)} "
            "other scikit-image photos)",
        }[data]
        print(
            f"NLL, nats/code, {what}, {args.grid}x{args.grid} codes each ({args.grid * 4}px, "
            f"toy.palette K=32 f=4; prior 2x4x128 trained {args.train_steps} steps on 16x16 "
            f"crops in {r['train_seconds']:.0f}s, last loss {r['train_loss']:.3f}):"
        )
        print(f"  plain log_prob on 16x16 crops: {r['plain_16x16']:.4f}")
        names = {
            "exact": "exact",
            "cached": "cached (band: middle)",
            "cached_bottom": "cached (band: bottom)",
        }
        for key, name in names.items():
            versus = "" if key == "exact" else f", {100 * (r[key] / r['exact'] - 1):+.2f}% vs exact"
            print(f"  {name:>21}: {r[key]:.4f}  ({r[f'{key}_seconds']:.1f}s to score{versus})")


if __name__ == "__main__":
    main()
