"""``on_code``: the progress/cancel hook of ``Prior.sample`` and ``Pipeline`` that the page uses."""

from __future__ import annotations

import pytest
import torch

from examples import TINY_LABEL_SPEC
from latentgen import Pipeline

SPEC = TINY_LABEL_SPEC


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Pipeline.from_spec(SPEC)


@pytest.mark.parametrize(
    ("size", "window"), [((16, 16), None), ((24, 24), "cached"), ((24, 24), "exact")]
)
def test_on_code_counts_every_code_of_the_batch(pipe, size, window):
    seen: list[tuple[int, int]] = []
    sampler = {"window": window} if window else None
    pipe(
        label=[0, 2],
        size=size,
        sampler=sampler,
        on_code=lambda done, total: seen.append((done, total)),
        output_type="tensor",
    )
    h, w = size[0] // 4, size[1] // 4
    total = 2 * h * w
    assert seen[-1] == (total, total)
    assert len(seen) == h * w, "one report per drawn position"
    assert [d for d, _ in seen] == sorted({d for d, _ in seen}), "counts only grow"


def test_raising_in_on_code_stops_the_draw(pipe):
    calls = 0

    def stop_at_five(done, total):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise Stop

    pipe.prior.train()
    with pytest.raises(Stop):
        pipe(label=[1], size=(16, 16), on_code=stop_at_five)
    assert calls == 5
    assert pipe.prior.training, "the prior's mode is restored after the interruption"
