"""The reference classifier: its interface, artifact round trip, training, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latentgen import registry
from latentgen.artifact import save_component
from latentgen.classifiers import Classifier, CNNClassifier, load_classifier
from latentgen.classifiers.training import (
    ClassifierTrainConfig,
    accuracy,
    prepare_classifier_data,
    train_classifier,
)
from latentgen.cli import main
from latentgen.errors import DataError, InputError, SpecError


def _tiny(**kw) -> CNNClassifier:
    cfg = {"type": "cnn", "num_classes": 3, "image_size": 16, "widths": [8, 16], **kw}
    return registry.build("classifier", cfg)


def test_interface_shapes_and_probabilities() -> None:
    torch.manual_seed(0)
    clf = _tiny(feature_dim=24, class_names=["a", "b", "c"]).eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    assert clf.features(x).shape == (5, 24)
    assert clf.logits(x).shape == (5, 3)
    p = clf.probs(x)
    assert torch.allclose(p.sum(-1), torch.ones(5)) and (p >= 0).all()
    assert (clf.num_classes, clf.image_size, clf.class_names) == (3, 16, ("a", "b", "c"))
    assert clf.held_out_accuracy is None
    # GroupNorm: an image scores the same alone as inside a batch
    assert torch.allclose(clf.logits(x[:1]), clf.logits(x)[:1], atol=1e-5)


def test_default_class_names_and_registration() -> None:
    assert "classifier" in registry.kinds()
    info = registry.get("classifier", "cnn")
    assert info.cls is CNNClassifier and info.plugin == "latentgen"
    assert _tiny().class_names == ("class_0", "class_1", "class_2")


@pytest.mark.parametrize(
    ("shape", "dtype", "needle"),
    [
        ((2, 3, 32, 32), torch.float32, "Resize the images to 16x16"),
        ((2, 1, 16, 16), torch.float32, "[B, 3, 16, 16]"),
        ((3, 16, 16), torch.float32, "got (3, 16, 16)"),
        ((2, 3, 16, 16), torch.uint8, "x / 127.5 - 1"),
    ],
)
def test_wrong_images_are_refused_with_the_fix(shape, dtype, needle) -> None:
    with pytest.raises(InputError) as err:
        _tiny().probs(torch.zeros(shape, dtype=dtype))
    assert needle in str(err.value)


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="one name per class"):
        registry.parse_component(
            "classifier", {"type": "cnn", "num_classes": 3, "class_names": ["a"]}
        )
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*3"):
        registry.parse_component(
            "classifier",
            {"type": "cnn", "num_classes": 3, "image_size": 20, "widths": [4, 4, 4, 4]},
        )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    clf = _tiny(held_out_accuracy=0.875)
    save_component(clf, "classifier", tmp_path / "clf")
    again = load_classifier(tmp_path / "clf")
    assert isinstance(again, Classifier) and not again.training
    assert again.held_out_accuracy == 0.875
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(again.logits(x), clf.eval().logits(x))


def test_load_classifier_refuses_another_kind(tmp_path: Path) -> None:
    from latentgen.errors import CheckpointError

    tok = registry.build("tokenizer", {"type": "toy.palette", "vocab_size": 8, "downsample": 4})
    save_component(tok, "tokenizer", tmp_path / "tok")
    with pytest.raises(CheckpointError, match="holds a tokenizer, not a classifier"):
        load_classifier(tmp_path / "tok")


# -- training ------------------------------------------------------------------------------------
def _folder(root: Path, n: int = 12) -> Path:
    """Two classes anyone can tell apart: dark and bright images, 16x16, in class sub-folders."""
    g = torch.Generator().manual_seed(0)
    for name, base in (("dark", 30), ("bright", 220)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            noise = torch.randint(-25, 25, (16, 16, 3), generator=g)
            arr = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _train_cfg(tmp_path: Path, data: dict, **kw) -> ClassifierTrainConfig:
    return ClassifierTrainConfig.model_validate(
        {
            "classifier": {"type": "cnn", "num_classes": 2, "image_size": 16, "widths": [8, 16]},
            "data": data,
            "trainer": {
                "run_name": "clf",
                "runs_dir": str(tmp_path / "runs"),
                "max_steps": 30,
                "batch_size": 8,
                "lr": 0.01,
                "grid_every": None,
                "progress": "off",
                "device": "cpu",
            },
            "held_out_fraction": 0.25,
            **kw,
        }
    )


def test_training_on_an_image_folder_learns_and_stores_its_accuracy(tmp_path: Path) -> None:
    data = {"type": "image_folder", "root": str(_folder(tmp_path / "imgs")), "image_size": 16}
    cfg = _train_cfg(tmp_path, data)
    result, task = train_classifier(cfg)
    clf = load_classifier(result.export)
    assert clf.class_names == ("bright", "dark")  # filled from the folder's classes
    assert clf.held_out_accuracy == task.held_out_accuracy == 1.0
    _, _, held = prepare_classifier_data(cfg)
    assert len(held) == 6 and accuracy(clf, held) == 1.0
    # a classifier that always answers class 0 scores the share of class 0, not 1.0
    fresh = registry.build("classifier", clf.config)
    with torch.no_grad():
        fresh.out.weight.zero_()
        fresh.out.bias.copy_(torch.tensor([10.0, -10.0]))
    share = sum(held[i]["label"] == 0 for i in range(len(held))) / len(held)
    assert 0 < share < 1 and accuracy(fresh, held) == share


def test_cli_trains_a_shapes_classifier_and_prints_held_out_accuracy(tmp_path: Path) -> None:
    import yaml

    cfg = {
        "classifier": {"type": "cnn", "num_classes": 3, "image_size": 16, "widths": [8, 16]},
        "data": {"type": "shapes", "size": 48, "image_size": 16, "num_classes": 3},
        "held_out": {"type": "shapes", "size": 16, "image_size": 16, "num_classes": 3, "seed": 999},
        "trainer": {
            "run_name": "c",
            "runs_dir": str(tmp_path),
            "max_steps": 3,
            "batch_size": 8,
            "lr": 0.001,
            "grid_every": None,
            "device": "cpu",
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["train", "classifier", "--config", str(path)])
    assert res.exit_code == 0, res.output
    clf = load_classifier(tmp_path / "c")
    line = next(x for x in res.output.splitlines() if x.startswith("held-out accuracy:"))
    assert f"{clf.held_out_accuracy:.2%}" in line and "circle, square, triangle" in line
    assert clf.class_names == ("circle", "square", "triangle")


def test_shipped_configs_validate() -> None:
    from latentgen.training.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "src" / "latentgen" / "configs"
    for name in ("shapes-classifier.yaml", "shapes-ranker.yaml", "fashion-mnist-classifier.yaml"):
        cfg = load_train_config(root / name, ClassifierTrainConfig)
        assert cfg.classifier.type == "cnn", name


# -- bad input -----------------------------------------------------------------------------------
def test_unlabelled_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "a.png")
    cfg = _train_cfg(tmp_path, {"type": "image_folder", "root": str(root), "image_size": 16})
    with pytest.raises(DataError, match="unlabelled .*own sub-folder"):
        prepare_classifier_data(cfg)


def test_images_outside_class_folders_are_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "imgs", n=2)
    Image.new("RGB", (16, 16)).save(root / "stray.png")
    cfg = _train_cfg(tmp_path, {"type": "image_folder", "root": str(root), "image_size": 16})
    with pytest.raises(DataError, match="stray.png.*move each into root/<class>/"):
        prepare_classifier_data(cfg)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    cfg = _train_cfg(
        tmp_path, {"type": "image_folder", "root": str(tmp_path / "empty"), "image_size": 16}
    )
    with pytest.raises(DataError, match="holds no image files"):
        prepare_classifier_data(cfg)


def test_class_count_and_image_size_mismatches_name_the_fix(tmp_path: Path) -> None:
    shapes = {"type": "shapes", "size": 8, "image_size": 16}
    with pytest.raises(SpecError, match="num_classes=2 but the data has 6.*num_classes: 6"):
        prepare_classifier_data(_train_cfg(tmp_path, shapes))
    cfg = _train_cfg(tmp_path, {**shapes, "num_classes": 2, "image_size": 32})
    with pytest.raises(SpecError, match=r"\(3, 32, 32\) but the classifier takes \[3, 16, 16\]"):
        prepare_classifier_data(cfg)
