"""What subnormal floats cost a CPU training step, with and without ``flush_denormal``.

A training run can drift into subnormal floats (magnitudes below 1.2e-38): on x86 an operation
that makes or reads one takes a slow path. Where PixelSNAIL meets them: its gated blocks
compute ``x + a * sigmoid(b)``, and once the gate's logits ``b`` grow past -87 the sigmoid is
subnormal (so are its gradients). This times that gate, forward and backward, on a
``[32, 256, 16, 16]`` tensor, with ``b`` drawn at widening spreads, the flag off and on. Each
case runs in a fresh process, with the flag set before torch's threads start, as
``latentgen train`` sets it.

    OMP_NUM_THREADS=1 python benchmarks/subnormals.py
    python benchmarks/subnormals.py --threads 2 --spreads 1,100 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _child import run_child


def one(case: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from latentgen.training.loop import flush_denormals

    flag, spread = case.split(",")
    torch.set_num_threads(args.threads)
    flush_denormals(flag == "on")  # first, so every thread starts with it
    g = torch.Generator().manual_seed(0)
    shape = (32, 256, 16, 16)
    x = torch.randn(shape, generator=g)
    a = torch.randn(shape, generator=g).requires_grad_()
    b = (torch.randn(shape, generator=g) * float(spread)).requires_grad_()
    with torch.no_grad():
        s = torch.sigmoid(b)
        share = float(((s > 0) & (s < torch.finfo(torch.float32).tiny)).float().mean())

    def step() -> None:
        a.grad = b.grad = None
        (x + a * torch.sigmoid(b)).sum().backward()

    step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    return {"ms_per_step": (time.perf_counter() - t) / args.steps * 1000, "subnormal": share}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--spreads", default="1,30,100,300", help="standard deviations of the logits b")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    print(f"x + a * sigmoid(b), forward + backward, [32, 256, 16, 16], {args.threads} thread(s)")
    head = ("spread of b", "subnormal", "flush off ms", "flush on ms", "ratio")
    print(f"{head[0]:>11} {head[1]:>10} {head[2]:>13} {head[3]:>12} {head[4]:>6}")
    for spread in args.spreads.split(","):
        res = {}
        for flag in ("off", "on"):
            r = run_child(__file__, "--one", f"{flag},{spread}", args, ("threads", "steps"))
            if isinstance(r, str):
                sys.exit(f"case {flag},{spread} failed: {r}")
            res[flag] = r
        off, on = res["off"]["ms_per_step"], res["on"]["ms_per_step"]
        share = res["off"]["subnormal"]
        print(f"{float(spread):>11g} {share:>10.2%} {off:>13.1f} {on:>12.1f} {off / on:>6.2f}")


if __name__ == "__main__":
    main()
