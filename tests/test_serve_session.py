"""The page's work without the page: ``Studio`` runs, conditions from page values, bad input."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from latentgen import Pipeline
from latentgen.errors import DataError, InputError
from latentgen.serve.inputs import (
    class_choices,
    label_map_from_colours,
    label_map_from_painting,
    palette,
)
from latentgen.serve.session import Cancelled, ConditionValue, GenerateRequest, Studio

TOKENIZER = {"type": "toy.palette", "vocab_size": 8, "downsample": 4}


def _prior(conditions):
    return {
        "type": "transformer",
        "vocab_size": 8,
        "block_size": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "conditions": conditions,
    }


@pytest.fixture(scope="module")
def spatial(tmp_path_factory):
    """A pipeline with a depth map and a pose: the "image" and "keypoints" inputs."""
    root = tmp_path_factory.mktemp("spatial")
    spec = {
        "tokenizer": TOKENIZER,
        "prior": _prior(
            {
                "depth": {"vocab_size": 8, "num_tokens": 16},
                "pose": {"vocab_size": 4, "num_tokens": 16},
            }
        ),
        "conditioners": {
            "depth": {"type": "depth", "downsample": 4, "levels": 8},
            "pose": {"type": "pose", "num_keypoints": 3, "image_size": 16, "downsample": 4},
        },
    }
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(spec)
    pipe.card["image_size"] = 16
    pipe.save_pretrained(root / "pipe")
    return Studio(root / "pipe", root / "out", max_pixels=100_000)


def test_palette_is_distinct_and_starts_black():
    colours = palette(300)
    assert colours[0] == (0, 0, 0)
    assert len(set(colours)) == 300


def test_class_choices_use_the_names():
    from latentgen.conditioners.base import RawInput

    assert class_choices(RawInput("class", count=2, names=("cat", "dog"))) == [
        ("0: cat", 0),
        ("1: dog", 1),
    ]
    assert class_choices(RawInput("class", count=2), card_names=["a", "b"])[1] == ("1: b", 1)
    assert class_choices(RawInput("class", count=2))[1] == ("1", 1)


def test_painting_maps_strokes_to_classes_and_resizes():
    paint = np.zeros((8, 8, 4), np.uint8)
    r, g, b = palette(4)[2]
    paint[:4, :4] = (r - 10, g + 5, b, 255)  # a soft brush edge: near, not equal
    ids = label_map_from_painting(paint, 4, (16, 16))
    assert ids.shape == (16, 16)
    assert (ids[:8, :8] == 2).all() and (ids[8:] == 0).all() and (ids[:, 8:] == 0).all()


def test_a_colour_map_must_use_the_palette():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0] = palette(3)[1]
    ids = label_map_from_colours(Image.fromarray(rgb), 3)
    assert ids[0].tolist() == [1, 1, 1, 1] and (ids[1:] == 0).all()
    rgb[1, 1] = (9, 9, 9)
    with pytest.raises(InputError, match=r"1 pixels in colours that are not in the class palette"):
        label_map_from_colours(Image.fromarray(rgb), 3)


def test_depth_upload_and_keypoints_text_give_a_run_the_cli_repeats(spatial, tmp_path):
    depth = tmp_path / "d.png"
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)), mode="L").save(depth)
    pose = "[[0.5, 0.5, 1], [0.2, 0.2, 1], [0.8, 0.8, 0]]"
    req = GenerateRequest(
        conditions={
            "depth": ConditionValue(file=str(depth)),
            "pose": ConditionValue(text=pose),
        },
        size=(16, 16),
        num_images=2,
        seed=1,
        top_k=4,
    )
    res = spatial.generate(req)
    assert res.folder.parent == spatial.out_dir
    assert (res.folder / "cond-depth.png").read_bytes() == depth.read_bytes()
    assert json.loads((res.folder / "cond-pose.json").read_text()) == json.loads(pose)
    assert f"-c depth=@{res.folder / 'cond-depth.png'}" in res.command
    assert "--top-k 4" in res.command
    settings = json.loads((res.folder / "settings.json").read_text())
    assert settings["command"] == res.command and settings["size"] == [16, 16]

    import shlex

    from click.testing import CliRunner

    from latentgen.cli import main

    out = tmp_path / "again.png"
    args = [a if a != "samples.png" else str(out) for a in shlex.split(res.command)[1:]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(res.grid)))


def test_bad_inputs_name_the_problem_and_write_nothing(spatial, tmp_path):
    before = sorted(spatial.out_dir.glob("*"))
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    good_pose = ConditionValue(text="[[0.5, 0.5, 1], [0.2, 0.2, 1], [0.8, 0.8, 1]]")
    cases = [
        (
            {"depth": ConditionValue(file=str(notes)), "pose": good_pose},
            DataError,
            "cannot read image",
        ),
        (
            {"depth": ConditionValue(), "pose": good_pose},
            InputError,
            "condition 'depth' is empty: upload an image",
        ),
        (
            {"depth": ConditionValue(text="[[0.0]]"), "pose": ConditionValue(text="[[0.5, 0.5")},
            InputError,
            "keypoints are not valid JSON",
        ),
    ]
    for conds, error, match in cases:
        with pytest.raises(error, match=match):
            spatial.generate(GenerateRequest(conditions=conds, size=(16, 16)))
    with pytest.raises(InputError, match="above this server's limit of 100,000"):
        spatial.generate(GenerateRequest(conditions=cases[0][0], size=(512, 512), num_images=1))
    with pytest.raises(InputError, match="multiples of its downsample factor 4"):
        spatial.generate(GenerateRequest(conditions=cases[0][0], size=(18, 16)))
    with pytest.raises(InputError, match="number of images must be at least 1"):
        spatial.generate(GenerateRequest(conditions=cases[0][0], num_images=0))
    assert sorted(spatial.out_dir.glob("*")) == before, "no run folder, no temp folder left"


def test_cancel_stops_the_draw_and_writes_nothing(spatial, tmp_path):
    before = sorted(spatial.out_dir.glob("*"))
    depth = tmp_path / "d.png"
    Image.fromarray(np.zeros((64, 64), np.uint8), mode="L").save(depth)
    event = threading.Event()
    seen = []

    def on_code(done, total):
        seen.append(done)
        if done >= 40:
            event.set()  # as the Cancel button does, from another thread

    req = GenerateRequest(
        conditions={
            "depth": ConditionValue(file=str(depth)),
            "pose": ConditionValue(text="[[0.5, 0.5, 1], [0.2, 0.2, 1], [0.8, 0.8, 1]]"),
        },
        size=(64, 64),
        num_images=2,
    )
    with pytest.raises(Cancelled):
        spatial.generate(req, on_code=on_code, cancel=event)
    assert seen[-1] < 2 * 16 * 16
    assert sorted(spatial.out_dir.glob("*")) == before


def test_tokenizer_inspection(spatial, tmp_path):
    path = tmp_path / "p.png"
    rgb = np.random.default_rng(0).integers(0, 256, (18, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    res = spatial.inspect(path)
    m = res.metrics
    assert m["size"] == [16, 16] and m["code_grid"] == [4, 4]
    assert m["codebook_size"] == 8 and 1 <= m["distinct_codes"] <= 8
    assert m["codebook_usage"] == pytest.approx(m["distinct_codes"] / 8)
    recon = np.asarray(Image.open(res.reconstruction), dtype=np.float64)
    orig = np.asarray(Image.open(res.original), dtype=np.float64)
    mse = ((recon - orig) ** 2).mean()
    assert m["psnr_db"] == pytest.approx(10 * np.log10(255**2 / mse), abs=0.05)
    assert isinstance(m["lpips"], float) or m["lpips"].startswith("n/a")
    grid = np.asarray(Image.open(res.code_grid))
    codes = np.load(res.codes, allow_pickle=False)[0]
    assert grid.shape == (16, 16, 3)
    same = codes[0, 0] == codes[0, 1]
    assert same == bool((grid[0, 0] == grid[0, 4]).all()), "one colour per code index"
    with pytest.raises(DataError, match="missing.png does not exist"):
        spatial.inspect(tmp_path / "missing.png")


def test_serve_without_gradio_names_the_extra(spatial, monkeypatch):
    from latentgen.serve.app import build_app, launch

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(InputError, match=r"pip install 'latentgen\[ui\]'"):
        build_app(spatial)
    before = sorted(spatial.out_dir.rglob("*"))
    with pytest.raises(InputError, match=r"latentgen serve needs Gradio, an optional extra"):
        launch(spatial, block=False)
    assert sorted(spatial.out_dir.rglob("*")) == before


def test_serve_command_refuses_a_missing_pipeline_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code == 1
    assert "nope is not a directory. A saved pipeline is a directory" in result.output
    assert not out.exists()


def test_clicking_keypoints_fills_the_pose_in_order(spatial, tmp_path):
    gr = pytest.importorskip("gradio")
    from latentgen.serve.app import build_app
    from latentgen.serve.clicks import keypoint_clicker

    def at(x, y):  # what Gradio hands the handler for a click on an image
        return gr.SelectData(None, {"index": [x, y], "value": None})

    click = keypoint_clicker(count=3, side=100)
    text = None
    for x, y in [(49, 49), (19, 79), (89, 9)]:
        text, picture = click(text, at(x, y))
    assert json.loads(text) == [[0.495, 0.495, 1], [0.195, 0.795, 1], [0.895, 0.095, 1]]
    rgb = np.asarray(picture)
    assert tuple(rgb[49, 49]) == palette(4)[1] and tuple(rgb[79, 19]) == palette(4)[2]
    text, _ = click(text, at(0, 0))
    assert json.loads(text) == [[0.005, 0.005, 1]], "a click after the last starts a new pose"
    # the clicked pose is a valid condition, and the page for this pipeline builds
    depth = tmp_path / "d.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(depth)
    req = GenerateRequest(
        conditions={
            "depth": ConditionValue(file=str(depth)),
            "pose": ConditionValue(text=click(None, at(5, 5))[0]),
        },
        size=(16, 16),
    )
    with pytest.raises(InputError, match="pose"):  # one keypoint of three: the pose refuses it
        spatial.generate(req)
    assert build_app(spatial) is not None
