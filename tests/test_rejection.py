"""Classifier rejection sampling: keeps the best-scored candidates, reports its rate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from latentgen import Pipeline
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import InputError
from latentgen.rejection import RejectionConfig, class_probs, take_rows

SPEC = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {"type": "toy.ngram", "vocab_size": 8, "conditions": {"label": {"vocab_size": 6}}},
    "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
}


class ColourClassifier(nn.Module):
    """A stand-in classifier with the latentgen classifier's methods: a fixed linear map of
    each image's 4x4 average-pooled colours."""

    def __init__(self, num_classes: int = 6, image_size: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.class_names = tuple(f"c{i}" for i in range(num_classes))
        g = torch.Generator().manual_seed(3)
        self.head = nn.Linear(in_channels * 16, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 3)
            self.head.bias.zero_()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)  # [B, C*16]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(-1)


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


def test_keeps_the_candidates_the_classifier_scores_highest(pipe):
    clf = ColourClassifier()
    rate, labels = 0.3, [0, 0, 4]
    rejecting = pipe.replace(rejection=RejectionConfig(clf, acceptance_rate=rate, batch_size=64))
    got = rejecting(label=labels, generator=torch.Generator().manual_seed(5), output_type="tensor")
    report = rejecting.last_rejection
    # rows with equal conditions share candidates: ceil(2 / 0.3) + ceil(1 / 0.3) = 7 + 4
    assert report.candidates == 11 and report.kept == 3
    assert report.realised_rate == pytest.approx(3 / 11)
    # The same draw by hand: all 11 candidates in one batch from the same seed, best kept.
    conds = pipe.condition(label=labels)
    flat = torch.tensor([0] * 7 + [2] * 4)
    with torch.no_grad():
        codes = pipe.prior.sample(
            take_rows(conds, flat),
            grid=(4, 4),
            sampler=pipe.sampler,
            generator=torch.Generator().manual_seed(5),
            num_samples=11,
        )
        images = pipe.tokenizer.decode(codes)
    score = class_probs(clf, images, 6)[torch.arange(11), torch.tensor(labels)[flat]]
    best0 = score[:7].topk(2).indices
    best2 = score[7:].topk(1).indices + 7
    expected = images[torch.cat([best0, best2])]
    assert torch.equal(got, expected)
    assert report.mean_prob_kept == pytest.approx(float(score[torch.cat([best0, best2])].mean()))
    assert report.mean_prob_kept >= report.mean_prob_all


def test_rate_one_is_plain_sampling(pipe):
    # every label once: one candidate per row, drawn as plain sampling draws it
    kw = dict(label=[0, 1, 2, 3], output_type="tensor")
    plain = pipe(generator=torch.Generator().manual_seed(1), **kw)
    rejecting = pipe.replace(rejection=RejectionConfig(ColourClassifier(), acceptance_rate=1.0))
    same = rejecting(generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain, same)
    assert rejecting.last_rejection.realised_rate == 1.0


def test_lower_rate_raises_the_requested_class_probability(pipe):
    clf = ColourClassifier()
    labels = list(range(6)) * 4
    probs = {}
    for rate in (1.0, 0.1):
        p = pipe.replace(rejection=RejectionConfig(clf, acceptance_rate=rate))
        x = p(label=labels, generator=torch.Generator().manual_seed(2), output_type="tensor")
        with torch.no_grad():
            probs[rate] = float(clf.probs(x)[torch.arange(24), torch.tensor(labels)].mean())
        assert p.last_rejection.candidates == 6 * math.ceil(4 / rate)
    assert probs[0.1] > probs[1.0] + 0.05


def test_any_callable_is_a_classifier(pipe):
    clf = ColourClassifier()
    p = pipe.replace(rejection=RejectionConfig(lambda x: clf.probs(x), acceptance_rate=0.5))
    assert len(p(label=[1, 2])) == 2 and p.last_rejection.candidates == 4


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_acceptance_rate_outside_0_1(rate):
    with pytest.raises(InputError, match=r"acceptance_rate must lie in \(0, 1\]"):
        RejectionConfig(ColourClassifier(), acceptance_rate=rate)


def test_classifier_that_does_not_fit_the_pipeline(pipe):
    p = pipe.replace(rejection=RejectionConfig(ColourClassifier(num_classes=10)))
    with pytest.raises(InputError, match="trained on 10 classes but this pipeline .* has 6"):
        p(label=[0])
    p = pipe.replace(rejection=RejectionConfig(ColourClassifier(image_size=28)))
    with pytest.raises(InputError, match="takes 28x28 images but .* makes 16x16"):
        p(label=[0])
    # a plain callable with the wrong number of classes is caught on its output
    p = pipe.replace(rejection=RejectionConfig(lambda x: torch.ones(x.shape[0], 4) / 4))
    with pytest.raises(InputError, match=r"class probabilities \[B, 6\]"):
        p(label=[0])


def test_pipeline_without_class_condition():
    spec = {
        "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
        "prior": {"type": "toy.ngram", "vocab_size": 8},
    }
    p = Pipeline.from_spec(spec)
    p.card["image_size"] = 16
    p = p.replace(rejection=RejectionConfig(ColourClassifier()))
    with pytest.raises(InputError, match="needs a class_label condition.*no conditions"):
        p(num_images=2)


def test_cli_rate_needs_a_classifier_and_a_rate_in_range(pipe, tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    runner = CliRunner()
    res = runner.invoke(main, ["sample", str(tmp_path / "pipe"), "--acceptance", "0.1"])
    assert res.exit_code != 0 and "give the classifier with --reject DIR" in res.output
    data = tmp_path / "data.yaml"
    data.write_text("{type: shapes, size: 8, image_size: 16}")
    res = runner.invoke(
        main,
        [
            "eval",
            "samples",
            str(tmp_path / "pipe"),
            "--classifier",
            str(tmp_path),
            "--data",
            str(data),
            "--reject",
            "1.5",
        ],
    )
    assert res.exit_code == 1 and "acceptance_rate must lie in (0, 1], got 1.5" in res.output
