"""Train-step time of the demo's prior with its segmentation map placed each shipped way.

`make demo` trains the prior of ``shapes-transformer.yaml`` (label + segmentation map,
``neighbours: [1, 3]``) on 8x8 codes. This builds that prior with fresh weights for each
``--placement`` of the map (``aligned``: at its codes only, the demo's; ``both``: also a
16-token prefix of one cell per 2x2 codes, the demo's before), feeds it a batch of real shapes
items (their codes from an untrained ``shapes-vqgan.yaml`` tokenizer: the step's cost does not
depend on which codes they are) with their labels and maps, and times forward + backward +
AdamW. The variants take turns, ``--rounds`` times, so that a machine busy with other work
slows each alike; it prints each round and the median of the rounds' medians.

    OMP_NUM_THREADS=2 python benchmarks/demo_prior_step.py
    OMP_NUM_THREADS=1 python benchmarks/demo_prior_step.py --placement aligned,both,prefix
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from importlib import resources
from typing import Any

import torch
import yaml

from latentgen import Pipeline
from latentgen.data.shapes import ShapesConfig, ShapesDataset


def demo_spec(placement: str) -> dict[str, Any]:
    """The shipped demo's pipeline spec (tokenizer included) with the map's ``placement``."""
    files = resources.files("latentgen") / "configs"
    tok = yaml.safe_load((files / "shapes-vqgan.yaml").read_text())
    prior_cfg = yaml.safe_load((files / "shapes-transformer.yaml").read_text())
    spec = copy.deepcopy(prior_cfg["spec"])
    spec["tokenizer"] = tok["tokenizer"]
    seg = spec["prior"]["conditions"]["segmentation"]
    seg["placement"] = placement
    if placement == "aligned":
        seg.pop("prefix_downsample", None)
    else:  # a prefix of one cell per 2x2 codes, as the demo had it
        seg["prefix_downsample"] = 2
    return spec


def batch_for(pipe: Pipeline, batch: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Codes ``[B, 8, 8]`` of ``batch`` shapes items and their encoded label and map."""
    data = ShapesDataset(ShapesConfig(size=batch, image_size=32))
    items = [data[i] for i in range(batch)]
    with torch.no_grad():
        codes = pipe.tokenizer.encode(torch.stack([it["image"] for it in items]))
    label = pipe.conditioners["label"].encode(torch.tensor([it["label"] for it in items]))
    seg = pipe.conditioners["segmentation"].encode(
        torch.stack([torch.as_tensor(it["segmentation"]) for it in items]), size=(32, 32)
    )
    return codes, {"label": label, "segmentation": seg}


def step_ms(pipe: Pipeline, codes: torch.Tensor, conds: dict[str, Any], steps: int) -> float:
    """Median milliseconds of ``steps`` training steps (after two warm-up steps)."""
    prior = pipe.prior.train()
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = prior.loss(codes, conds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; returns the median milliseconds per step of each placement."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--placement", default="aligned,both", help="comma-separated placements")
    p.add_argument("--batch", type=int, default=32, help="the demo's batch size")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    runs = {}
    for placement in args.placement.split(","):
        pipe = Pipeline.from_spec(demo_spec(placement))
        runs[placement] = (pipe, *batch_for(pipe, args.batch))
    print(
        f"threads={torch.get_num_threads()} batch={args.batch} steps={args.steps} "
        f"rounds={args.rounds}; ms per step (median of each round)"
    )
    results: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (pipe, codes, conds) in runs.items():
            results[name].append(step_ms(pipe, codes, conds, args.steps))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items()))
    medians = {name: statistics.median(values) for name, values in results.items()}
    base = medians[next(iter(medians))]
    for name, med in medians.items():
        print(f"{name:<8} {med:7.1f} ms  ({med / base:.2f}x the first)")
    return medians


if __name__ == "__main__":
    main()
