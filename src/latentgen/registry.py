"""The component registry: kind -> type -> (class, config class, plugin, version).

Questions about what is registered: ``kinds``, ``list``, ``get``, ``entries``, ``kind_of``,
``parse_component`` and ``build``. The answers come from ``latentgen.plugins``, which collects
each plugin's components (and checks them) as the plugin is registered.

    >>> from latentgen import registry
    >>> registry.list("quantizer")          # doctest: +SKIP
    ['ema', 'fsq', 'gumbel', 'vq']
    >>> registry.build("tokenizer", {"type": "vqgan", "codebook_size": 512})   # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import os
from collections.abc import Mapping
from typing import Any

from latentgen import plugins
from latentgen.components import ComponentConfig
from latentgen.errors import SpecError, UnknownComponentError
from latentgen.plugins import ComponentInfo

__all__ = [
    "ComponentInfo",
    "build",
    "entries",
    "get",
    "kind_of",
    "kinds",
    "list",
    "parse_component",
]


def kinds() -> tuple[str, ...]:
    """The component kinds, e.g. ``('tokenizer', 'prior', 'conditioner', ...)``."""
    return tuple(plugins.KINDS)


def _check_kind(kind: str) -> None:
    if kind not in plugins.KINDS:
        close = difflib.get_close_matches(kind, plugins.KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownComponentError(
            f"unknown component kind '{kind}'{hint}; kinds: {', '.join(plugins.KINDS)}."
        )


def list(kind: str, pattern: str = "*") -> builtins.list[str]:
    """Sorted type names of ``kind`` matching the fnmatch ``pattern``."""
    _check_kind(kind)
    return sorted(t for t in plugins.component_table()[kind] if fnmatch.fnmatchcase(t, pattern))


def entries(kind: str | None = None) -> builtins.list[ComponentInfo]:
    """Every registered component (of one kind, or all), sorted by kind then type."""
    if kind is not None:
        _check_kind(kind)
    table = plugins.component_table()
    wanted = (kind,) if kind is not None else tuple(plugins.KINDS)
    return [table[k][t] for k in wanted for t in sorted(table[k])]


def _not_loaded_note() -> str:
    """Plugins that are installed but not loaded: one of them may be what the user wants."""
    notes = []
    excluded = plugins.excluded_plugins()
    if excluded:
        env = os.environ.get("LATENTGEN_LOAD_PLUGINS", "")
        notes.append(
            f"installed but excluded by LATENTGEN_LOAD_PLUGINS={env!r}: "
            f"{', '.join(sorted(excluded))}"
        )
    failed = sorted({f.dist for f in plugins.plugin_failures()})
    if failed:
        notes.append(f"failed to load or disabled: {', '.join(failed)}")
    return f" Not loaded ({'; '.join(notes)})." if notes else ""


def get(kind: str, type: str) -> ComponentInfo:
    """The registered component ``type`` of ``kind``; unknown types list the known ones."""
    _check_kind(kind)
    table = plugins.component_table()[kind]
    if type not in table:
        known = sorted(table)
        close = difflib.get_close_matches(type, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownComponentError(
            f"unknown {kind} type '{type}'{hint}; known {kind} types: "
            f"{', '.join(known) or '(none)'}. Run `latentgen plugins` to see what is "
            f"installed.{_not_loaded_note()}"
        )
    return table[type]


def kind_of(config: ComponentConfig) -> str:
    """The kind whose registry holds this config's class."""
    for kind, table in plugins.component_table().items():
        info = table.get(config.type)
        if info is not None and isinstance(config, info.config_cls):
            return kind
    raise UnknownComponentError(
        f"{type(config).__qualname__} (type '{config.type}') is not registered under any kind. "
        "Register its component class through a latentgen plugin hook."
    )


def parse_component(kind: str, data: Any) -> ComponentConfig:
    """Validate ``data`` (a mapping or a config) as a config of the registered ``kind``.

    Two passes: read ``type``, then validate the whole mapping with the config model the
    plugin registered for it, so each plugin's config is checked by its own model.
    """
    if isinstance(data, ComponentConfig):
        info = get(kind, data.type)
        if not isinstance(data, info.config_cls):
            # A config of the right type name but another class (e.g. a reloaded module).
            data = data.model_dump()
        else:
            return data
    if not isinstance(data, Mapping):
        raise SpecError(
            f"a {kind} config must be a mapping with a 'type' key, got {type(data).__name__}: "
            f"{data!r}. Known {kind} types: {', '.join(list(kind)) or '(none)'}."
        )
    if "type" not in data:
        raise SpecError(
            f"{kind} config {dict(data)!r} has no 'type'. Add one of: "
            f"{', '.join(list(kind)) or '(none installed)'}."
        )
    info = get(kind, str(data["type"]))
    return info.config_cls.model_validate(dict(data))


def build(kind_or_config: str | ComponentConfig, config: Any = None) -> Any:
    """Build a component: ``build("prior", {...})``, ``build("prior", cfg)`` or ``build(cfg)``."""
    if isinstance(kind_or_config, ComponentConfig):
        if config is not None:
            raise SpecError("build(config) takes one config; pass build(kind, config) instead.")
        cfg = kind_or_config
        kind = kind_of(cfg)
    else:
        kind = kind_or_config
        if config is None:
            raise SpecError(
                f"build('{kind}') needs a config, e.g. build('{kind}', {{'type': ...}})."
            )
        if not isinstance(config, ComponentConfig | Mapping):
            raise SpecError(
                f"build('{kind}', ...) takes a mapping or a ComponentConfig, got "
                f"{type(config).__name__}."
            )
        cfg = parse_component(kind, config)
    info = get(kind, cfg.type)
    return info.cls(cfg)
