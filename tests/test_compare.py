"""latentgen compare: priors on one code cache at equal steps or equal time, measured alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latentgen import registry
from latentgen.artifact import save_component
from latentgen.cli import main
from latentgen.compare import load_compare_config, run_compare
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import SpecError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = registry.build("tokenizer", {"type": "toy.palette", "vocab_size": 8, "downsample": 4})
    ds = ShapesDataset(ShapesConfig(size=32, image_size=16))
    tok.fit(torch.stack([ds[i]["image"] for i in range(32)]))
    return save_component(tok, "tokenizer", tmp_path_factory.mktemp("tok") / "palette")


def config(tokenizer_dir, out, **changes):
    cfg = {
        "name": "tiny",
        "out_dir": str(out),
        "tokenizer_path": str(tokenizer_dir),
        "data": {"type": "shapes", "size": 32, "image_size": 16},
        "held_out": {"type": "shapes", "size": 16, "image_size": 16, "seed": 999},
        "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
        "priors": {
            "gpt": {
                "type": "transformer",
                "vocab_size": 8,
                "block_size": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_embd": 16,
                "conditions": {"label": {"vocab_size": 6}},
            },
            "snail": {
                "type": "pixelsnail",
                "vocab_size": 8,
                "channel": 8,
                "n_block": 1,
                "n_res_block": 1,
                "res_channel": 8,
                "n_head": 2,
                "key_channel": 4,
                "value_channel": 8,
                "max_height": 4,
                "max_width": 4,
                "conditions": {"label": {"vocab_size": 6}},
            },
        },
        "budgets": [{"steps": 4}, {"seconds": 0.5}],
        "calibration_steps": 8,
        "trainer": {"batch_size": 4, "lr": 0.001},
        "evaluation": {"held_out_images": 8, "sample_batch": 2},
    }
    cfg.update(changes)
    return cfg


def test_equal_steps_and_equal_time(tokenizer_dir, tmp_path):
    result = run_compare(config(tokenizer_dir, tmp_path))
    rows = result.rows
    assert [(r["budget"], r["prior"]) for r in rows] == [
        ("steps=4", "gpt"),
        ("steps=4", "snail"),
        ("time=0.5s", "gpt"),
        ("time=0.5s", "snail"),
    ]
    assert rows[0]["steps"] == rows[1]["steps"] == 4
    for r in rows[2:]:
        # a time budget is the steps that fit in it at the prior's measured time per step
        assert r["steps"] == max(1, int(0.5 / r["s_per_step"]))
    for r in rows:
        assert 0 < r["held_out_bits_per_code"] < 10 and r["sample_codes_per_s"] > 0
        assert r["params"] > 0
    # one code cache for all priors; calibration runs are not left behind
    root = tmp_path / "tiny"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "code_cache",
        "steps-4-gpt",
        "steps-4-snail",
        "time-0.5s-gpt",
        "time-0.5s-snail",
    ]
    lines = result.jsonl.read_text().splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(rows))
    png = Image.open(result.curves_png)
    assert png.size == (960, 340)
    curve = result.curves["steps=4 gpt"]
    assert [s for s, _, _ in curve] == sorted(s for s, _, _ in curve) and curve[-1][0] == 4
    assert "held_out_bits_per_code" in result.table().splitlines()[0]


def test_compare_cli(tokenizer_dir, tmp_path):
    import yaml

    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config(tokenizer_dir, tmp_path, budgets=[{"steps": 2}])))
    res = CliRunner().invoke(main, ["compare", "--config", str(path), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [r["prior"] for r in rows] == ["gpt", "snail"] and rows[0]["steps"] == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budgets": [{"steps": 5, "seconds": 2}]}, "either {steps: N}"),
        ({"budgets": []}, "budgets"),
        ({"trainer": {"batch_size": 4, "lr": 0.001, "max_steps": 9}}, "give the length"),
        ({"trainer": {"batch_size": 4, "lr": -1}}, "lr"),
        ({"conditioners": {}}, "prior 'gpt' is built for conditions \\['label'\\]"),
        ({"priors": {}}, "give `priors` .* or `tokenizers` .*both are empty"),
        ({"tokenizer_path": None}, "set tokenizer_path"),
        (
            {"evaluation": {"classifier": "latentgen:nope"}},
            "no weights latentgen:nope ship with latentgen; the shipped ones are "
            "latentgen:shapes-classifier",
        ),
        ({"evaluation": {"steps": [8, 0]}}, "steps \\[0\\]: a sampling pass count is at least 1"),
        (
            {"evaluation": {"refine_steps": [0, -1]}},
            "refine_steps \\[-1\\]: a count of refinement passes is at least 0",
        ),
    ],
)
def test_bad_configs(tokenizer_dir, tmp_path, changes, message):
    with pytest.raises(SpecError, match=message):
        load_compare_config(config(tokenizer_dir, tmp_path, **changes))


def test_a_shipped_classifier_by_name(tokenizer_dir, tmp_path):
    """`latentgen:shapes-classifier` in a config is the classifier shipped with latentgen."""
    from latentgen.demo import shapes_classifier_path

    evaluation = {"classifier": "latentgen:shapes-classifier"}
    cfg = load_compare_config(config(tokenizer_dir, tmp_path, evaluation=evaluation))
    assert cfg.evaluation.classifier == shapes_classifier_path()
    assert (cfg.evaluation.classifier / "component.json").is_file()
    configs = Path(__file__).resolve().parents[1] / "src" / "latentgen" / "configs"
    for shipped in sorted(configs.glob("compare-*.yaml")):  # each names the shipped one
        assert load_compare_config(shipped).evaluation.classifier == shapes_classifier_path()


def test_prior_of_another_vocabulary(tokenizer_dir, tmp_path):
    cfg = config(tokenizer_dir, tmp_path)
    cfg["priors"]["gpt"]["vocab_size"] = 16
    with pytest.raises(SpecError, match="prior 'gpt' predicts 16 codes .* has 8.*vocab_size = 8"):
        run_compare(cfg)


def test_tokenizers_at_equal_steps(tmp_path):
    torch.manual_seed(0)
    clf = registry.build(
        "classifier", {"type": "cnn", "num_classes": 6, "image_size": 16, "widths": [8, 16]}
    )
    clf_dir = save_component(clf, "classifier", tmp_path / "clf")
    held = registry.build("dataset", {"type": "shapes", "size": 8, "image_size": 16, "seed": 999})
    vqvae = {
        "type": "vqvae",
        "ch": 8,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "z_channels": 4,
        "resolution": 16,
    }
    cfg = {
        "name": "toks",
        "out_dir": str(tmp_path),
        "data": {"type": "shapes", "size": 16, "image_size": 16},
        "held_out": {"type": "shapes", "size": 8, "image_size": 16, "seed": 999},
        "tokenizers": {
            "k16": {**vqvae, "quantizer": {"type": "vq", "codebook_size": 16, "dim": 4}},
            "k64": {**vqvae, "quantizer": {"type": "vq", "codebook_size": 64, "dim": 4}},
        },
        "budgets": [{"steps": 3}],
        "trainer": {"batch_size": 4, "lr": 0.001},
        "evaluation": {"held_out_images": 8, "classifier": str(clf_dir)},
    }
    result = run_compare(cfg)
    assert [(r["tokenizer"], r["steps"]) for r in result.rows] == [("k16", 3), ("k64", 3)]
    assert {r["codebook_size"] for r in result.rows} == {16, 64}
    for r in result.rows:
        assert r["psnr_db"] > 0 and 0 < r["codebook_usage"] <= 1
        assert 0 <= r["class_accuracy"] <= 1  # reconstructions read as their class
        assert not any(k.startswith("class_accuracy/") for k in r)  # per class: eval tokenizer
    # both tokenizers' originals are the same held-out images under the same classifier
    (real,) = {r["real_class_accuracy"] for r in result.rows}
    clf.eval()
    x = torch.stack([held[i]["image"] for i in range(8)])
    y = torch.tensor([held[i]["label"] for i in range(8)])
    with torch.no_grad():
        assert real == pytest.approx(float((clf.logits(x).argmax(-1) == y).float().mean()))
    assert not (tmp_path / "toks" / "code_cache").exists()
    with pytest.raises(SpecError, match="conditioners condition priors"):
        load_compare_config(
            {**cfg, "conditioners": {"label": {"type": "class_label", "num_classes": 6}}}
        )


def test_eval_samples_figures_with_a_classifier(tokenizer_dir, tmp_path):
    from latentgen.artifact import save_component as save

    clf = registry.build(
        "classifier", {"type": "cnn", "num_classes": 6, "image_size": 16, "widths": [8, 16]}
    )
    clf_dir = save(clf, "classifier", tmp_path / "clf")
    evaluation = {
        "held_out_images": 8,
        "sample_batch": 2,
        "classifier": str(clf_dir),
        "num_samples": 2,
        "kid_subset_size": 6,
        "kid_subsets": 3,
        "acceptance_rate": 0.5,
    }
    cfg = config(tokenizer_dir, tmp_path, budgets=[{"steps": 2}], evaluation=evaluation)
    cfg["priors"].pop("snail")
    (row,) = run_compare(cfg).rows
    for key in ("class_accuracy", "kid", "kid_std_error", "fid"):
        assert key in row and f"rejection@0.5_{key}" in row
    assert 0 <= row["class_accuracy"] <= 1


def test_a_warmup_longer_than_the_timing_run(tokenizer_dir, tmp_path):
    """A trainer warmup (here 6 steps) longer than the calibration run (4 steps) is accepted:
    calibration times a constant schedule, and the warmup is checked against the step budget."""
    cfg = config(
        tokenizer_dir,
        tmp_path,
        budgets=[{"steps": 7}, {"seconds": 1.0}],
        calibration_steps=6,
        trainer={"batch_size": 4, "lr": 0.001, "warmup_steps": 6},
    )
    cfg["priors"].pop("snail")
    rows = run_compare(cfg).rows
    assert [(r["budget"], r["steps"] >= 1) for r in rows] == [("steps=7", True), ("time=1s", True)]
    metrics = tmp_path / "tiny" / "steps-7-gpt" / "metrics.jsonl"
    lrs = [json.loads(line)["lr/prior"] for line in metrics.read_text().splitlines()]
    assert lrs[0] < lrs[4]  # the warmup ran: the rate rose over the first steps
    with pytest.raises(SpecError, match="warmup_steps=6 is longer than the cosine decay \\(5"):
        load_compare_config({**cfg, "budgets": [{"steps": 5}, {"seconds": 1.0}]})


def test_a_segmentation_comparison_reports_how_well_samples_follow_their_map(
    tokenizer_dir, tmp_path
):
    """A spatially conditioned comparison has no class accuracy, but eval samples' agreement
    of each sample with its condition becomes a column of the table."""
    from latentgen.artifact import save_component as save

    clf = registry.build(
        "classifier", {"type": "cnn", "num_classes": 6, "image_size": 16, "widths": [8, 16]}
    )
    seg = {"vocab_size": 7, "num_tokens": 16}
    cfg = config(
        tokenizer_dir,
        tmp_path,
        budgets=[{"steps": 2}],
        conditioners={"segmentation": {"type": "segmentation", "num_classes": 7, "downsample": 4}},
        evaluation={
            "held_out_images": 8,
            "sample_batch": 2,
            "classifier": str(save(clf, "classifier", tmp_path / "clf")),
            "num_samples": 6,
            "kid_subset_size": 6,
            "kid_subsets": 3,
            "steps": [2],
        },
    )
    gpt = cfg["priors"]["gpt"]
    gpt["conditions"] = {"segmentation": seg}
    cfg["priors"] = {
        "gpt": gpt,
        "masked": {**gpt, "type": "masked", "local_conv": 3},
    }
    result = run_compare(cfg)
    assert [r["prior"] for r in result.rows] == ["gpt", "masked"]
    for row in result.rows:
        assert "class_accuracy" not in row  # no class condition
        assert 0 <= row["segmentation_main_class_accuracy"] <= 1
        assert "kid" in row and "fid" in row
