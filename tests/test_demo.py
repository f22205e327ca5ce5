"""The README's main job (`latentgen demo`) runs end to end: shipped configs, shrunk to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import latentgen.demo as demo
from latentgen import Pipeline, registry
from latentgen.artifact import save_component
from latentgen.data.shapes import CLASSES, ShapesConfig, ShapesDataset


def _tiny_configs(monkeypatch) -> None:
    shipped = demo.demo_configs

    def tiny(out: Path) -> tuple[Path, Path]:
        paths = shipped(out)
        for path in paths:
            cfg = yaml.safe_load(path.read_text())
            cfg["data"]["size"] = 64
            t = cfg["trainer"]
            t.update(max_steps=4, batch_size=4, checkpoint_every=4, grid_every=4, warmup_steps=1)
            if "disc_start" in cfg.get("tokenizer", {}):
                cfg["tokenizer"]["disc_start"] = 2  # both halves of the VQGAN step run
                cfg["tokenizer"]["disc_warmup_steps"] = 1
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return paths

    monkeypatch.setattr(demo, "demo_configs", tiny)


def test_demo_trains_one_pipeline_measures_it_and_ends_with_a_large_image(
    tmp_path, monkeypatch, capsys
):
    _tiny_configs(monkeypatch)
    clf = registry.build("classifier", {"type": "cnn", "num_classes": 6, "widths": [4, 8]})
    save_component(clf, "classifier", tmp_path / "clf")
    out = tmp_path / "demo"
    written = demo.run_demo(out, classifier=tmp_path / "clf", samples_per_class=2, large_size=64)

    names = ("samples", "samples_rejection", "reconstructions", "large", "segmentation_map")
    for name in (*names, "metrics"):
        assert written[name].is_file() and written[name].parent == out, name
    for name in ("samples", "samples_rejection"):
        grid = Image.open(written[name])
        assert grid.size == (2 * 34 + 2, 6 * 34 + 2)  # six rows (classes) of two 32px samples

    metrics = json.loads(written["metrics"].read_text())
    assert metrics["samples"] == 12
    assert set(metrics["class_accuracy_per_class"]) == set(CLASSES)
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    assert metrics["kid"]["subset_size"] == 12 and metrics["kid"]["std_error"] >= 0
    assert 0 < metrics["reconstruction_psnr_db"] < 100
    # the share of 256 held-out reconstructions the scoring classifier reads as their class
    from latentgen.classifiers import load_classifier

    held = ShapesDataset(ShapesConfig(size=256, image_size=32, seed=demo.HELD_OUT_SEED))
    x = torch.stack([held[i]["image"] for i in range(256)])
    y = torch.tensor([held[i]["label"] for i in range(256)])
    with torch.no_grad():
        recon = Pipeline.from_pretrained(written["pipeline"]).reconstruct(x).clamp(-1, 1)
        read = load_classifier(tmp_path / "clf").logits(recon).argmax(-1)
    assert metrics["reconstruction_images"] == 256
    direct = float((read == y).float().mean())
    assert metrics["reconstruction_class_accuracy"] == pytest.approx(direct)
    assert metrics["large_image"]["size"] == [64, 64] and metrics["large_image"]["codes"] == 256
    assert metrics["large_image"]["window"] == "cached"
    assert metrics["large_image"]["cells"] == 4
    assert metrics["large_image"]["cells_following_the_map"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert metrics["seconds"]["total"] > 0
    # rejection sampling: the best 12 of 48 candidates under the shipped second classifier,
    # scored by the same classifier as the plain samples
    rej = metrics["rejection"]
    assert rej["acceptance_rate"] == 0.25 and rej["candidates"] == 48
    assert rej["realised_rate"] == 0.25
    assert rej["ranker_held_out_accuracy"] > 0.98  # the shipped ranker, not the test's classifier
    assert set(rej["class_accuracy_per_class"]) == set(CLASSES)
    assert rej["kid"]["subset_size"] == 12
    line = capsys.readouterr().out.splitlines()[-1]
    assert f"class accuracy {metrics['class_accuracy']:.1%} of 12 samples" in line
    assert f"; {rej['class_accuracy']:.1%} keeping the best 12 of 48 candidates by a " in line
    assert f"reconstruction PSNR {metrics['reconstruction_psnr_db']:.2f} dB, " in line
    assert f"{metrics['reconstruction_class_accuracy']:.1%} read as their class" in line

    # the map beside the image is the scene it was drawn from
    from latentgen.conditioners.scene import colour_segmentation, shapes_scene

    ids = shapes_scene(64, cell=32, seed=2 * 10**6)
    assert written["segmentation_map"].name == "large-64-map.png"
    got = np.array(Image.open(written["segmentation_map"]).convert("RGB"))
    assert np.array_equal(got, np.array(colour_segmentation(ids)))
    assert Image.open(written["large"]).size == (64, 64)

    # one pipeline draws from a label alone, a map alone, or both
    pipe = Pipeline.from_pretrained(written["pipeline"])
    assert set(pipe.conditioners) == {"label", "segmentation"}
    assert pipe.card["image_size"] == [32, 32]  # trained size, so sampling needs no --size
    g = torch.Generator().manual_seed(0)
    assert pipe(label=[1], generator=g)[0].size == (32, 32)
    assert pipe(segmentation=ids, size=64)[0].size == (64, 64)
    both = pipe(label=[2], segmentation=ids[:32, :32], generator=g)
    assert both[0].size == (32, 32)


def test_demo_without_rejection_writes_no_rejected_grid(tmp_path, monkeypatch, capsys):
    _tiny_configs(monkeypatch)
    out = tmp_path / "demo"
    written = demo.run_demo(out, samples_per_class=1, large_size=32, acceptance_rate=1)
    assert "samples_rejection" not in written and not (out / "samples-rejection.png").exists()
    assert "rejection" not in json.loads(written["metrics"].read_text())
    assert "second classifier" not in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_demo_refuses_a_bad_acceptance_rate_before_training(tmp_path, rate):
    from latentgen.errors import InputError

    with pytest.raises(InputError, match=r"acceptance_rate must lie in \(0, 1\]"):
        demo.run_demo(tmp_path / "demo", acceptance_rate=rate)
    assert not (tmp_path / "demo").exists()  # refused before anything was written


def test_demo_cli_refuses_a_bad_acceptance_rate(tmp_path):
    from click.testing import CliRunner

    from latentgen.cli import main

    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--acceptance", "2"])
    assert result.exit_code != 0
    assert "acceptance_rate must lie in (0, 1], got 2.0" in result.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("which", ["shapes_classifier_path", "shapes_ranker_path"])
def test_shipped_classifiers_are_above_98_percent_on_fresh_held_out_shapes(which):
    path = getattr(demo, which)()
    if not (path / "component.json").is_file():
        pytest.fail(f"the shipped shapes classifier is missing at {path}")
    from latentgen.classifiers import load_classifier
    from latentgen.classifiers.training import LabelledImages, accuracy

    clf = load_classifier(path)
    assert clf.class_names == CLASSES and clf.image_size == 32
    assert clf.held_out_accuracy is not None and clf.held_out_accuracy > 0.98
    # shapes it never saw, from seeds beyond both its training and its held-out data
    fresh = demo.ShapesDataset(demo.ShapesConfig(size=400, image_size=32, seed=5 * 10**6))
    assert accuracy(clf, LabelledImages(fresh, range(400), 6, "fresh")) > 0.97


def test_the_ranker_is_another_classifier_than_the_reference():
    """Trained on other items with another seed: other weights, and other calls on samples
    that are hard to read (here: real shapes blurred), where the two can disagree."""
    from latentgen.classifiers import load_classifier

    ref = load_classifier(demo.shapes_classifier_path())
    rank = load_classifier(demo.shapes_ranker_path())
    w_ref, w_rank = ref.state_dict(), rank.state_dict()
    assert w_ref.keys() == w_rank.keys()
    assert all(not torch.equal(w_ref[k], w_rank[k]) for k in w_ref if w_ref[k].is_floating_point())
    data = demo.ShapesDataset(demo.ShapesConfig(size=200, image_size=32, seed=6 * 10**6))
    images = torch.stack([data[i]["image"] for i in range(200)])
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    with torch.no_grad():
        p_ref, p_rank = ref.probs(blurred), rank.probs(blurred)
    assert (p_ref - p_rank).abs().max() > 0.1


def test_map_agreement_reads_each_cell_as_its_maps_main_shape(tmp_path):
    """The demo's measure of a large image following its map: real shapes images laid out as
    the scene's map agree with it; the same images in another order do not."""
    from latentgen.classifiers import load_classifier
    from latentgen.conditioners.scene import shapes_scene

    clf = load_classifier(demo.shapes_classifier_path())
    seed, n = 7, 4  # a 4x4 scene of 32px cells
    ids = shapes_scene(n * 32, cell=32, seed=seed)
    data = demo.ShapesDataset(demo.ShapesConfig(size=n * n, image_size=32, seed=seed))
    images = torch.stack([data[i]["image"] for i in range(n * n)])  # [16, 3, 32, 32]

    def write(order: list[int]) -> Path:
        tiles = images[order].view(n, n, 3, 32, 32).permute(2, 0, 3, 1, 4).reshape(3, 128, 128)
        path = tmp_path / f"scene-{order[0]}.png"
        demo.to_pil(tiles[None])[0].save(path)
        return path

    assert demo._map_agreement(clf, write(list(range(n * n))), ids, 32) >= 0.9
    labels = [data[i]["label"] for i in range(n * n)]
    other = sorted(range(n * n), key=lambda i: (labels[i] + 1) % 6)  # another shape per cell
    mismatched = sum(labels[i] != labels[j] for i, j in zip(other, range(n * n), strict=True))
    got = demo._map_agreement(clf, write(other), ids, 32)
    assert got <= 1 - mismatched / (n * n) + 0.1
