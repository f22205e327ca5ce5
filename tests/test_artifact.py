"""Component artifacts: one directory format, strict loading, older formats, hostile manifests."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import TINY_LABEL_SPEC
from latentgen import Pipeline, registry
from latentgen.artifact import (
    COMPONENT_FILE,
    WEIGHTS_FILE,
    find_component,
    load_component,
    save_component,
)
from latentgen.errors import CheckpointError, SpecError, UnknownComponentError
from latentgen.files import load_tensors, save_tensors, sha256_file

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_PIPELINE = FIXTURES / "legacy-0.1.0-pipeline"
LEGACY_TOKENIZER = FIXTURES / "legacy-0.1.0-tokenizer"
EXPECT = json.loads((FIXTURES / "legacy-0.1.0.json").read_text())

SPEC = TINY_LABEL_SPEC  # the spec the legacy fixtures were written with


def legacy_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(EXPECT["images_seed"])
    return torch.rand(2, 3, 8, 8, generator=g) * 2 - 1  # [2, 3, 8, 8] as make_legacy.py drew


def legacy_codes(pipe: Pipeline) -> list:
    g = torch.Generator().manual_seed(EXPECT["sample_seed"])
    return pipe.sample_codes(label=EXPECT["labels"], generator=g).tolist()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    pipe = Pipeline.from_spec(SPEC)
    return pipe.save_pretrained(tmp_path / "p")


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- older formats --------------------------------------------------------------------------------
def test_pipeline_saved_by_0_1_0_loads_and_samples_the_same_codes(tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(LEGACY_PIPELINE)
    assert legacy_codes(pipe) == EXPECT["sampled_codes"]
    assert pipe.encode(legacy_images()).tolist() == EXPECT["encoded_codes"]
    assert pipe.card == {"image_size": 8}
    # Saved again, it is in today's layout and still draws the same codes.
    again = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "new"))
    assert (tmp_path / "new" / "prior" / COMPONENT_FILE).is_file()
    assert legacy_codes(again) == EXPECT["sampled_codes"]


def test_tokenizer_dir_saved_by_0_1_0_loads() -> None:
    tok = load_component(LEGACY_TOKENIZER, "tokenizer").eval()
    with torch.no_grad():
        assert tok.encode(legacy_images()).tolist() == EXPECT["encoded_codes"]
    # The 0.1.0 pipeline's tokenizer is found the same way.
    ref = find_component(LEGACY_PIPELINE, "tokenizer")
    assert ref.legacy
    # Every setting the 0.1.0 file holds is read back; options added since take their defaults.
    _assert_contains(load_component(ref).config.model_dump(mode="json"), ref.config)


def _assert_contains(new: dict, old: dict) -> None:
    for key, value in old.items():
        if isinstance(value, dict):
            _assert_contains(new[key], value)
        else:
            assert new[key] == value, key


def test_legacy_manifests_are_checked_like_new_ones(tmp_path: Path) -> None:
    path = Path(shutil.copytree(LEGACY_PIPELINE, tmp_path / "old"))
    edit_json(path / "pipeline.json", lambda m: m["components"]["prior"].update(sha256=None))
    with pytest.raises(CheckpointError, match="file 'prior.safetensors' has no sha256"):
        Pipeline.from_pretrained(path)
    edit_json(
        path / "pipeline.json",
        lambda m: m["components"]["prior"].update(file="/etc/hosts", sha256="0" * 64),
    )
    with pytest.raises(CheckpointError, match=r"component 'prior' file points outside"):
        Pipeline.from_pretrained(path)
    edit_json(path / "pipeline.json", lambda m: m["components"]["prior"].update(file=5))
    with pytest.raises(CheckpointError, match="'file' must be a file name .a string. or null"):
        Pipeline.from_pretrained(path)
    edit_json(path / "pipeline.json", lambda m: m.update(components=["prior"]))
    with pytest.raises(CheckpointError, match="pipeline.json: 'components' must be a mapping"):
        Pipeline.from_pretrained(path)

    tok = Path(shutil.copytree(LEGACY_TOKENIZER, tmp_path / "tok"))
    edit_json(tok / "tokenizer.json", lambda m: m.pop("sha256"))
    with pytest.raises(CheckpointError, match="has no sha256"):
        load_component(tok, "tokenizer")


# -- the format -----------------------------------------------------------------------------------
def test_component_round_trip_and_file_modes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    prior = registry.build("prior", SPEC["prior"])
    path = save_component(prior, "prior", tmp_path / "c")
    manifest = json.loads((path / COMPONENT_FILE).read_text())
    assert manifest["kind"] == "prior" and manifest["type"] == "transformer"
    assert manifest["provided_by"]["plugin"] == "latentgen"
    assert manifest["files"] == {WEIGHTS_FILE: sha256_file(path / WEIGHTS_FILE)}
    loaded = load_component(path, "prior")
    assert all(torch.equal(v, prior.state_dict()[k]) for k, v in loaded.state_dict().items())
    # Weights get the permissions of every other file (the umask's), not safetensors' 0600.
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (path / WEIGHTS_FILE, path / COMPONENT_FILE):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    with pytest.raises(CheckpointError, match="holds a prior, not a tokenizer"):
        load_component(path, "tokenizer")


def test_find_component_in_every_kind_of_directory(saved: Path, tmp_path: Path) -> None:
    assert find_component(saved, "tokenizer").root == saved / "tokenizer"
    run = tmp_path / "run"
    shutil.copytree(saved / "tokenizer", run / "final")
    assert find_component(run, "tokenizer").root == run / "final"
    assert find_component(saved / "prior", "prior").type == "transformer"
    with pytest.raises(CheckpointError, match="holds no trained tokenizer: expected component"):
        find_component(tmp_path, "tokenizer")


def test_config_import_does_not_import_tasks() -> None:
    """training/config.py no longer reads the disk in a validator, so it needs no tasks.py."""
    code = (
        "import sys, latentgen.training.config; "
        "assert 'latentgen.training.tasks' not in sys.modules, 'tasks imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_prior_train_config_without_tokenizer_says_how(tmp_path: Path) -> None:
    from latentgen.training.config import PriorTrainConfig, load_train_config

    data = {
        "spec": {k: v for k, v in SPEC.items() if k != "tokenizer"},
        "tokenizer_path": str(tmp_path),
        "data": {"type": "shapes", "size": 4},
        "trainer": {"run_name": "x"},
    }
    with pytest.raises(SpecError, match="find_component\\(tokenizer_path, 'tokenizer'\\)"):
        load_train_config(data, PriorTrainConfig)


# -- issue 9.1: files must stay inside their directory --------------------------------------------
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_weights_file_outside_the_component_dir_is_refused(
    saved: Path, tmp_path: Path, where: str
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    name = {"absolute": str(secret), "dotdot": "../../secret.bin", "symlink": "link"}[where]
    if where == "symlink":
        (saved / "prior" / "link").symlink_to(secret)
    edit_json(saved / "prior" / COMPONENT_FILE, lambda m: m.update(files={name: "0" * 64}))
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_pretrained(saved)
    msg = str(err.value)
    assert f"component 'prior' file points outside its directory ('{name}' resolves to" in msg
    assert sha256_file(secret)[:12] not in msg  # nothing about the outside file leaks


def test_component_path_outside_the_pipeline_dir_is_refused(saved: Path) -> None:
    edit_json(saved / "pipeline.json", lambda m: m["components"]["prior"].update(path="../.."))
    with pytest.raises(CheckpointError, match="component 'prior' path points outside"):
        Pipeline.from_pretrained(saved)


# -- issue 9.2: a missing hash is an error --------------------------------------------------------
@pytest.mark.parametrize("digest", [None, ""])
def test_missing_sha256_is_an_error(saved: Path, digest) -> None:
    edit_json(saved / "prior" / COMPONENT_FILE, lambda m: m.update(files={WEIGHTS_FILE: digest}))
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_pretrained(saved)
    assert f"file '{WEIGHTS_FILE}' has no sha256" in str(err.value)
    assert "sha256sum FILE" in str(err.value)  # the documented way for hand-made dirs


# -- issue 9.3: the config the weights were saved with --------------------------------------------
def test_edited_config_that_fits_every_shape_is_refused(saved: Path) -> None:
    edit_json(saved / "pipeline.json", lambda m: m["spec"]["prior"].update(n_head=4))
    with pytest.raises(CheckpointError, match=r"n_head: 2 -> 4"):
        Pipeline.from_pretrained(saved)
    # Edited in both manifests: the weights' own record still catches it.
    edit_json(saved / "prior" / COMPONENT_FILE, lambda m: m["config"].update(n_head=4))
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_pretrained(saved)
    msg = str(err.value)
    assert "the config differs from the one these weights were saved with (n_head: 2 -> 4" in msg
    with pytest.raises(CheckpointError, match="n_head: 2 -> 4"):
        load_component(saved / "prior", "prior")


def test_config_fields_added_later_are_not_differences(saved: Path) -> None:
    """A record written before a field existed matches the field's default."""
    from safetensors import safe_open

    f = saved / "prior" / WEIGHTS_FILE
    with safe_open(f, "pt") as fh:
        header = dict(fh.metadata())
    record = json.loads(header["latentgen.component"])
    del record["config"]["rope_base"]  # as if written by a release without it
    record["config_sha256"] = "0" * 64
    header["latentgen.component"] = json.dumps(record)
    save_tensors(f, load_tensors(f), header)
    edit_json(
        saved / "prior" / COMPONENT_FILE, lambda m: m.update(files={WEIGHTS_FILE: sha256_file(f)})
    )
    Pipeline.from_pretrained(saved)
    # ... but a record that is missing altogether is refused.
    save_tensors(f, load_tensors(f), {})
    edit_json(
        saved / "prior" / COMPONENT_FILE, lambda m: m.update(files={WEIGHTS_FILE: sha256_file(f)})
    )
    with pytest.raises(CheckpointError, match="carry no record of the config"):
        Pipeline.from_pretrained(saved)


# -- issue 9.4: malformed manifests and unknown types ---------------------------------------------
@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("pipeline.json", lambda m: m.update(components=[1]), "'components' must be a mapping"),
        (
            "pipeline.json",
            lambda m: m.update(components={"prior": 3}),
            "must be a mapping, got int",
        ),
        (
            "pipeline.json",
            lambda m: m["components"]["prior"].update(path=7),
            "component 'prior' path must be a file name .a string., got int 7",
        ),
        (
            "prior/component.json",
            lambda m: m.update(files=["weights.safetensors"]),
            "'files' must be a mapping of file name to sha256, got list",
        ),
        ("prior/component.json", lambda m: m.update(config=None), "'config' must be a mapping"),
    ],
)
def test_malformed_manifests_get_clear_errors(saved: Path, file: str, change, message: str) -> None:
    edit_json(saved / file, change)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_pretrained(saved)


def test_unknown_builtin_type_does_not_suggest_pip_install(saved: Path) -> None:
    edit_json(saved / "prior" / COMPONENT_FILE, lambda m: m.update(type="transformer2"))
    with pytest.raises(UnknownComponentError) as err:
        Pipeline.from_pretrained(saved)
    msg = str(err.value)
    assert "prior type 'transformer2' (component 'prior'), which this latentgen" in msg
    assert "does not know" in msg and 'pip install "latentgen' not in msg
