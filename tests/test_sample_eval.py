"""evaluate_samples: class accuracy, KID/FID in classifier features, agreement, rejection rows."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from latentgen import Pipeline
from latentgen.conditioners.spatial import (
    EdgesConditioner,
    EdgesConfig,
    LowResolutionConditioner,
    LowResolutionConfig,
)
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import InputError
from latentgen.sample_eval import _agreement, evaluate_samples, format_table
from test_rejection import SPEC, ColourClassifier


@pytest.fixture(scope="module")
def held_out():
    return ShapesDataset(ShapesConfig(size=120, image_size=16, seed=5000))


@pytest.fixture(scope="module")
def pipe():
    ds = ShapesDataset(ShapesConfig(size=64, image_size=16))
    images = torch.stack([ds[i]["image"] for i in range(64)])
    labels = [ds[i]["label"] for i in range(64)]
    p = Pipeline.from_spec(SPEC)
    p.tokenizer.fit(images)
    p.prior.fit(p.encode(images), p.condition(label=labels))
    p.card["image_size"] = 16
    return p


class AlwaysZero(ColourClassifier):
    def probs(self, images):
        return torch.nn.functional.one_hot(torch.zeros(len(images), dtype=torch.long), 6).float()


def test_rows_without_and_with_rejection(pipe, held_out):
    rows = evaluate_samples(
        pipe,
        ColourClassifier(),
        held_out,
        num_samples=10,
        rejection=0.25,
        kid_subset_size=30,
        kid_subsets=10,
        batch_size=16,
    )
    plain, rejected = rows
    assert (plain.name, rejected.name) == ("plain", "rejection@0.25")
    assert plain.samples == rejected.samples == 60
    assert rejected.acceptance_rate == 0.25 and rejected.realised_rate == pytest.approx(0.25)
    assert 0 <= plain.class_accuracy <= 1 and rejected.class_accuracy > plain.class_accuracy
    assert plain.kid is not None and plain.kid_std_error > 0 and plain.fid >= 0
    d = plain.as_dict()
    assert {"class_accuracy", "kid", "kid_std_error", "fid", "samples_per_s"} <= set(d)
    # per class: 10 samples of each requested class, so the overall figure is their mean; the
    # label conditioner names none, so the names are the classifier's
    for row in rows:
        by_class = row.class_accuracy_by_class
        assert list(by_class) == [f"c{i}" for i in range(6)]
        assert sum(by_class.values()) / 6 == pytest.approx(row.class_accuracy)
        assert all(abs(v * 10 - round(v * 10)) < 1e-5 for v in by_class.values())  # k of 10
        assert row.as_dict()["class_accuracy/c2"] == by_class["c2"]
    # a classifier that always says class 0 is right on class 0 only
    (zero,) = evaluate_samples(
        pipe, AlwaysZero(), held_out, num_samples=4, metrics=["accuracy"], batch_size=8
    )
    assert zero.class_accuracy_by_class == {f"c{i}": float(i == 0) for i in range(6)}
    table = format_table([r.as_dict() for r in rows])
    assert "rejection@0.25" in table.splitlines()[3] and "class_accuracy" in table.splitlines()[0]


class Contrary(ColourClassifier):
    """Ranks highest the candidates ColourClassifier finds least like the requested class."""

    def probs(self, images):
        p = 1 - super().probs(images)
        return p / p.sum(-1, keepdim=True)


def test_several_rates_and_a_classifier_that_ranks_but_does_not_score(pipe, held_out):
    kw = dict(num_samples=10, metrics=["accuracy"], batch_size=16)
    plain, half, quarter = evaluate_samples(
        pipe, ColourClassifier(), held_out, rejection=[0.5, 0.25], **kw
    )
    assert [r.name for r in (plain, half, quarter)] == ["plain", "rejection@0.5", "rejection@0.25"]
    assert half.realised_rate == pytest.approx(0.5) and quarter.ranked_by_scorer is True
    assert plain.ranked_by_scorer is None and "ranked_by_scorer" not in plain.as_dict()
    assert quarter.class_accuracy > plain.class_accuracy
    assert any("also ranked their candidates" in n for n in quarter.notes)
    # another classifier ranks: the scorer now grades a choice that is not its own
    _, contrary = evaluate_samples(
        pipe,
        ColourClassifier(),
        held_out,
        rejection=0.25,
        rejection_classifier=Contrary(),
        **kw,
    )
    assert contrary.ranked_by_scorer is False and contrary.as_dict()["ranked_by_scorer"] is False
    assert contrary.class_accuracy < plain.class_accuracy < quarter.class_accuracy
    assert not any("also ranked" in n for n in contrary.notes)
    with pytest.raises(InputError, match="acceptance_rate must lie in"):
        evaluate_samples(pipe, ColourClassifier(), held_out, rejection=[0.5, 0.0], **kw)
    with pytest.raises(InputError, match="empty list"):
        evaluate_samples(pipe, ColourClassifier(), held_out, rejection=[], **kw)


def test_accuracy_counts_requested_classes(pipe, held_out):
    # a classifier that always says class 0 is right for exactly the class-0 sixth
    (row,) = evaluate_samples(
        pipe, AlwaysZero(), held_out, num_samples=4, metrics=["accuracy"], batch_size=5
    )
    assert row.class_accuracy == pytest.approx(1 / 6) and row.kid is None


def test_too_few_samples_for_the_kid_subset(pipe, held_out):
    with pytest.raises(
        InputError,
        match=r"subsets of 100 samples but only 30 .* at least 17 per class",
    ):
        evaluate_samples(pipe, ColourClassifier(), held_out, num_samples=5)


def test_classifier_of_other_classes_or_size(pipe, held_out):
    with pytest.raises(InputError, match="trained on 10 classes but the pipeline"):
        evaluate_samples(pipe, ColourClassifier(num_classes=10), held_out, num_samples=20)
    with pytest.raises(InputError, match="takes 32x32 images but the pipeline .* makes 16x16"):
        evaluate_samples(pipe, ColourClassifier(image_size=32), held_out, num_samples=20)


def test_class_accuracy_needs_a_class_condition(held_out):
    spec = {
        "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
        "prior": {"type": "toy.ngram", "vocab_size": 8},
    }
    p = Pipeline.from_spec(spec)
    p.card["image_size"] = 16
    with pytest.raises(InputError, match="class accuracy needs a class condition.*leave"):
        evaluate_samples(p, ColourClassifier(), held_out, num_samples=8, metrics=["accuracy"])
    # without asking for accuracy, an unconditional pipeline gets KID/FID
    p.tokenizer.fit(torch.stack([held_out[i]["image"] for i in range(32)]))
    (row,) = evaluate_samples(
        p, ColourClassifier(), held_out, num_samples=40, kid_subset_size=20, kid_subsets=5
    )
    assert row.class_accuracy is None and row.kid is not None and row.samples == 40


def test_agreement_of_derived_conditions(held_out):
    x = torch.stack([held_out[i]["image"] for i in range(8)])  # [8, 3, 16, 16]
    conds = {
        "edges": EdgesConditioner(EdgesConfig(downsample=4)),
        "small": LowResolutionConditioner(LowResolutionConfig(factor=2, downsample=2)),
    }
    fake_pipe = SimpleNamespace(conditioners=conds)
    raw = {"edges": x, "small": x}  # derived from the images, as training derives them
    same, _ = _agreement(fake_pipe, None, None, raw, x)
    other, _ = _agreement(fake_pipe, None, None, raw, x.roll(1, 0))
    assert torch.isinf(same["edges_psnr_db"]).all() and torch.isinf(same["small_psnr_db"]).all()
    assert math.isfinite(float(other["edges_psnr_db"].mean()))
    assert float(other["small_psnr_db"].mean()) < 30


class _FakeInceptionWithProbs(torch.nn.Module):
    """Stands in for the TorchScript Inception: colour statistics as features, and
    probabilities over 4 classes from the same statistics."""

    def forward(
        self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        feats = torch.cat([img.mean(dim=(2, 3)), img.amax(dim=(2, 3))], dim=1) / 255.0
        if return_features:
            return feats
        return (feats[:, :4] * 20.0).softmax(-1)


def test_inception_fid_and_is_with_user_weights(pipe, held_out, tmp_path):
    import warnings

    path = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_FakeInceptionWithProbs()), str(path))
    (row,) = evaluate_samples(
        pipe, ColourClassifier(), held_out, num_samples=4, metrics=["accuracy"], inception=path
    )
    assert row.inception_fid is not None and row.inception_fid >= 0
    assert 1.0 <= row.inception_score <= 4.0 and row.inception_score_std >= 0
    assert {"inception_fid", "inception_score"} <= set(row.as_dict())


def test_spatial_pipeline_samples_per_held_out_condition(held_out):
    from test_spatial_conditioners import _pipe

    conds = {
        "segmentation": {"type": "segmentation", "num_classes": 7},
        "depth": {"type": "depth"},
        "edges": {"type": "edges"},
        "low_resolution": {"type": "low_resolution", "factor": 2, "downsample": 2},
    }
    vocab = {"segmentation": 7, "depth": 16, "edges": 8, "low_resolution": 64}
    p = _pipe(conds, {n: {"vocab_size": v, "num_tokens": 16} for n, v in vocab.items()})
    keys = {"edges": "image", "low_resolution": "image"}  # derived from the images
    (row,) = evaluate_samples(
        p,
        ColourClassifier(),
        held_out,
        num_samples=12,
        kid_subset_size=10,
        kid_subsets=5,
        condition_keys=keys,
    )
    assert row.samples == 12 and row.class_accuracy is None and row.kid is not None
    assert {"edges_psnr_db", "low_resolution_psnr_db", "segmentation_main_class_accuracy"} == set(
        row.agreement
    )
    assert 0 <= row.agreement["segmentation_main_class_accuracy"] <= 1
    assert any("depth: no agreement measure" in n for n in row.notes)
    with pytest.raises(InputError, match="need 500 items, but the dataset has 120"):
        evaluate_samples(p, ColourClassifier(), held_out, num_samples=500, kid_subset_size=10)


def test_draw_from_some_of_the_pipeline_conditions(held_out, monkeypatch):
    from test_spatial_conditioners import _pipe

    def build(**dropout):
        return _pipe(
            {
                "label": {"type": "class_label", "num_classes": 6},
                "segmentation": {"type": "segmentation", "num_classes": 7},
            },
            {"label": {"vocab_size": 6}, "segmentation": {"vocab_size": 7, "num_tokens": 16}},
            cond_dropout=0.1,
            cond_dropout_each=dropout,
        )

    p = build(label=0.1, segmentation=0.5)
    asked: list[list[str]] = []
    call = type(p).__call__

    def spy(self, *args, **kwargs):
        asked.append(sorted(k for k in kwargs if k in self.conditioners))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(p), "__call__", spy)
    kw = dict(num_samples=6, metrics=["accuracy", "agreement"], batch_size=12)
    # every condition: one sample per held-out item, its label and map from the item
    (both,) = evaluate_samples(p, ColourClassifier(), held_out, **kw)
    assert both.samples == 6 and set(both.agreement) == {"segmentation_main_class_accuracy"}
    assert asked == [["label", "segmentation"]]
    # the label alone: num_samples per class, the map left out, nothing to agree with
    asked.clear()
    (alone,) = evaluate_samples(p, ColourClassifier(), held_out, conditions=["label"], **kw)
    assert alone.samples == 36 and alone.class_accuracy is not None and not alone.agreement
    assert asked == [["label"]] * 3
    # the map alone: no class to be accurate about, and nothing to rank candidates by
    with pytest.raises(InputError, match=r"conditions given are \['segmentation'\]: give 'label'"):
        evaluate_samples(p, ColourClassifier(), held_out, conditions=["segmentation"], **kw)
    with pytest.raises(
        InputError,
        match=r"requested class, but the conditions given are \['segmentation'\]: give 'label' too",
    ):
        evaluate_samples(
            p, ColourClassifier(), held_out, conditions=["segmentation"], rejection=0.5
        )
    with pytest.raises(
        InputError, match=r"unknown \['edges'\]\): it takes label=..., segmentation="
    ):
        evaluate_samples(p, ColourClassifier(), held_out, conditions=["edges"], **kw)
    # a prior that never dropped the label on its own: leaving it out is refused before any draw
    asked.clear()
    with pytest.raises(
        InputError, match=r"missing \['label'\]\): .*\(segmentation may be left out\)"
    ):
        evaluate_samples(
            build(segmentation=0.5), ColourClassifier(), held_out, conditions=["segmentation"]
        )
    assert asked == []


def test_held_out_images_of_another_size(pipe):
    other = ShapesDataset(ShapesConfig(size=120, image_size=32))
    with pytest.raises(InputError, match="held-out images are 32x32 but the samples are 16x16"):
        evaluate_samples(pipe, ColourClassifier(), other, num_samples=20)


@pytest.fixture
def saved_classifier(tmp_path):
    from latentgen import registry
    from latentgen.artifact import save_component

    clf = registry.build(
        "classifier", {"type": "cnn", "num_classes": 6, "image_size": 16, "widths": [8, 16]}
    )
    return save_component(clf, "classifier", tmp_path / "clf")


def test_cli_eval_samples_table_and_json_lines(pipe, saved_classifier, tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    data = tmp_path / "held.yaml"
    data.write_text("{type: shapes, size: 64, image_size: 16, seed: 777}")
    args = [
        "eval",
        "samples",
        str(tmp_path / "pipe"),
        "--classifier",
        str(saved_classifier),
        "--data",
        str(data),
        "-n",
        "5",
        "--kid-subset-size",
        "20",
        "--kid-subsets",
        "5",
        "--reject",
        "0.5",
        "--jsonl",
        str(tmp_path / "rows.jsonl"),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert header[:3] == ["name", "samples", "samples_per_s"] and "kid_std_error" in header
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["plain", "rejection@0.5"]
    # the per-class figures are in the JSON lines, and in a table of their own
    assert {f"class_accuracy/class_{i}" for i in range(6)} <= set(rows[0])
    assert "class_accuracy/" not in res.stdout.splitlines()[0]
    by_class = res.stdout.split("class accuracy by class:\n")[1].splitlines()
    assert by_class[0].split() == ["name", *(f"class_{i}" for i in range(6))]
    assert by_class[2].split()[0] == "plain"
    assert rows[1]["realised_rate"] == 0.5 and rows[0]["samples"] == 30
    res = CliRunner().invoke(main, [*args, "--json"])
    assert [json.loads(line)["name"] for line in res.stdout.splitlines()] == [
        "plain",
        "rejection@0.5",
    ]
    # fewer samples than the KID subset: the error names -n and --kid-subset-size
    res = CliRunner().invoke(main, [*args[:-6], "--kid-subset-size", "100"])
    assert res.exit_code == 1 and "--kid-subset-size 30" in res.output
    # several rates, ranked by another saved classifier than the scorer
    other = tmp_path / "other-clf"
    shutil.copytree(saved_classifier, other)
    more = [*args[:-2], "--reject", "0.25", "--reject-classifier", str(other), "--json"]
    res = CliRunner().invoke(main, more)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["name"], r.get("ranked_by_scorer")) for r in rows] == [
        ("plain", None),
        ("rejection@0.5", False),
        ("rejection@0.25", False),
    ]
    # the scorer ranking its own candidates is said on stderr
    res = CliRunner().invoke(main, args[:-2])
    assert res.exit_code == 0 and "also ranked their candidates" in res.stderr
    # --condition picks the pipeline's conditions to draw from; an unknown one is named
    res = CliRunner().invoke(main, [*args[:-4], "--condition", "label", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["samples"] == 30
    res = CliRunner().invoke(main, [*args[:-4], "--condition", "edges"])
    assert res.exit_code == 1 and "unknown ['edges']" in res.output
    # a ranking classifier without a rate is a usage error that names --reject
    res = CliRunner().invoke(main, [*args[:-4], "--reject-classifier", str(other)])
    assert res.exit_code == 2 and "give the rate too, e.g. --reject 0.05" in res.output


def test_cli_sample_with_rejection(pipe, saved_classifier, tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "best.png"
    res = CliRunner().invoke(
        main,
        [
            "sample",
            str(tmp_path / "pipe"),
            "-c",
            "label=[0,1]",
            "-n",
            "2",
            "-o",
            str(out),
            "--reject",
            str(saved_classifier),
            "--acceptance",
            "0.25",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "kept 2 of 8 candidates (realised rate 0.25, requested 0.25)" in res.output
    assert out.is_file()
    # a classifier of another image size is refused, naming both sizes
    big = tmp_path / "big"
    from latentgen import registry
    from latentgen.artifact import save_component

    save_component(
        registry.build("classifier", {"type": "cnn", "num_classes": 6, "image_size": 32}),
        "classifier",
        big,
    )
    res = CliRunner().invoke(
        main,
        ["sample", str(tmp_path / "pipe"), "-c", "label=1", "-o", str(out), "--reject", str(big)],
    )
    assert res.exit_code == 1 and "takes 32x32 images but this pipeline" in res.output
