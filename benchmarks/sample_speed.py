"""Sampling speed of the priors: ms/step, ops/step, tokens/s and peak memory.

Unconditional sampling of 256 new codes (a 16x16 grid) after the one start token, vocab 1024,
top-k 100, fp32, for two model sizes (s = 4 layers / 8 heads / 256 wide, m = 8 / 8 / 512) at
batch 1 and 8. ``cached`` is the KV-cached decode loop (one token per step); ``uncached``
re-runs the whole sequence per code and is printed as the yardstick from the same run, since
absolute figures drift with the load of a shared machine. PixelSNAIL rows (``--kinds
pixelsnail``; s = 2 blocks of 64 channels, m = 4 of 128, as in benchmarks/prior_step.py) compare
its activation cache with one cropped forward per code. Masked-prior rows (``--kinds masked``,
the transformer's s and m shapes, bidirectional) fill the grid in T passes (modes ``T=8``,
``T=12``; ``T=8+2`` adds 2 refinement passes of 3 passes each); ``--tokens 1024`` gives the
32x32 grid where the GPT prior's serial cost grows.

    LG_THREADS=2 lg python benchmarks/sample_speed.py
    lg python benchmarks/sample_speed.py --configs s --batches 1 --modes cached --rounds 5
    python benchmarks/sample_speed.py --device cuda --dtype bf16 --compile

Columns:
- ms/step: wall time of one sequential step: one code for every sample of the batch, or one
  masked-prior pass over the whole grid;
- ops/step: aten operators dispatched per step (torch.profiler over a short draw, sampling
  included), the per-op overhead that dominates a small decode step: top-level calls / all
  calls including the ones nested inside other ops (views are cheap, kernels are not);
- tok/s and tok/cpu-s: codes per wall second and per CPU second of the sampling process (on a
  shared machine wall time swings with the neighbours; CPU time less so);
- peak: CPU, growth of the process's max RSS over the timed runs; CUDA, max allocated;
- passes: sequential steps of one draw (h*w, or the masked prior's T + 3K); x gpt: the KV-cached
  transformer's time over this row's, at the same config and batch.

Each (config, batch, mode) runs in a fresh subprocess, so its peak memory is its own; the rows
are measured in ``--rounds`` alternating rounds and the best round counts. The load average is
printed beside each row. Extra rows (other priors) register in ``ROWS``.

Side by side with taming-transformers (``--kinds taming``, part of the default run): Taming
Transformers' own minGPT (``taming/modules/transformer/mingpt.py``) with its KV-cached sampler
``sample_with_past``, built with the same shapes (s, m; vocab 1024; 257 positions; fp32; other
weights, same shapes), draws 256 codes after one start token with top-k 100, and ours does the
same with its default options. Per config and batch one process builds both, warms each up,
then times ``--side-runs`` (3) draws of each, alternating ours and theirs, so both see the same
machine load. Printed: best and median ms/step of each, theirs/ours of the best draws and the
median of the per-round ratios, the CPU-time ratio, and the torch threads each ran on (ours
picks one thread for small steps, ``threads="auto"``; theirs runs on torch's setting, which
``OMP_NUM_THREADS`` / ``LG_THREADS`` sets). taming is not a dependency: install the PyPI wheel
beside the project and point at it,

    pip install --no-deps --target /some/dir taming-transformers-rom1504==0.0.6
    LG_THREADS=1 lg python benchmarks/sample_speed.py --kinds taming --taming-path /some/dir

(without it the benchmark prints that line and our own rows). Its mingpt.py imports
``transformers.top_k_top_p_filtering``, gone from current transformers; a one-function stand-in
written after transformers 4.3's is put in ``sys.modules`` when the real one is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from _child import run_child  # benchmarks/_child.py (this script's folder is on sys.path)

CONFIGS = {
    "s": {"n_layer": 4, "n_head": 8, "n_embd": 256},
    "m": {"n_layer": 8, "n_head": 8, "n_embd": 512},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build_transformer(name: str, args: argparse.Namespace) -> Any:
    """The transformer prior of config ``name`` on ``args.device`` / ``args.dtype``."""
    import torch

    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig

    torch.manual_seed(0)
    config = TransformerPriorConfig(vocab_size=1024, block_size=args.tokens, **CONFIGS[name])
    model = TransformerPrior(config)
    return model.to(device=torch.device(args.device), dtype=getattr(torch, DTYPES[args.dtype]))


def transformer_sampler(
    name: str, batch: int, mode: str, args: argparse.Namespace
) -> Callable[[tuple[int, int]], object]:
    """A function drawing ``batch`` grids of a given size with the transformer (``mode``:
    cached or uncached)."""
    import torch

    from latentgen.specs import SamplerConfig

    model = build_transformer(name, args)
    device = torch.device(args.device)
    options: dict[str, Any] = {"use_cache": mode != "uncached"}
    if args.compile and mode != "uncached":
        options["compile"] = True
    sampler = SamplerConfig(top_k=100)

    def go(grid: tuple[int, int]) -> object:
        gen = torch.Generator(device=device).manual_seed(0)
        return model.sample(grid=grid, sampler=sampler, generator=gen, num_samples=batch, **options)

    return go


PIXELSNAIL = {  # benchmarks/prior_step.py's small and medium
    "s": dict(channel=64, res_channel=64, n_block=2, n_res_block=2, n_head=4,
              key_channel=64, value_channel=64),
    "m": dict(channel=128, res_channel=128, n_block=4, n_res_block=2, n_head=8,
              key_channel=128, value_channel=128),
}  # fmt: skip


def pixelsnail_sampler(
    name: str, batch: int, mode: str, args: argparse.Namespace
) -> Callable[[tuple[int, int]], object]:
    """Like ``transformer_sampler`` for PixelSNAIL (cached: ``pixelsnail_cache``; uncached: one
    cropped forward per code)."""
    import torch

    from latentgen.priors.pixelsnail import PixelSNAILConfig, PixelSNAILPrior
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    side = int(args.tokens**0.5)
    config = PixelSNAILConfig(
        vocab_size=1024, max_height=side, max_width=side, dropout=0.0, **PIXELSNAIL[name]
    )
    device = torch.device(args.device)
    model = PixelSNAILPrior(config).to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))
    sampler = SamplerConfig(top_k=100)

    def go(grid: tuple[int, int]) -> object:
        gen = torch.Generator(device=device).manual_seed(0)
        return model.sample(
            grid=grid, sampler=sampler, generator=gen, num_samples=batch, use_cache=mode == "cached"
        )

    return go


def masked_sampler(
    name: str, batch: int, mode: str, args: argparse.Namespace
) -> Callable[[tuple[int, int]], object]:
    """Like ``transformer_sampler`` for the masked prior of the same width and depth; ``mode``
    "T=12" is 12 passes (fewer on the small grids of the warm-up and the op count), "T=8+2"
    8 passes and 2 refinement passes (``SamplerConfig.refine_steps``, 3 passes each). The
    returned draw has ``passes``: its sequential forward passes on the full grid."""
    import torch

    from latentgen.priors.masked import MaskedPrior, MaskedPriorConfig
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    t, _, k = mode.removeprefix("T=").partition("+")
    steps, refine = int(t), int(k or 0)
    config = MaskedPriorConfig(
        vocab_size=1024, block_size=args.tokens, steps=min(steps, args.tokens), **CONFIGS[name]
    )
    device = torch.device(args.device)
    model = MaskedPrior(config).to(device=device, dtype=getattr(torch, DTYPES[args.dtype]))

    def go(grid: tuple[int, int]) -> object:
        gen = torch.Generator(device=device).manual_seed(0)
        t = min(steps, grid[0] * grid[1])
        sampler = SamplerConfig(top_k=100, steps=t, refine_steps=refine)
        return model.sample(grid=grid, sampler=sampler, generator=gen, num_samples=batch)

    go.passes = steps + 3 * refine  # type: ignore[attr-defined]
    return go


#: Row kinds: name -> (configs, modes, factory(config, batch, mode, args) -> draw(grid)).
#: Other priors add their rows here. A draw with a ``passes`` attribute runs that many
#: sequential passes per grid (the masked prior); otherwise one per code.
ROWS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., Any]]] = {
    "transformer": (("s", "m"), ("cached", "uncached"), transformer_sampler),
    "pixelsnail": (("s", "m"), ("cached", "uncached"), pixelsnail_sampler),
    "masked": (("s", "m"), ("T=8", "T=12", "T=8+2"), masked_sampler),
}


# -- side by side with taming-transformers' own KV-cached minGPT ---------------------------------
TAMING_PIP = (
    "pip install --no-deps --target DIR taming-transformers-rom1504==0.0.6  "
    "(then --taming-path DIR)"
)


def _top_k_top_p_filtering(
    logits: Any,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> Any:
    """Stand-in for ``transformers.top_k_top_p_filtering`` (transformers 4.3, which taming pins),
    written after its documented behaviour: in place, top-k by the k-th largest logit, then
    nucleus filtering only when ``top_p < 1``."""
    import torch

    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = filter_value
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the code that crosses top_p
        remove[..., :min_tokens_to_keep] = False
        logits[remove.scatter(1, order, remove)] = filter_value
    return logits


def import_taming(path: str | None) -> Any:
    """taming's ``mingpt`` module (from ``path`` when given, else an installed ``taming``), or
    None when it is not found.

    taming's mingpt.py imports ``transformers.top_k_top_p_filtering``, which transformers 4.39
    removed (and transformers is not a dependency of ours): when the import would fail, a
    one-function stand-in module is put in ``sys.modules`` first. It only changes where that
    function comes from, not taming's model or sampling loop.
    """
    import importlib
    import types

    if path:
        sys.path.insert(0, path)
    try:
        from transformers import top_k_top_p_filtering  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("transformers")
        stand_in.top_k_top_p_filtering = _top_k_top_p_filtering  # type: ignore[attr-defined]
        sys.modules["transformers"] = stand_in
    try:
        return importlib.import_module("taming.modules.transformer.mingpt")
    except ImportError:
        return None


def side_by_side(args: argparse.Namespace, name: str, batch: int) -> dict:
    """Ours (KV-cached, default options) and taming's ``sample_with_past`` on minGPT of the same
    shapes, alternating in this process: ``args.side_runs`` timed draws each (after one warm-up
    draw each), wall and CPU seconds per draw."""
    import torch

    mingpt = import_taming(args.taming_path)
    if mingpt is None:
        raise SystemExit("taming not found: " + TAMING_PIP)
    ours = transformer_sampler(name, batch, "cached", args)
    side = int(args.tokens**0.5)
    grid = (side, args.tokens // side)
    n = grid[0] * grid[1]
    torch.manual_seed(0)
    # One start token then n codes: n + 1 positions, as the prior's SOS + n codes.
    theirs_model = mingpt.GPT(vocab_size=1024, block_size=n + 1, **CONFIGS[name]).eval()
    theirs_model.to(device=torch.device(args.device), dtype=getattr(torch, DTYPES[args.dtype]))

    def theirs(steps: int) -> object:
        start = torch.zeros(batch, 1, dtype=torch.long, device=args.device)  # the start token
        with torch.no_grad():  # as taming's sample_fast.py calls it: top-k, no nucleus
            return mingpt.sample_with_past(start, theirs_model, steps, top_k=100, top_p=1.0)

    def timed(fn: Callable[[], object]) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    ours((1, 8))
    theirs(8)
    res: dict[str, Any] = {"ours": [], "theirs": [], "ours_cpu": [], "theirs_cpu": []}
    for _ in range(args.side_runs):
        for who, fn in (("ours", lambda: ours(grid)), ("theirs", lambda: theirs(n))):
            wall, cpu = timed(fn)
            res[who].append(wall)
            res[who + "_cpu"].append(cpu)
    from latentgen.priors.threads import SMALL_STEP_FLOP

    c = CONFIGS[name]["n_embd"]  # ours picks its thread count as decode_threads("auto") does
    small = args.device == "cpu" and batch * c * 4 * c * 2 < SMALL_STEP_FLOP
    res["threads"] = f"{1 if small else torch.get_num_threads()}/{torch.get_num_threads()}"
    res["n"], res["load"] = n, os.getloadavg()[0]
    return res


def print_side_by_side(args: argparse.Namespace) -> None:
    """Run ``side_by_side`` for each config and batch in its own process and print the table;
    without taming, say how to get it."""
    if import_taming(args.taming_path) is None:
        print(
            f"\nside by side with taming-transformers' minGPT skipped, taming not found: "
            f"{TAMING_PIP}"
        )
        return
    print(
        f"\nside by side with taming-transformers' KV-cached minGPT (sample_with_past), "
        f"{args.side_runs} alternating draws each, best and median ms/step, "
        f"x = theirs / ours, threads = ours/theirs:"
    )
    print(
        f"{'cfg':>3} {'batch':>5} {'ours best':>9} {'med':>7} {'theirs best':>11} {'med':>7} "
        f"{'x best':>6} {'x med':>6} {'x cpu':>6} {'threads':>7} {'load':>5}"
    )
    for name in args.configs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            opts = ("device", "dtype", "tokens", "side_runs", "taming_path")
            r = run_child(__file__, "--one-side", f"{name},{batch}", args, opts)
            if isinstance(r, str):
                print(f"{name:>3} {batch:>5}  failed: {r}")
                continue
            ms = {k: sorted(1000 * t / r["n"] for t in r[k]) for k in ("ours", "theirs")}
            med = {k: v[len(v) // 2] for k, v in ms.items()}
            ratios = sorted(t / o for o, t in zip(r["ours"], r["theirs"]))  # per round
            cpu = min(r["theirs_cpu"]) / min(r["ours_cpu"])
            print(
                f"{name:>3} {batch:>5} {ms['ours'][0]:>9.2f} {med['ours']:>7.2f} "
                f"{ms['theirs'][0]:>11.2f} {med['theirs']:>7.2f} "
                f"{ms['theirs'][0] / ms['ours'][0]:>6.2f} {ratios[len(ratios) // 2]:>6.2f} "
                f"{cpu:>6.2f} {r['threads']:>7} {r['load']:>5.1f}",
                flush=True,
            )


def _ops_per_step(
    go: Callable[[tuple[int, int]], object], steps: int, passes: int | None = None
) -> tuple[float, float]:
    """Aten ops per decode step, counted by torch.profiler over a ``steps``-code draw of
    ``passes`` sequential passes (default: one per code): the top-level calls (what Python
    dispatches) and all of them (nested calls included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        go((1, steps))
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    n = passes or steps
    return len(top) / n, len(aten) / n


def run_one(args: argparse.Namespace, kind: str, name: str, batch: int, mode: str) -> dict:
    """Build, warm up, time ``args.repeats`` draws (best counts), count ops; one row's figures."""
    import torch

    device = torch.device(args.device)
    go = ROWS[kind][2](name, batch, mode, args)
    side = int(args.tokens**0.5)
    grid = (side, args.tokens // side)
    n_tokens = grid[0] * grid[1]

    def timed(g: tuple[int, int]) -> None:
        go(g)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up: kernels and allocator; with --compile the whole grid, so that every shape the
    # timed runs meet is compiled before the clock starts.
    timed(grid if args.compile else (1, 8))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _maxrss_mib()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        timed(grid)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _maxrss_mib() - rss0
    probe = min(32, n_tokens)
    passes = int(getattr(go, "passes", n_tokens))  # sequential passes of one full-grid draw
    ops, all_ops = _ops_per_step(go, probe, min(passes, probe))
    return {
        "passes": passes,
        "ms_step": 1000 * best / passes,
        "ops_step": ops,
        "all_ops_step": all_ops,
        "tok_s": batch * n_tokens / best,
        "tok_cpu_s": batch * n_tokens / best_cpu,
        "seconds": best,
        "peak_mib": peak,
    }


def main() -> None:
    """Parse options, run every row in its own process in alternating rounds, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument(
        "--kinds",
        default=",".join((*ROWS, "taming")),
        help="comma list of: " + ", ".join(ROWS) + ", taming (the side by side)",
    )
    p.add_argument("--configs", default="s,m", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default=None, help="comma list; default: each kind's modes")
    p.add_argument("--tokens", type=int, default=256, help="codes per sample (a square grid)")
    p.add_argument("--repeats", type=int, default=1, help="timed draws per process (best counts)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (best counts)")
    p.add_argument("--json", help="also write the rows as JSON lines to this file")
    p.add_argument(
        "--taming-path",
        help="directory holding taming-transformers' `taming` package for the side by side "
        "(default: an installed one)",
    )
    p.add_argument("--side-runs", type=int, default=3, help="timed draws each in the side by side")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "kind,config,batch,mode"
    p.add_argument("--one-side", help=argparse.SUPPRESS)  # internal: "config,batch"
    args = p.parse_args()

    if args.one:
        kind, name, batch, mode = args.one.split(",")
        print(json.dumps(run_one(args, kind, name, int(batch), mode)))
        return
    if args.one_side:
        name, batch = args.one_side.split(",")
        print(json.dumps(side_by_side(args, name, int(batch))))
        return

    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"device={args.device} dtype={args.dtype} compile={args.compile} torch={torch.__version__} "
        f"OMP_NUM_THREADS={threads} cpus={os.cpu_count()} tokens={args.tokens} top_k=100 "
        f"vocab=1024"
    )
    rows = []
    kinds = args.kinds.split(",")
    for kind in (k for k in kinds if k != "taming"):
        configs, modes, _ = ROWS[kind]
        for name in (c for c in args.configs.split(",") if c in configs):
            for batch in (int(b) for b in args.batches.split(",")):
                for mode in args.modes.split(",") if args.modes else modes:
                    if mode in modes:
                        rows.append((kind, name, batch, mode))
    best: dict[tuple[Any, ...], dict[str, float]] = {}
    loads: dict[tuple[Any, ...], float] = {}
    for _ in range(args.rounds):
        for row in rows:
            opts = ("device", "dtype", "tokens", "repeats")
            extra = ["--compile"] if args.compile else []
            r = run_child(__file__, "--one", ",".join(map(str, row)), args, opts, extra)
            if isinstance(r, str):
                print(f"{' '.join(map(str, row))}  failed: {r}")
                continue
            # Progress on stderr as rows finish (a full run takes long on a busy machine).
            print(
                f"  {' '.join(map(str, row))}: {r['ms_step']:.2f} ms/step, "
                f"load {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
            if row not in best or r["seconds"] < best[row]["seconds"]:
                best[row] = r
                loads[row] = os.getloadavg()[0]
    mem = "peak MiB" if args.device.startswith("cuda") else "maxrss+MiB"
    print(
        f"{'prior':>11} {'cfg':>3} {'batch':>5} {'mode':>9} {'ms/step':>8} {'ops/step':>9} "
        f"{'tok/s':>8} {'tok/cpu-s':>9} {mem:>10} {'x uncached':>10} {'passes':>6} "
        f"{'x gpt':>6} {'load':>5}"
    )
    out = []
    for row in rows:
        if row not in best:
            continue
        kind, name, batch, mode = row
        r = best[row]
        base = best.get((kind, name, batch, "uncached"))
        speedup = f"{base['seconds'] / r['seconds']:.1f}" if base else "-"
        gpt = best.get(("transformer", name, batch, "cached"))  # the KV-cached GPT prior
        vs_gpt = f"{gpt['seconds'] / r['seconds']:.2f}" if gpt else "-"
        print(
            f"{kind:>11} {name:>3} {batch:>5} {mode:>9} {r['ms_step']:>8.2f} "
            f"{r['ops_step']:>4.0f}/{r.get('all_ops_step', 0):<4.0f} {r['tok_s']:>8.0f} "
            f"{r['tok_cpu_s']:>9.0f} "
            f"{r['peak_mib']:>10.1f} {speedup:>10} {r.get('passes', '-'):>6} {vs_gpt:>6} "
            f"{loads[row]:>5.1f}"
        )
        out.append({"prior": kind, "config": name, "batch": batch, "mode": mode, **r})
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(o) + "\n" for o in out)
    if "taming" in kinds:
        print_side_by_side(args)


if __name__ == "__main__":
    main()
