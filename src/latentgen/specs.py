"""Typed specs: the pydantic config every component is built from, and the PipelineSpec.

Parsing a component config is two-pass: read its ``type``, look the type up in the registry for
that kind, then validate the whole mapping with the config model the plugin registered. Each
plugin's config is therefore checked by its own model, and an unknown type gets one line naming
the known types and a did-you-mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from latentgen.errors import SpecError
from latentgen.utils import read_config_text

__all__ = [
    "ComponentConfig",
    "PipelineSpec",
    "SamplerConfig",
    "component_field",
    "dump_spec",
    "load_spec",
    "parse_component",
]


class ComponentConfig(BaseModel):
    """Base of every component config.

    Subclasses declare ``type: Literal["name"] = "name"``; the literal is how the registry and
    specs find the class. Configs are frozen (hashable, safe to share) and reject unknown fields
    so a typo in a spec is an error, not a silently ignored option.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    type: str

    @classmethod
    def type_name(cls) -> str:
        """The single string of this config's ``type: Literal[...]`` field."""
        field = cls.model_fields.get("type")
        ann = field.annotation if field is not None else None
        args: tuple[Any, ...] = tuple(get_args(ann))
        if get_origin(ann) is not Literal or len(args) != 1 or not isinstance(args[0], str):
            raise SpecError(
                f'{cls.__module__}.{cls.__qualname__} must declare `type: Literal["name"] = '
                f'"name"` with exactly one string; got {field.annotation if field else None!r}.'
            )
        return str(args[0])


def parse_component(kind: str, data: Any) -> ComponentConfig:
    """Validate ``data`` (a mapping or a config) as a config of the registered ``kind``."""
    from latentgen import registry  # lazy: registry loads plugins, which import this module

    if isinstance(data, ComponentConfig):
        info = registry.get(kind, data.type)
        if not isinstance(data, info.config_cls):
            # A config of the right type name but another class (e.g. a reloaded module).
            data = data.model_dump()
        else:
            return data
    if not isinstance(data, Mapping):
        raise SpecError(
            f"a {kind} config must be a mapping with a 'type' key, got {type(data).__name__}: "
            f"{data!r}. Known {kind} types: {', '.join(registry.list(kind)) or '(none)'}."
        )
    if "type" not in data:
        raise SpecError(
            f"{kind} config {dict(data)!r} has no 'type'. Add one of: "
            f"{', '.join(registry.list(kind)) or '(none installed)'}."
        )
    info = registry.get(kind, str(data["type"]))
    return info.config_cls.model_validate(dict(data))


def _dispatch(kind: str) -> Callable[[Any], ComponentConfig]:
    def validate(value: Any) -> ComponentConfig:
        return parse_component(kind, value)

    return validate


def component_field(kind: str) -> Any:
    """Annotation for a field that holds a config of ``kind`` (dispatched through the registry).

    ``SerializeAsAny`` makes pydantic dump the subclass's fields, not only the base's ``type``.
    """
    return Annotated[SerializeAsAny[ComponentConfig], BeforeValidator(_dispatch(kind))]


# Spelled out (not component_field(...)) so type checkers see them as type aliases.
TokenizerSpec = Annotated[SerializeAsAny[ComponentConfig], BeforeValidator(_dispatch("tokenizer"))]
PriorSpec = Annotated[SerializeAsAny[ComponentConfig], BeforeValidator(_dispatch("prior"))]
ConditionerSpec = Annotated[
    SerializeAsAny[ComponentConfig], BeforeValidator(_dispatch("conditioner"))
]


class SamplerConfig(BaseModel):
    """How codes are drawn from a prior's logits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        1.0, gt=0, description="Divides the logits; <1 sharpens, >1 flattens. Must be > 0."
    )
    top_k: int | None = Field(
        None, ge=1, description="Keep only the k most likely codes (None keeps all)."
    )
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Nucleus sampling: keep the smallest set of codes whose probability sums "
        "to at least p, in (0, 1]. See arXiv 1904.09751.",
    )
    guidance_scale: float = Field(
        1.0,
        ge=0,
        description="Classifier-free guidance: logits = uncond + s * (cond - uncond); 1 turns "
        "it off. See arXiv 2207.12598.",
    )


class PipelineSpec(BaseModel):
    """Everything needed to rebuild a pipeline: its components' configs and the sampler."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    tokenizer: TokenizerSpec
    prior: PriorSpec
    conditioners: dict[str, ConditionerSpec] = Field(default_factory=dict)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)

    @model_validator(mode="after")
    def _names_are_identifiers(self) -> PipelineSpec:
        for name in self.conditioners:
            if not name.isidentifier():
                raise ValueError(
                    f"conditioner name {name!r} must be a Python identifier (it becomes a "
                    f"keyword argument of Pipeline.__call__), e.g. 'label' or 'seg_map'."
                )
        return self


def spec_error(err: ValidationError, where: str, what: str = "spec") -> SpecError:
    """One ``SpecError`` listing every field pydantic refused, with its location and value."""
    lines = [f"{where} is not a valid {what} ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return SpecError("\n".join(lines))


M = TypeVar("M", bound=BaseModel)


def load_model(source: str | Path | Mapping[str, Any], model: type[M], what: str = "spec") -> M:
    """Validate ``model`` from a mapping, or a ``.json`` / ``.yaml`` / ``.yml`` file."""
    where = what
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        text = read_config_text(path, what)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise SpecError(f"{path} is not valid YAML: {e}") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                hint = "" if path.suffix == ".json" else " (use a .yaml, .yml or .json file)"
                raise SpecError(f"{path} is not valid JSON{hint}: {e}") from e
    if not isinstance(data, Mapping):
        raise SpecError(f"{where} must hold a mapping, got {type(data).__name__}: {data!r}.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise spec_error(e, where, what) from None


def load_spec(source: str | Path | Mapping[str, Any]) -> PipelineSpec:
    """Read a PipelineSpec from a mapping, or a ``.json`` / ``.yaml`` / ``.yml`` file."""
    return load_model(source, PipelineSpec, "spec")


def dump_spec(spec: PipelineSpec, fmt: Literal["json", "yaml"] = "json") -> str:
    """Serialise a spec to JSON or YAML text that ``load_spec`` reads back unchanged."""
    data = spec.model_dump(mode="json")
    if fmt == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False))
    return json.dumps(data, indent=2) + "\n"
