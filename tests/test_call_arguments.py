"""Bad arguments to ``Pipeline.__call__`` and ``latentgen sample``: clear errors, no tracebacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from latentgen import Pipeline
from latentgen.cli import main
from latentgen.errors import InputError

SPEC = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {"type": "toy.ngram", "vocab_size": 8, "conditions": {"label": {"vocab_size": 6}}},
    "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
}


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    p = Pipeline.from_spec(SPEC)
    p.tokenizer.fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    p.card["image_size"] = 16
    return p


@pytest.fixture(scope="module")
def saved(pipe: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "p"
    pipe.save_pretrained(path, card={"image_size": 16})
    return path


def test_zero_images_with_labels_is_an_error(pipe: Pipeline) -> None:
    # It used to return one image per label, as if num_images had been left out.
    with pytest.raises(InputError, match="num_images must be >= 1, got 0; leave it out"):
        pipe(num_images=0, label=[1, 2])


@pytest.mark.parametrize("n", [0, -1, -4])
@pytest.mark.parametrize("conditioned", [True, False])
def test_non_positive_num_images(pipe: Pipeline, n: int, conditioned: bool) -> None:
    unconditional = Pipeline.from_spec({**SPEC, "prior": {**SPEC["prior"], "conditions": {}},
                                        "conditioners": {}})  # fmt: skip
    unconditional.card["image_size"] = 16
    target, kw = (pipe, {"label": [1, 2]}) if conditioned else (unconditional, {})
    with pytest.raises(InputError, match=f"num_images must be >= 1, got {n}"):
        target(num_images=n, **kw)
    with pytest.raises(InputError, match=f"num_images must be >= 1, got {n}"):
        target.sample_codes(n, **kw)


@pytest.mark.parametrize("n", [2.0, "4", True])
def test_num_images_must_be_a_whole_number(pipe: Pipeline, n: object) -> None:
    with pytest.raises(InputError, match="num_images must be a whole number"):
        pipe(num_images=n, label=[1, 2])


def test_numpy_integers_and_none_still_work(pipe: Pipeline) -> None:
    g = torch.Generator().manual_seed(0)
    assert len(pipe(num_images=np.int64(4), label=[1, 2], generator=g)) == 4
    assert len(pipe(label=[1, 2, 3], generator=g)) == 3


@pytest.mark.parametrize(
    ("label", "hint"),
    [
        (1.7, r"got 1\.7 \(a float: labels are class indices"),
        (2.0, r"got 2\.0 \(a float: write 2 if you meant that class\)"),
        ([1, 1.5], r"got 1\.5 \(a float"),
        (np.array([0.5]), r"got .*0\.5 \(a float"),
        (object(), "labels must be an int, a class name, a list of them"),
    ],
)
def test_float_or_odd_labels_from_python(pipe: Pipeline, label: object, hint: str) -> None:
    with pytest.raises(InputError, match=hint):
        pipe(label=label)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "label=1.7"], "Error: a class label must be an int or a class name, got 1.7"),
        (["-c", "label=[1, 2.5]"], "got 2.5 (a float"),
        (["-n", "0", "-c", "label=1"], "Invalid value for '--num'"),
        (["-n", "-3"], "Invalid value for '--num'"),
    ],
)
def test_bad_sample_arguments_on_the_command_line(
    saved: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    res = CliRunner().invoke(main, ["sample", str(saved), "-o", str(tmp_path / "s.png"), *args])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.exception
    assert message in res.output, res.output
    assert not (tmp_path / "s.png").exists()
