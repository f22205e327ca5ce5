"""Smoke test of benchmarks/demo_prior_step.py, so the script cannot rot or time the wrong prior."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from latentgen import Pipeline

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "demo_prior_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_prior_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_placements_differ_by_the_maps_16_prefix_tokens_only():
    bench = _load_script()
    aligned, both = (Pipeline.from_spec(bench.demo_spec(p)) for p in ("aligned", "both"))
    assert both.prior.n_ctx - aligned.prior.n_ctx == 16  # one map cell per 2x2 of 8x8 codes
    # everything else is the shipped demo's prior
    a, b = aligned.prior.config.model_dump(), both.prior.config.model_dump()
    a.pop("conditions"), b.pop("conditions")
    assert a == b and a["neighbours"] == (1, 3)


def test_main_times_each_placement(capsys):
    bench = _load_script()
    medians = bench.main(["--steps", "1", "--rounds", "1", "--batch", "4"])
    assert set(medians) == {"aligned", "both"} and all(v > 0 for v in medians.values())
    out = capsys.readouterr().out
    assert "round 1: aligned" in out and "x the first" in out
