"""latentgen-toy's own tests, written against latentgen's public test kit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from latentgen import Pipeline
from latentgen.testing import PriorContract, TokenizerContract


class TestPalette(TokenizerContract):
    config = {"type": "toy.palette", "vocab_size": 8, "downsample": 4}
    image_size = 16
    plugin = "latentgen-toy"


class TestNGram(PriorContract):
    config = {
        "type": "toy.ngram",
        "vocab_size": 8,
        "order": 3,
        "conditions": {"label": {"vocab_size": 3}},
    }
    grid = (4, 4)
    plugin = "latentgen-toy"


def test_listed_by_latentgen_plugins():
    exe = Path(sys.executable).parent / "latentgen"
    out = subprocess.run(
        [str(exe), "plugins", "--json"], capture_output=True, text=True, check=True
    ).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["latentgen-toy"]["components"] == {
        "tokenizer": ["toy.palette"],
        "prior": ["toy.ngram"],
    }


def test_palette_fits_colours():
    from latentgen import registry

    tok = registry.build("tokenizer", {"type": "toy.palette", "vocab_size": 2, "downsample": 2})
    images = torch.full((2, 3, 4, 4), -0.5)
    images[1] = 0.75
    tok.fit(images)
    assert torch.allclose(tok.decode(tok.encode(images)), images)


def test_ngram_learns_a_pattern_and_samples_it():
    from latentgen import registry

    prior = registry.build(
        "prior", {"type": "toy.ngram", "vocab_size": 4, "order": 3, "alpha": 1e-3}
    )
    stripes = torch.arange(6)[None, :, None].expand(8, 6, 6) % 4  # rows 0,1,2,3,0,1
    before = prior.log_prob(stripes).mean()
    prior.fit(stripes)
    after = prior.log_prob(stripes).mean()
    assert after > before + 10
    sample = prior.sample(grid=(6, 6), num_samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, stripes[:3])


def test_pipeline_saves_loads_samples(tmp_path):
    pipe = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 4, "downsample": 2},
            "prior": {"type": "toy.ngram", "vocab_size": 4},
        }
    )
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    pipe.tokenizer.fit(images)
    pipe.prior.fit(pipe.encode(images))
    pipe.save_pretrained(tmp_path / "p")
    loaded = Pipeline.from_pretrained(tmp_path / "p")
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(
        loaded(2, size=8, generator=g(), output_type="tensor"),
        pipe(2, size=8, generator=g(), output_type="tensor"),
    )


def test_ngram_guidance_and_dropped_label_use_all_labels():
    """The n-gram prior gets guidance from Prior.sample: its null branch reads all labels."""
    from latentgen import registry
    from latentgen.conditioners.base import Conditioning
    from latentgen.specs import SamplerConfig

    prior = registry.build(
        "prior",
        {
            "type": "toy.ngram",
            "vocab_size": 4,
            "order": 1,
            "alpha": 1e-3,
            "conditions": {"label": {"vocab_size": 2}},
        },
    )
    zeros, threes = torch.zeros(4, 2, 2, dtype=torch.long), torch.full((4, 2, 2), 3)
    label = Conditioning(torch.tensor([[0]] * 4 + [[1]] * 4), 2)
    prior.fit(torch.cat((zeros, threes)), {"label": label})
    one = Conditioning(torch.tensor([[0], [1]]), 2)
    dropped = one.null()
    lp = prior.log_prob(torch.zeros(2, 2, 2, dtype=torch.long), {"label": dropped})
    # Dropped: code 0 has half the mass whichever label was given.
    torch.testing.assert_close(
        lp, torch.full((2,), 4 * torch.log(torch.tensor(0.5))), atol=1e-3, rtol=0
    )
    out = prior.sample(
        {"label": one},
        grid=(2, 2),
        sampler=SamplerConfig(guidance_scale=3.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out, torch.stack((zeros[0], threes[0])))
