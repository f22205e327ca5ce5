"""Smoke test of benchmarks/tokenizer_quality.py at a tiny budget, so the script cannot rot."""

from __future__ import annotations

import math

import pytest
import torch

from examples import load_benchmark
from latentgen.metrics.lpips import lpips_available


def test_main_runs_end_to_end_at_a_tiny_budget(capsys, monkeypatch):
    pytest.importorskip("skimage")
    tq = load_benchmark("tokenizer_quality", monkeypatch)
    eval_images, k = 8, 1024
    argv = [
        "--steps", "2", "--batch-size", "4", "--ch", "8", "--threads", "1",
        "--eval-images", str(eval_images), "--lpips-images", "2",
        "--datasets", "shapes", "--quantizers", "vq-l2,fsq", "--sizes", str(k),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        results = tq.main(argv)
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process

    assert [(r.dataset, r.quantizer, r.codebook_size) for r in results] == [
        ("shapes", "vq-l2", k),
        ("shapes", "fsq", k),
    ]
    codes_seen = eval_images * (32 // 4) ** 2  # f = 4: 64 codes per 32x32 image
    for r in results:
        m = r.metrics
        assert math.isfinite(m["psnr"]) and -1.0 <= m["ssim"] <= 1.0
        # Usage counts exactly one evaluation pass: never more codes than it saw.
        used = round(m["usage"] * k)
        assert 1 <= used <= codes_seen
        assert m["dead_codes"] == k - used
        assert 1.0 <= m["perplexity"] <= used + 1e-6
        assert math.isfinite(m["lpips"]) == lpips_available()
        assert set(r.photos) == set(tq.PHOTOS)
        assert all(math.isfinite(p["psnr"]) for p in r.photos.values())

    out = capsys.readouterr().out
    assert "| shapes | vq-l2 | 1024 |" in out and "| shapes | fsq | 1024 |" in out
    assert "vq-l2 usage" in out and "steps 2 x batch 4" in out


def test_default_restart_window_covers_about_three_k_codes(monkeypatch):
    tq = load_benchmark("tokenizer_quality", monkeypatch)
    for k, batch in [(1024, 64), (16384, 64), (16384, 32)]:
        w = tq.default_dead_code_steps(k, batch, 64)
        assert w >= 2
        assert w * batch * 64 >= 3 * k  # long enough that a live code is rarely missed
        assert w == 2 or (w - 1) * batch * 64 < 3 * k  # and no longer than needed
