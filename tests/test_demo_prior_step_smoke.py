"""Smoke test of benchmarks/demo_prior_step.py, so the script cannot rot or time the wrong prior."""

from __future__ import annotations

from examples import load_benchmark
from latentgen import Pipeline


def test_the_placements_differ_by_the_maps_16_prefix_tokens_only(monkeypatch):
    bench = load_benchmark("demo_prior_step", monkeypatch)
    aligned, both = (Pipeline.from_spec(bench.demo_spec(p)) for p in ("aligned", "both"))
    assert both.prior.n_ctx - aligned.prior.n_ctx == 16  # one map cell per 2x2 of 8x8 codes
    # everything else is the shipped demo's prior
    a, b = aligned.prior.config.model_dump(), both.prior.config.model_dump()
    a.pop("conditions"), b.pop("conditions")
    assert a == b and a["neighbours"] == (1, 3)


def test_main_times_each_placement(capsys, monkeypatch):
    bench = load_benchmark("demo_prior_step", monkeypatch)
    medians = bench.main(["--steps", "1", "--rounds", "1", "--batch", "4"])
    assert set(medians) == {"aligned", "both"} and all(v > 0 for v in medians.values())
    out = capsys.readouterr().out
    assert "round 1: aligned" in out and "x the first" in out
