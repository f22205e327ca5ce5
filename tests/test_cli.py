"""The latentgen command line, as a user runs it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latentgen import Pipeline
from latentgen.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
            "prior": {
                "type": "toy.ngram",
                "vocab_size": 8,
                "conditions": {"label": {"vocab_size": 3}},
            },
            "conditioners": {
                "label": {"type": "class_label", "num_classes": 3, "class_names": ["a", "b", "c"]}
            },
        }
    )
    p.tokenizer.fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    path = tmp_path_factory.mktemp("pipe") / "p"
    p.save_pretrained(path, card={"image_size": 16})
    return path


def test_plugins_json():
    res = CliRunner().invoke(main, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert "class_label" in rows["latentgen"]["components"]["conditioner"]
    assert rows["latentgen-toy"]["components"]["prior"] == ["toy.ngram"]


def test_plugins_table_and_hook_filter():
    res = CliRunner().invoke(main, ["plugins", "--hook", "register_priors"])
    assert res.exit_code == 0 and "latentgen-toy" in res.output


def test_schema_kind():
    res = CliRunner().invoke(main, ["schema", "conditioner"])
    assert res.exit_code == 0
    defs = json.loads(res.output)["$defs"]  # a union over every conditioner type
    assert "num_classes" in defs["ClassLabelConfig"]["properties"]
    assert "num_keypoints" in defs["PoseConfig"]["properties"]


def test_sample_writes_grid(saved, tmp_path):
    out = tmp_path / "grid.png"
    args = [
        "sample",
        str(saved),
        "-n",
        "4",
        "--seed",
        "1",
        "-o",
        str(out),
        "-c",
        '"b"',
        "--top-k",
        "3",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "NAME=VALUE" in res.output
    args[-3] = "label=[0, 2]"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert Image.open(out).size[0] > 16
    first = out.read_bytes()
    assert CliRunner().invoke(main, args).exit_code == 0
    assert out.read_bytes() == first, "the same seed must write the same grid"
    res = CliRunner().invoke(main, [*args[:-4], "-c", "label=b"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sample", "/nonexistent/dir"], "not a directory"),
        (["sample", "{saved}", "-c", "label=7"], "label 7 is outside [0, 3)"),
        (["sample", "{saved}", "-c", "label=1", "--top-p", "1.5"], "top_p"),
        (["sample", "{saved}", "-c", "label=1", "-o", "x.jpg"], ".png"),
        (["schema", "priors"], "did you mean 'prior'"),
    ],
)
def test_bad_input_is_one_clear_error(saved, args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{saved}", str(saved)) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0
    assert needle in res.output
    assert "Traceback" not in res.output


def test_sample_conditions_from_files(saved, tmp_path):
    import numpy as np

    (tmp_path / "labels.txt").write_text("0\n2\n")
    (tmp_path / "labels.json").write_text("[1, 2]")
    np.save(tmp_path / "labels.npy", np.array([2, 0]))
    for name in ("labels.txt", "labels.json", "labels.npy"):
        out = tmp_path / f"{name}.png"
        res = CliRunner().invoke(
            main,
            ["sample", str(saved), "-n", "2", "-o", str(out), "-c", f"label=@{tmp_path / name}"],
        )
        assert res.exit_code == 0, res.output
        assert out.is_file()
    res = CliRunner().invoke(main, ["sample", str(saved), "-c", "label=@/nonexistent.txt"])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_sample_with_more_labels_than_divide_the_default_count_names_the_fix(saved, tmp_path):
    """Three labels and the default -n 8: refused, naming the counts that work; -n 6 works."""
    out = tmp_path / "three.png"
    args = ["sample", str(saved), "-c", "label=[0,1,2]", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and not out.exists()
    assert "num_images=8 must be a multiple of the 3 conditions given" in res.output
    assert "ask for 3 or 6 images (`-n` on the command line)" in res.output
    res = CliRunner().invoke(main, [*args, "-n", "6"])
    assert res.exit_code == 0, res.output
    assert "wrote 6 images" in res.output
