"""latentgen.evaluation: the Python API behind ``latentgen eval``, checked against direct sums."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from latentgen import Pipeline, registry
from latentgen.cli import main
from latentgen.errors import DataError, InputError, WeightsNotFoundError
from latentgen.evaluation import (
    PriorEvaluation,
    TokenizerEvaluation,
    evaluate_prior,
    evaluate_tokenizer,
)
from latentgen.metrics.image import psnr, ssim
from latentgen.metrics.lpips import LPIPS

DATA = {"type": "shapes", "size": 12, "image_size": 16}
SPEC = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {"type": "toy.ngram", "vocab_size": 8, "conditions": {"label": {"vocab_size": 6}}},
    "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
}


@pytest.fixture(scope="module")
def dataset():
    return registry.build("dataset", DATA)


@pytest.fixture(scope="module")
def pipe(dataset) -> Pipeline:
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    p = Pipeline.from_spec(SPEC)
    p.tokenizer.fit(images)
    p.prior.fit(p.encode(images), p.condition(label=labels))
    return p


@pytest.fixture(scope="module")
def saved(pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "pipe"
    pipe.save_pretrained(path, card={"image_size": 16})
    return path


def test_tokenizer_scores_equal_direct_sums(pipe: Pipeline, dataset) -> None:
    tok = pipe.tokenizer
    tok.train()
    result = evaluate_tokenizer(tok, dataset, batch_size=5, limit=10, lpips=False)
    assert tok.training  # evaluation leaves the caller's mode as it was
    x = torch.stack([dataset[i]["image"] for i in range(10)])  # [10, 3, 16, 16]
    with torch.no_grad():
        codes = tok.encode(x)
        recon = tok.decode(codes).clamp(-1, 1)
    assert isinstance(result, TokenizerEvaluation) and result.images == 10
    assert result.psnr_db == pytest.approx(float(psnr(recon, x).mean()), rel=1e-5)
    assert result.ssim == pytest.approx(float(ssim(recon, x).mean()), rel=1e-5)
    used = codes.unique().numel()
    assert result.codebook_usage == pytest.approx(used / 8)
    assert result.dead_codes == 8 - used and result.codebook_size == 8
    assert result.lpips is None and result.rfid is None and result.notes == ()
    assert set(result.as_dict()) == {
        "images", "psnr_db", "ssim", "codebook_usage", "perplexity", "dead_codes", "codebook_size"
    }  # fmt: skip


def test_lpips_auto_notes_why_it_is_skipped_and_true_requires_it(
    pipe: Pipeline, dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(*args, **kwargs):
        raise WeightsNotFoundError("LPIPS needs the VGG16 trunk weights")

    monkeypatch.setattr(LPIPS, "from_pretrained", missing)
    auto = evaluate_tokenizer(pipe.tokenizer, dataset, limit=2)
    assert auto.lpips is None and auto.notes == (
        "LPIPS skipped: LPIPS needs the VGG16 trunk weights",
    )
    with pytest.raises(WeightsNotFoundError):
        evaluate_tokenizer(pipe.tokenizer, dataset, limit=2, lpips=True)


def test_a_given_lpips_model_is_used(pipe: Pipeline, dataset) -> None:
    torch.manual_seed(0)
    model = LPIPS()  # random weights are enough to check that it is the one used
    result = evaluate_tokenizer(pipe.tokenizer, dataset, limit=4, lpips=model)
    x = torch.stack([dataset[i]["image"] for i in range(4)])
    with torch.no_grad():
        want = model(pipe.tokenizer.decode(pipe.tokenizer.encode(x)).clamp(-1, 1), x).mean()
    assert result.lpips == pytest.approx(float(want), rel=1e-5)


def test_tokenizer_from_a_path_matches_the_command_line(saved: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(DATA))
    res = CliRunner().invoke(
        main, ["eval", "tokenizer", str(saved), "--data", str(data_file), "--no-lpips", "--json"]
    )
    assert res.exit_code == 0, res.output
    api = evaluate_tokenizer(saved, registry.build("dataset", DATA), lpips=False, device="cpu")
    assert json.loads(res.output) == pytest.approx(api.as_dict())


def _classifier(num_classes: int = 6, image_size: int = 16):
    torch.manual_seed(0)  # untrained: its readings are arbitrary, but fixed
    return registry.build(
        "classifier",
        {"type": "cnn", "num_classes": num_classes, "image_size": image_size, "widths": [8, 16],
         "class_names": ["circle", "square", "triangle", "diamond", "cross", "ring"][:num_classes]},
    )  # fmt: skip


def test_tokenizer_class_accuracy_equals_direct_counts(pipe: Pipeline) -> None:
    # A third of the items are unlabelled scene windows (label -1): left out of the counts.
    data = registry.build("dataset", {**DATA, "size": 24, "scene_fraction": 0.34})
    clf = _classifier()
    clf.train()
    result = evaluate_tokenizer(pipe.tokenizer, data, batch_size=5, lpips=False, classifier=clf)
    assert clf.training  # evaluation leaves the caller's mode as it was
    clf.eval()
    items = [data[i] for i in range(len(data))]
    keep = [i for i, it in enumerate(items) if it["label"] >= 0]
    assert 0 < len(keep) < len(items)
    x = torch.stack([items[i]["image"] for i in keep])
    y = torch.tensor([items[i]["label"] for i in keep])
    with torch.no_grad():
        recon = pipe.tokenizer.decode(pipe.tokenizer.encode(x)).clamp(-1, 1)
        hit_recon = clf.logits(recon).argmax(-1) == y
        hit_real = clf.logits(x).argmax(-1) == y
    assert result.images == len(items) and result.labelled_images == len(keep)
    assert result.class_accuracy == pytest.approx(float(hit_recon.float().mean()))
    assert result.real_class_accuracy == pytest.approx(float(hit_real.float().mean()))
    expected = {
        f"class_accuracy/{clf.class_names[c]}": float(hit_recon[y == c].float().mean())
        for c in sorted(set(y.tolist()))
    }
    out = result.as_dict()
    assert {k: v for k, v in out.items() if k.startswith("class_accuracy/")} == pytest.approx(
        expected
    )
    assert {"class_accuracy", "real_class_accuracy", "labelled_images"} <= set(out)


@pytest.mark.parametrize(
    ("items", "clf", "error", "message"),
    [
        ("plain", _classifier(num_classes=4), InputError, "label 5, but the classifier knows 4"),
        ("plain", _classifier(image_size=32), InputError, r"images \[B, 3, 32, 32\]"),
        ("unlabelled", _classifier(), DataError, "no item has a class label"),
        ("no_label_key", _classifier(), DataError, "items have no 'label'"),
    ],
)
def test_tokenizer_class_accuracy_bad_input(
    pipe: Pipeline, dataset, items: str, clf, error: type, message: str
) -> None:
    data: object = dataset
    if items == "unlabelled":
        data = registry.build("dataset", {**DATA, "scene_fraction": 1.0})
    elif items == "no_label_key":
        data = [{"image": dataset[i]["image"]} for i in range(4)]
    with pytest.raises(error, match=message):
        evaluate_tokenizer(pipe.tokenizer, data, lpips=False, classifier=clf)


def test_tokenizer_class_accuracy_from_the_command_line(saved: Path, tmp_path: Path) -> None:
    from latentgen.artifact import save_component

    clf_dir = save_component(_classifier(), "classifier", tmp_path / "clf")
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(DATA))
    args = ["eval", "tokenizer", str(saved), "--data", str(data_file), "--no-lpips"]
    res = CliRunner().invoke(main, [*args, "--classifier", str(clf_dir), "--json"])
    assert res.exit_code == 0, res.output
    api = evaluate_tokenizer(
        saved, registry.build("dataset", DATA), lpips=False, classifier=clf_dir, device="cpu"
    )
    assert json.loads(res.output) == pytest.approx(api.as_dict())
    assert "class_accuracy/circle" in json.loads(res.output)
    table = CliRunner().invoke(main, [*args, "--classifier", str(clf_dir)])
    assert table.exit_code == 0 and "real_class_accuracy:" in table.output


def test_prior_nll_equals_the_pipeline_log_likelihood(pipe: Pipeline, dataset) -> None:
    result = evaluate_prior(pipe, dataset, batch_size=4)
    x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = [dataset[i]["label"] for i in range(len(dataset))]
    nats = -float(pipe.log_likelihood(x, label=labels).sum())
    codes = pipe.encode(x).numel()
    assert isinstance(result, PriorEvaluation) and result.images == len(dataset)
    assert result.nll_nats_per_code == pytest.approx(nats / codes, rel=1e-5)
    assert result.bits_per_code == pytest.approx(nats / codes / math.log(2), rel=1e-5)
    assert result.bits_per_image_dim == pytest.approx(nats / x.numel() / math.log(2), rel=1e-5)


def test_prior_condition_keys(pipe: Pipeline, dataset) -> None:
    class Renamed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            item = dataset[i]
            return {"image": item["image"], "klass": item["label"]}

    with pytest.raises(DataError, match=r"needs dataset key 'label'.*condition_keys=\{'label'"):
        evaluate_prior(pipe, Renamed())
    mapped = evaluate_prior(pipe, Renamed(), condition_keys={"label": "klass"})
    direct = evaluate_prior(pipe, dataset, limit=3)
    assert mapped == direct
    with pytest.raises(InputError, match=r"names \['colour'\].*conditioners are \['label'\]"):
        evaluate_prior(pipe, dataset, condition_keys={"colour": "label"})


def test_prior_from_a_path_matches_the_command_line(saved: Path, tmp_path: Path) -> None:
    data_file = tmp_path / "data.yaml"
    data_file.write_text(json.dumps(DATA))  # JSON is YAML too
    res = CliRunner().invoke(
        main, ["eval", "prior", str(saved), "--data", str(data_file), "--json"]
    )
    assert res.exit_code == 0, res.output
    api = evaluate_prior(saved, registry.build("dataset", DATA), device="cpu")
    assert json.loads(res.output) == pytest.approx(api.as_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0}, "limit must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_arguments(pipe: Pipeline, dataset, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        evaluate_tokenizer(pipe.tokenizer, dataset, lpips=False, **kwargs)
    with pytest.raises(InputError, match=message):
        evaluate_prior(pipe, dataset, **kwargs)


def test_empty_dataset(pipe: Pipeline) -> None:
    with pytest.raises(DataError, match="empty"):
        evaluate_tokenizer(pipe.tokenizer, [], lpips=False)
