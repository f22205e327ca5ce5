"""The shipped masked-prior configs, shrunk, through the CLI: train prior, sample, eval prior.

The tokenizers are built from the shipped tokenizer configs and saved untrained (the prior
trains on whatever codes they give), so the test spends its seconds on the masked prior.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from latentgen import Pipeline, registry
from latentgen.artifact import save_component
from latentgen.cli import main
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.demo import shapes_classifier_path
from latentgen.priors.masked import MaskedPrior

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "latentgen" / "configs"


def _untrained_tokenizer(name: str, out: Path) -> Path:
    cfg = yaml.safe_load((CONFIGS / name).read_text())["tokenizer"]
    cfg["quantizer"]["kmeans_init"] = False
    save_component(registry.build("tokenizer", cfg), "tokenizer", out)
    return out


def _shrink(name: str, tmp: Path) -> Path:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["trainer"].update(
        max_steps=3, checkpoint_every=3, grid_every=3, log_every=1, runs_dir=str(tmp / "runs")
    )
    cfg["trainer"]["batch_size"] = 4
    cfg["data"]["size"] = 8
    cfg["spec"]["prior"].update(n_layer=1, n_embd=32, elbo_samples=2)
    cfg["tokenizer_path"] = str(tmp / "vqgan")
    for cond in cfg.get("cond_tokenizers", {}):
        cfg["cond_tokenizers"][cond] = str(tmp / "seg-vqvae")
    out = tmp / name
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked")
    _untrained_tokenizer("shapes-vqgan.yaml", tmp / "vqgan")
    _untrained_tokenizer("shapes-segmentation-vqvae.yaml", tmp / "seg-vqvae")
    return tmp


def test_class_conditional_masked_prior_trains_samples_and_scores(tokenizers, monkeypatch):
    tmp = tokenizers
    cfg = _shrink("shapes-masked.yaml", tmp)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    final = tmp / "runs" / "shapes-masked" / "final"
    pipe = Pipeline.from_pretrained(final)
    assert pipe.spec.prior.type == "masked" and pipe.prior.config.steps == 12
    # the local convolution and the label at every code come back from the saved config
    assert pipe.prior.config.local_conv == 3 and len(pipe.prior.local) == 1
    assert pipe.prior.config.conditions["label"].placement == "both"

    out = tmp / "grid.png"
    args = ["sample", str(final), "-n", "2", "-c", "label=[0,5]", "--steps", "4", "-o", str(out)]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "wrote 2 images" in res.output and Image.open(out).size[0] >= 32
    # the progress bar (stderr mixed in), with the shipped sampler's two refinement passes
    assert pipe.sampler.refine_steps == 2
    assert "sampling (masked, 4 steps + 2 refinements)" in res.output

    refined = []
    refine = MaskedPrior._refine

    def spy(self, codes, free, j, request):
        refined.append((request.sampler.steps, j))
        return refine(self, codes, free, j, request)

    monkeypatch.setattr(MaskedPrior, "_refine", spy)
    res = runner.invoke(main, [*args, "--refine", "1"])
    assert res.exit_code == 0, res.output
    assert "sampling (masked, 4 steps + 1 refinement)" in res.output and refined == [(4, 0)]
    refined.clear()
    res = runner.invoke(main, [*args, "--refine", "0"])
    assert res.exit_code == 0, res.output
    assert "sampling (masked, 4 steps)" in res.output and refined == []
    res = runner.invoke(main, [*args, "--refine", "-1"])
    assert res.exit_code != 0 and "--refine" in res.output
    refined.clear()
    clf = shapes_classifier_path()
    ev = ["eval", "samples", str(final), "--classifier", str(clf), "--data", str(cfg), "-n", "1"]
    res = runner.invoke(main, [*ev, "--metric", "accuracy", "--steps", "3", "--refine", "1"])
    assert res.exit_code == 0, res.output
    assert set(refined) == {(3, 0)} and "class_accuracy" in res.output

    res = runner.invoke(main, [*args[:-2], "--steps", "65", "-o", str(tmp / "no.png")])
    assert res.exit_code != 0
    assert "steps=65 for a 8x8 grid of 64 codes" in res.output and "--steps" in res.output
    assert not (tmp / "no.png").exists()
    res = runner.invoke(main, [*args[:-2], "--steps", "0", "-o", str(tmp / "no.png")])
    assert res.exit_code != 0
    assert "invalid value: steps=0: a masked prior needs at least one decoding pass" in res.output
    assert "Value error" not in res.output and not (tmp / "no.png").exists()

    res = runner.invoke(
        main, ["eval", "prior", str(final), "--data", str(cfg), "--limit", "4", "--json"]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.output[res.output.index("{") :])
    assert result["nll_is_upper_bound"] is True
    assert 0 < result["bits_per_code"] < 3 * np.log2(256)


def test_segmentation_masked_prior_trains_and_samples_from_a_map(tokenizers):
    tmp = tokenizers
    cfg = _shrink("shapes-segmentation-masked.yaml", tmp)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "prior", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    final = tmp / "runs" / "shapes-segmentation-masked" / "final"
    ids = ShapesDataset(ShapesConfig(size=2, image_size=32))[1]["segmentation"]
    Image.fromarray(ids.numpy().astype(np.uint8)).save(tmp / "map.png")
    out = tmp / "seg.png"
    res = runner.invoke(
        main,
        ["sample", str(final), "-n", "2", "-c", f"segmentation=@{tmp / 'map.png'}", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 images" in res.output and out.stat().st_size > 0


def test_compare_puts_the_masked_bound_beside_the_gpt_nll(tmp_path, monkeypatch):
    """`compare` trains both on one code cache, marks the masked prior's NLL as a bound and
    measures the masked prior once per T of `evaluation.steps` and K of `refine_steps` (the
    GPT prior once); the
    shipped GPT-vs-masked config names the shipped classifier and T = 8, 12, 16."""
    from latentgen.compare import load_compare_config, run_compare
    from latentgen.demo import shapes_classifier_path
    from latentgen.priors.masked import MaskedPrior

    passes = []
    generate = MaskedPrior.generate

    def spy(self, request):
        steps = self.num_steps(request.sampler.steps, request.grid)
        passes.append((steps, request.sampler.refine_steps))
        return generate(self, request)

    monkeypatch.setattr(MaskedPrior, "generate", spy)
    clf = registry.build(
        "classifier", {"type": "cnn", "num_classes": 6, "image_size": 16, "widths": [8, 16]}
    )
    clf_dir = save_component(clf, "classifier", tmp_path / "clf")

    tok = registry.build("tokenizer", {"type": "toy.palette", "vocab_size": 8, "downsample": 4})
    ds = ShapesDataset(ShapesConfig(size=32, image_size=16))
    tok.fit(torch.stack([ds[i]["image"] for i in range(32)]))
    tok_dir = save_component(tok, "tokenizer", tmp_path / "palette")
    shape = {"vocab_size": 8, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}
    label = {"conditions": {"label": {"vocab_size": 6}}, "cond_dropout": 0.1}
    result = run_compare(
        {
            "name": "tiny",
            "out_dir": str(tmp_path / "out"),
            "tokenizer_path": str(tok_dir),
            "data": {"type": "shapes", "size": 32, "image_size": 16},
            "held_out": {"type": "shapes", "size": 16, "image_size": 16, "seed": 999},
            "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
            "sampler": {"steps": 4, "top_k": 4},
            "priors": {
                "gpt": {"type": "transformer", **shape, **label},
                "masked": {"type": "masked", **shape, **label, "elbo_samples": 2},
            },
            "budgets": [{"steps": 3}],
            "trainer": {"batch_size": 4, "lr": 0.001},
            "evaluation": {
                "held_out_images": 8,
                "sample_batch": 2,
                "classifier": str(clf_dir),
                "num_samples": 2,
                "kid_subset_size": 6,
                "kid_subsets": 2,
                "steps": [2, 5],
                "refine_steps": [0, 1],
            },
        }
    )
    assert [(r["prior"], r["sample_steps"], r["refine_steps"]) for r in result.rows] == [
        ("gpt", None, None),
        ("masked", 2, 0),
        ("masked", 2, 1),
        ("masked", 5, 0),
        ("masked", 5, 1),
    ]
    gpt, masked2, masked2r, masked5, _ = result.rows
    assert gpt["nll_is_upper_bound"] is False
    assert masked2["nll_is_upper_bound"] is True
    assert 0 < masked2["held_out_bits_per_code"] < 10
    assert masked2["held_out_bits_per_code"] == masked5["held_out_bits_per_code"]  # one model
    for row in result.rows:
        assert row["sample_codes_per_s"] > 0 and 0 <= row["class_accuracy"] <= 1
        assert row["kid"] is not None
    # every draw of the T=2 rows (timing, then eval samples) ran 2 passes, of the T=5 rows 5;
    # the rows with K=1 one refinement pass after them
    assert [t for t, _ in passes] == sorted(t for t, _ in passes)
    assert sorted(set(passes)) == [(2, 0), (2, 1), (5, 0), (5, 1)]
    assert masked2r["held_out_bits_per_code"] == masked2["held_out_bits_per_code"]
    header = result.table().splitlines()[0]
    assert "nll_is_upper_bound" in header and "sample_steps" in header
    assert header.index("sample_steps") < header.index("refine_steps") < header.index("kid")

    shipped = load_compare_config(CONFIGS / "compare-shapes-masked.yaml")
    assert {p.type for p in shipped.priors.values()} == {"transformer", "masked"}
    assert shipped.evaluation.classifier == shapes_classifier_path()
    assert shipped.evaluation.steps == [8, 12, 16]
    # equal steps and equal time, with one set of trainer options for both priors
    assert [b.label for b in shipped.budgets] == ["steps=4000", "time=300s"]
    assert shipped.priors["masked"].label_smoothing == 0.1
    local = shipped.priors["masked-local"]
    assert local.local_conv == 3 and local.conditions["label"].placement == "both"
    assert local.model_dump(exclude={"local_conv", "conditions"}) == shipped.priors[
        "masked"
    ].model_dump(exclude={"local_conv", "conditions"})  # nothing else differs


def test_eval_samples_and_rejection_take_the_masked_prior_in_place_of_another():
    """Swap the masked prior into a pipeline (`Pipeline.replace`), train it briefly, and measure
    it with `evaluate_samples` (plain and with rejection sampling) like any prior."""
    from latentgen.sample_eval import evaluate_samples
    from test_rejection import SPEC, ColourClassifier

    ds = ShapesDataset(ShapesConfig(size=64, image_size=16))
    images = torch.stack([ds[i]["image"] for i in range(64)])
    labels = [ds[i]["label"] for i in range(64)]
    base = Pipeline.from_spec(SPEC)
    base.tokenizer.fit(images)
    torch.manual_seed(0)
    masked = registry.build(
        "prior",
        {"type": "masked", "vocab_size": 8, "block_size": 16, "n_layer": 1, "n_head": 2,
         "n_embd": 16, "conditions": {"label": {"vocab_size": 6}}, "cond_dropout": 0.1,
         "steps": 4},
    )  # fmt: skip
    pipe = base.replace(prior=masked, sampler={"top_k": 4, "steps": 4})
    pipe.card["image_size"] = 16
    codes, conds = pipe.encode(images), pipe.condition(label=labels)
    opt = torch.optim.AdamW(masked.parameters(), lr=3e-3)
    masked.train()
    for _ in range(20):
        opt.zero_grad()
        masked.loss(codes, conds).backward()
        opt.step()
    masked.eval()
    held = ShapesDataset(ShapesConfig(size=60, image_size=16, seed=5000))
    plain, rejected = evaluate_samples(
        pipe,
        ColourClassifier(),
        held,
        num_samples=5,
        rejection=0.5,
        kid_subset_size=20,
        kid_subsets=5,
        batch_size=15,
    )
    assert plain.samples == rejected.samples == 30
    assert 0 <= plain.class_accuracy <= 1 and plain.kid is not None and plain.samples_per_s > 0
    assert rejected.realised_rate == pytest.approx(0.5)
