"""Typed specs: the PipelineSpec, the sampler config, and reading/writing specs as JSON or YAML.

A component field is parsed in two passes by ``registry.parse_component``: read its ``type``,
look the type up in the registry for that kind, then validate the whole mapping with the config
model the plugin registered. Each plugin's config is therefore checked by its own model, and an
unknown type gets one line naming the known types and a did-you-mean. ``ComponentConfig`` (the
base of every component config) lives in ``latentgen.components`` and is re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from latentgen.components import ComponentConfig
from latentgen.errors import SpecError
from latentgen.registry import parse_component
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
    steps: int | None = Field(
        None,
        description="Parallel decoding passes T of a prior that fills many codes per pass (the "
        "masked prior; MaskGIT, arXiv 2202.04200, uses 8-12), from 1 to the grid's number of "
        "codes. None: the prior's own default. Autoregressive priors draw one code per pass "
        "and do not read it.",
    )
    refine_steps: int = Field(
        0,
        ge=0,
        description="Refinement passes after the T passes of a masked prior: each re-masks the "
        "drawn codes the prior itself finds least likely given the rest of the grid and draws "
        "them again (a token critic played by the prior; arXiv 2209.04439). Each costs three "
        "passes. 0: none. Autoregressive priors do not read it.",
    )
    refine_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of a grid's drawn codes re-masked by the first refinement pass, in "
        "(0, 1]; pass j of K re-masks fraction * (1 - j / K) of them.",
    )
    window: Literal["exact", "cached"] = Field(
        "cached",
        description="Sliding window for grids larger than the prior's trained window: 'exact' "
        "runs one window forward per code, centred on it (the reference); 'cached' moves the "
        "window in strides and draws the codes between moves from the KV cache (fast).",
    )
    window_size: tuple[int, int] | None = Field(
        None,
        description="The sliding window (wh, ww) in codes; None: the prior's trained window. "
        "A grid larger than it is drawn window by window; it must fit the prior's block.",
    )
    window_stride: tuple[int, int] | None = Field(
        None,
        description="window='cached' only: rows and columns drawn per window position after "
        "the first (default: half the window's rows; its columns less an eighth, at least 2, "
        "on either side). Smaller strides give each code more context to its left and "
        "above-right, at more window moves (slower).",
    )
    window_band: Literal["bottom", "middle"] = Field(
        "middle",
        description="window='cached' only: where a band of rows stands in its window. "
        "'middle' (default): its middle rows, as exact centres a window on its code (the "
        "likelihood closest to exact's, on priors trained on crops and on whole images); "
        "'bottom': the window's last rows (the most rows above each code).",
    )
    window_margin: int | None = Field(
        None,
        ge=0,
        description="window='cached' only: the window's columns left of a tile; the rest of "
        "the columns the tile leaves free are on its right. None: half of them. A code at a "
        "tile's left edge sees this many codes to its left in its own row (exact: half the "
        "window), so a wider left margin (keep 2 or more on the right) brings the likelihood "
        "closer to exact's, at a narrower tile (slower).",
    )

    @model_validator(mode="after")
    def _check_window(self) -> SamplerConfig:
        if self.steps is not None and self.steps < 1:
            raise ValueError(
                f"steps={self.steps}: a masked prior needs at least one decoding pass; use "
                "steps >= 1 (e.g. 12), or None for the prior's default."
            )
        for name in ("window_size", "window_stride"):
            value = getattr(self, name)
            if value is not None and min(value) < 1:
                raise ValueError(f"{name} must be two positive sizes (rows, columns), got {value}.")
        stride, size = self.window_stride, self.window_size
        too_big = (
            stride is not None and size is not None and (stride[0] > size[0] or stride[1] > size[1])
        )
        if too_big:
            raise ValueError(f"window_stride {stride} must fit in window_size {size}.")
        return self


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


def validation_problems(err: ValidationError) -> list[tuple[str, str, Any]]:
    """``(location, message, input)`` of each value pydantic refused. The location is "" for a
    model-level check; the message drops pydantic's "Value error, " prefix, so the user reads
    only the check's own words."""
    return [
        (
            ".".join(str(p) for p in e["loc"]),
            str(e["msg"]).removeprefix("Value error, "),
            e.get("input"),
        )
        for e in err.errors()
    ]


def spec_error(err: ValidationError, where: str, what: str = "spec") -> SpecError:
    """One ``SpecError`` listing every field pydantic refused, with its location and value."""
    lines = [f"{where} is not a valid {what} ({err.error_count()} problem(s)):"]
    for loc, msg, value in validation_problems(err):
        lines.append(f"  {loc or '(root)'}: {msg} (got {value!r})")
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
