"""JSON Schema of what is installed: per kind, and for the whole PipelineSpec."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from latentgen import registry
from latentgen.specs import SamplerConfig

__all__ = ["kind_schema", "pipeline_schema"]


def _union(kind: str) -> Any:
    configs = tuple(info.config_cls for info in registry.entries(kind))
    if not configs:
        return None
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007


def kind_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of every registered config of ``kind`` (a discriminated union on ``type``)."""
    union = _union(kind)
    if union is None:
        return {"title": f"{kind} config", "description": f"no {kind} types are installed"}
    schema: dict[str, Any] = TypeAdapter(union).json_schema()
    schema.setdefault("title", f"{kind} config")
    return schema


def pipeline_schema() -> dict[str, Any]:
    """JSON Schema of a PipelineSpec with every installed tokenizer, prior and conditioner."""
    from pydantic import create_model

    fields: dict[str, Any] = {"format_version": (int, 1)}
    for name, kind in (("tokenizer", "tokenizer"), ("prior", "prior")):
        union = _union(kind)
        fields[name] = (union if union is not None else dict, ...)
    cond = _union("conditioner")
    fields["conditioners"] = (dict[str, cond] if cond is not None else dict, {})  # type: ignore[valid-type]
    fields["sampler"] = (SamplerConfig, SamplerConfig())
    model = create_model("PipelineSpec", **fields)
    return model.model_json_schema()
