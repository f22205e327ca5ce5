"""Specs: dispatch through the registry, round trips, and errors that name the fix."""

from __future__ import annotations

import json

import pytest

from examples import example, swept
from latentgen import PipelineSpec, SamplerConfig, load_spec, registry
from latentgen.errors import SpecError, UnknownComponentError
from latentgen.specs import dump_spec, parse_component

ALL_TYPES = [(k, t) for k in registry.kinds() for t in swept(k)]

TOY = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8},
    "prior": {"type": "toy.ngram", "vocab_size": 8, "conditions": {"label": {"vocab_size": 5}}},
    "conditioners": {"label": {"type": "class_label", "num_classes": 5}},
    "sampler": {"temperature": 0.9, "top_k": 4},
}


@pytest.mark.parametrize(("kind", "type_"), ALL_TYPES, ids=[f"{k}:{t}" for k, t in ALL_TYPES])
def test_every_registered_type_round_trips(kind, type_):
    cfg = parse_component(kind, example(kind, type_))
    assert type(cfg) is registry.get(kind, type_).config_cls
    assert parse_component(kind, json.loads(cfg.model_dump_json())) == cfg
    import yaml

    assert parse_component(kind, yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_pipeline_spec_round_trips(fmt, tmp_path):
    spec = PipelineSpec.model_validate(TOY)
    path = tmp_path / f"spec.{fmt}"
    path.write_text(dump_spec(spec, fmt))
    again = load_spec(path)
    assert again == spec
    # SerializeAsAny: subclass fields survive the dump, not only "type".
    assert again.tokenizer.vocab_size == 8
    assert again.prior.conditions["label"].vocab_size == 5
    assert PipelineSpec.model_validate_json(spec.model_dump_json()) == spec


def test_unknown_type_lists_known_and_did_you_mean():
    with pytest.raises(UnknownComponentError) as err:
        PipelineSpec.model_validate({**TOY, "tokenizer": {"type": "toy.palete"}})
    msg = str(err.value)
    assert "unknown tokenizer type 'toy.palete'" in msg
    assert "did you mean 'toy.palette'" in msg
    assert "latentgen plugins" in msg


def test_unknown_kind():
    with pytest.raises(UnknownComponentError, match="did you mean 'prior'"):
        registry.list("priors")


def test_missing_type():
    with pytest.raises(Exception, match="has no 'type'"):
        parse_component("prior", {"vocab_size": 3})


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"vocab_size": "many"}, "vocab_size"),
        ({"vocab_size": 1}, "greater than or equal to 2"),
        ({"vocab_sise": 8}, "Extra inputs are not permitted"),
    ],
)
def test_bad_field_names_field(patch, needle, tmp_path):
    data = {**TOY, "tokenizer": {**TOY["tokenizer"], **patch}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert needle in str(err.value)
    assert "tokenizer" in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1.0},
        {"temperature": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"guidance_scale": -1},
    ],
)
def test_sampler_bounds(bad):
    with pytest.raises(ValueError):
        SamplerConfig(**bad)


def test_conditioner_names_must_be_identifiers(tmp_path):
    bad = {**TOY, "conditioners": {"my-label": TOY["conditioners"]["label"]}}
    with pytest.raises(ValueError, match="identifier"):
        PipelineSpec.model_validate(bad)
    # From a file: a check of the whole spec has no field, and reads as its own words.
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "  (root): conditioner name 'my-label' must be a Python identifier" in str(err.value)
    assert "Value error" not in str(err.value)


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tokenizer: [unclosed")
    with pytest.raises(SpecError, match="bad.yaml is not valid YAML"):
        load_spec(path)


def test_build_from_config_object_infers_kind():
    cfg = parse_component("conditioner", {"type": "class_label", "num_classes": 3})
    assert registry.build(cfg).vocab_size == 3


def test_schema_lists_installed_types():
    from latentgen.schema import kind_schema, pipeline_schema

    tok = json.dumps(kind_schema("tokenizer"))
    assert "toy.palette" in tok
    assert "toy.ngram" in json.dumps(pipeline_schema())
