"""Sampling speed of the masked prior beside the KV-cached GPT prior: passes, tokens/s, memory.

Unconditional sampling, vocab 1024, top-k 100, for the shapes of ``sample_speed.py`` (s, m) at
batch 1 and 8 on a 16x16 grid, and on a 32x32 grid where the GPT prior's serial cost grows
(1024 cached steps). The masked prior runs T = 12 passes by default (``--steps``). "passes" is
the number of sequential forward passes of one draw: the GPT prior's prefix pass plus one per
code but the last (256 for 16x16), the masked prior's T. Each measurement runs in a fresh
subprocess so that its peak memory (CPU: growth of ru_maxrss; CUDA: max_memory_allocated) is
its own.

    LG_THREADS=2 lg python benchmarks/masked_speed.py
    lg python benchmarks/masked_speed.py --grids 16 --configs s --batches 1,8 --steps 8,12,16
    python benchmarks/masked_speed.py --device cuda --dtype bf16

On a CPU a cached GPT step is overhead-bound at batch 1 (the masked prior's few wide passes
win), while at batch 8 each of its passes is compute-bound over all codes: the table shows
where the cross-over falls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    "s": {"n_layer": 4, "n_head": 8, "n_embd": 256},
    "m": {"n_layer": 8, "n_head": 8, "n_embd": 512},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(args: argparse.Namespace, prior: str, name: str, batch: int, side: int) -> dict:
    """Build one prior, warm up, time ``args.repeats`` draws of a side x side grid; the best."""
    import torch

    from latentgen import registry
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    n = side * side
    config = {"vocab_size": 1024, "block_size": n, **CONFIGS[name]}
    steps = None
    if prior.startswith("masked"):
        steps = int(prior.split("-")[1])
        config.update(type="masked", steps=steps)
    else:
        config["type"] = "transformer"
    model = registry.build("prior", config).to(device=device, dtype=dtype).eval()
    sampler = SamplerConfig(top_k=100, steps=steps)

    def go(grid: tuple[int, int], sampler: SamplerConfig) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        model.sample(grid=grid, sampler=sampler, generator=gen, num_samples=batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up (kernels, allocator) on a small grid: a full one would double a slow CPU run.
    go((1, 8), SamplerConfig(top_k=100, steps=None if steps is None else min(steps, 8)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _maxrss_mib()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        go((side, side), sampler)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else _maxrss_mib() - rss0
    )
    return {
        "passes": steps if steps is not None else n,
        "tok_s": batch * n / best,
        "seconds": best,
        "cpu_seconds": best_cpu,
        "peak_mib": peak,
    }


def main() -> None:
    """Parse options, run every (grid, config, batch, prior) in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--configs", default="s,m", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--grids", default="16,32", help="grid sides (16: 16x16)")
    p.add_argument("--steps", default="12", help="masked prior passes T, comma list")
    p.add_argument(
        "--skip", default="m:32:8", help="config:side:batch triples left out (slow on a CPU)"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs; the best one counts")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "prior,config,batch,side"
    args = p.parse_args()

    if args.one:
        prior, name, batch, side = args.one.split(",")
        print(json.dumps(run_one(args, prior, name, int(batch), int(side))))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} dtype={args.dtype} OMP_NUM_THREADS={threads} "
        f"load(1 min)={load:.1f} top_k=100 vocab=1024"
    )
    mem = "peak MiB" if args.device.startswith("cuda") else "maxrss +MiB"
    print(
        f"{'grid':>6} {'config':>6} {'batch':>5} {'prior':>10} {'passes':>6} {'tok/s':>9} "
        f"{'seconds':>8} {'cpu-s':>8} {mem:>11} {'vs gpt':>7} {'(cpu-s)':>7}"
    )
    # "vs gpt": the GPT prior's time over this prior's, in wall seconds and in CPU seconds (on a
    # loaded machine the wall clock swings with the neighbours; CPU time much less).
    skip = set(args.skip.split(",")) if args.skip else set()
    priors = ["gpt-cached"] + [f"masked-{t}" for t in args.steps.split(",")]
    for side in (int(s) for s in args.grids.split(",")):
        for name in args.configs.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                if f"{name}:{side}:{batch}" in skip:
                    continue
                gpt: dict | None = None
                for prior in priors:
                    cmd = [sys.executable, __file__, "--one", f"{prior},{name},{batch},{side}"]
                    for opt in ("device", "dtype", "repeats"):
                        cmd += [f"--{opt}", str(getattr(args, opt))]
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    grid = f"{side}x{side}"
                    if res.returncode:
                        err = res.stderr.strip()[-300:]
                        print(f"{grid:>6} {name:>6} {batch:>5} {prior:>10}  failed: {err}")
                        continue
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                    if prior == "gpt-cached":
                        gpt = r
                    ratio = f"{gpt['seconds'] / r['seconds']:.2f}x" if gpt else "-"
                    cpu_ratio = f"{gpt['cpu_seconds'] / r['cpu_seconds']:.2f}x" if gpt else "-"
                    print(
                        f"{grid:>6} {name:>6} {batch:>5} {prior:>10} {r['passes']:>6} "
                        f"{r['tok_s']:>9.1f} {r['seconds']:>8.3f} {r['cpu_seconds']:>8.3f} "
                        f"{r['peak_mib']:>11.1f} {ratio:>7} {cpu_ratio:>7}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
