"""Sampling speed of the transformer prior: tokens/s and peak memory, with and without KV cache.

Unconditional sampling of 256 new codes (a 16x16 grid) after the one start token, vocab 1024,
top-k 100, for two model sizes at batch 1 and 8. Each measurement runs in a fresh subprocess so
that its peak memory (CPU: the growth of ru_maxrss; CUDA: torch.cuda.max_memory_allocated) is
its own.

    OMP_NUM_THREADS=2 python benchmarks/sample_speed.py
    python benchmarks/sample_speed.py --device cuda --dtype bf16 --compile
    python benchmarks/sample_speed.py --configs s --batches 1 --modes cached --repeats 5

The uncached runs re-run the whole sequence per code (quadratic): on a 2-core CPU the m model
at batch 8 takes several minutes.
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


def run_one(args: argparse.Namespace, name: str, batch: int, mode: str) -> dict[str, float]:
    """Build the model, warm up, time ``args.repeats`` sampling calls; report the best."""
    import torch

    from latentgen.priors.transformer import TransformerPrior, TransformerPriorConfig
    from latentgen.specs import SamplerConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    config = TransformerPriorConfig(vocab_size=1024, block_size=256, **CONFIGS[name])
    model = TransformerPrior(config).to(device=device, dtype=dtype).eval()
    if args.compile:
        # The per-step function; positions and cache lengths vary, hence dynamic shapes.
        model._run = torch.compile(model._run, dynamic=True)  # type: ignore[method-assign]
    sampler = SamplerConfig(top_k=100)
    side = int(args.tokens**0.5)
    grid = (side, args.tokens // side)
    n_tokens = grid[0] * grid[1]
    use_cache = mode == "cached"

    def go(g: tuple[int, int]) -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        model.sample(grid=g, sampler=sampler, generator=gen, num_samples=batch, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up: kernels and allocator; with --compile the whole grid, so that every shape the
    # timed runs meet is compiled before the clock starts.
    go(grid if args.compile else (1, 8))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _maxrss_mib()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        go(grid)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _maxrss_mib() - rss0
    return {
        "tok_s": batch * n_tokens / best,
        "seconds": best,
        "cpu_seconds": best_cpu,
        "tok_cpu_s": batch * n_tokens / best_cpu,
        "peak_mib": peak,
    }


def main() -> None:
    """Parse options, run every (config, batch, mode) in its own process, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-step forward")
    p.add_argument("--configs", default="s,m", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="cached,uncached", help="cached, uncached or both")
    p.add_argument("--tokens", type=int, default=256, help="codes per sample (a square grid)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs; the best one counts")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "config,batch,mode"
    args = p.parse_args()

    if args.one:
        name, batch, mode = args.one.split(",")
        print(json.dumps(run_one(args, name, int(batch), mode)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"device={args.device} dtype={args.dtype} compile={args.compile} "
        f"OMP_NUM_THREADS={threads} tokens={args.tokens} top_k=100 vocab=1024"
    )
    mem = "peak MiB" if args.device.startswith("cuda") else "maxrss +MiB"
    # cpu-s: CPU time of the sampling process (all its threads). On a shared machine wall time
    # swings with the neighbours' load; with OMP_NUM_THREADS=1, tokens per CPU second is what
    # the same run would reach on an idle core.
    print(
        f"{'config':>6} {'batch':>5} {'mode':>9} {'tok/s':>10} {'seconds':>9} {'cpu-s':>8} "
        f"{'tok/cpu-s':>10} {mem:>12}"
    )
    for name in args.configs.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", f"{name},{batch},{mode}"]
                for opt in ("device", "dtype", "tokens", "repeats"):
                    cmd += [f"--{opt}", str(getattr(args, opt))]
                if args.compile:
                    cmd.append("--compile")
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    print(f"{name:>6} {batch:>5} {mode:>9}  failed: {res.stderr.strip()[-500:]}")
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(
                    f"{name:>6} {batch:>5} {mode:>9} {r['tok_s']:>10.1f} {r['seconds']:>9.3f} "
                    f"{r['cpu_seconds']:>8.3f} {r['tok_cpu_s']:>10.1f} "
                    f"{r['peak_mib']:>12.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
