"""The component registry: kind -> type -> (class, config class, plugin, version).

Built lazily from the plugin hooks and rebuilt whenever a plugin is registered or unregistered.
Each hook implementation is called on its own with a ``register`` bound to its plugin, so every
entry knows who registered it.

    >>> from latentgen import registry
    >>> registry.list("quantizer")          # doctest: +SKIP
    ['ema', 'fsq', 'gumbel', 'vq']
    >>> registry.build("tokenizer", {"type": "vqgan", "codebook_size": 512})   # doctest: +SKIP
"""

from __future__ import annotations

import builtins
import difflib
import fnmatch
import importlib
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from latentgen.errors import (
    DuplicateComponentError,
    PluginLoadError,
    SpecError,
    UnknownComponentError,
)
from latentgen.specs import ComponentConfig

__all__ = ["ComponentInfo", "build", "entries", "get", "kind_of", "kinds", "list"]


@dataclass(frozen=True)
class _Kind:
    name: str
    hook: str
    base: str  # "module:Class", imported lazily


_KINDS: dict[str, _Kind] = {
    k.name: k
    for k in (
        _Kind("tokenizer", "register_tokenizers", "latentgen.tokenizers.base:Tokenizer"),
        _Kind("prior", "register_priors", "latentgen.priors.base:Prior"),
        _Kind("conditioner", "register_conditioners", "latentgen.conditioners.base:Conditioner"),
        _Kind("quantizer", "register_quantizers", "latentgen.tokenizers.quantizers.base:Quantizer"),
        _Kind(
            "attention_backend",
            "register_attention_backends",
            "latentgen.priors.attention:AttentionBackend",
        ),
        _Kind("dataset", "register_datasets", "latentgen.data.base:ImageDataset"),
    )
}


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component."""

    kind: str
    type: str
    cls: builtins.type[Any]
    config_cls: builtins.type[ComponentConfig]
    plugin: str
    version: str

    @property
    def qualname(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def describe(self) -> str:
        return f"'{self.plugin}' {self.version} ({self.qualname})"


_lock = threading.RLock()
_entries: dict[str, dict[str, ComponentInfo]] | None = None


def _invalidate() -> None:
    global _entries
    with _lock:
        _entries = None


def _base(kind: _Kind) -> type[Any]:
    mod, _, cls = kind.base.partition(":")
    base: type[Any] = getattr(importlib.import_module(mod), cls)
    return base


def _check_class(kind: _Kind, cls: Any, plugin: str) -> tuple[str, type[ComponentConfig]]:
    base = _base(kind)
    where = f"plugin {plugin} registered {getattr(cls, '__qualname__', cls)!r} as a {kind.name}"
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise PluginLoadError(f"{where}, but it is not a subclass of {base.__qualname__}.")
    config_cls = getattr(cls, "Config", None)
    if not isinstance(config_cls, type) or not issubclass(config_cls, ComponentConfig):
        raise PluginLoadError(
            f"{where}, but its `Config` is not a latentgen.ComponentConfig subclass. Add "
            f"`Config = MyConfig` where `class MyConfig(ComponentConfig): type: Literal['name']`."
        )
    ann = config_cls.model_fields["type"].annotation
    args = get_args(ann)
    if get_origin(ann) is not Literal or len(args) != 1 or not isinstance(args[0], str):
        raise PluginLoadError(
            f"{where}, but {config_cls.__qualname__}.type is {ann!r}; it must be "
            f"`Literal['name']` with exactly one string."
        )
    return args[0], config_cls


def _collect() -> dict[str, dict[str, ComponentInfo]]:
    from latentgen import plugins

    pm = plugins.get_plugin_manager()
    table: dict[str, dict[str, ComponentInfo]] = {k: {} for k in _KINDS}
    for kind in _KINDS.values():
        caller = getattr(pm.hook, kind.hook)
        # pluggy returns impls in call order (LIFO); register in plugin order instead so the
        # built-ins come first and duplicate errors name the earlier plugin first.
        for impl in reversed(caller.get_hookimpls()):
            plugin = impl.plugin_name
            dist, version = plugins.plugin_version(plugin)

            def register(
                cls: Any,
                _kind: _Kind = kind,
                _dist: str = dist,
                _ver: str = version,
                _plugin: str = plugin,
            ) -> None:
                type_name, config_cls = _check_class(_kind, cls, _plugin)
                prev = table[_kind.name].get(type_name)
                info = ComponentInfo(_kind.name, type_name, cls, config_cls, _dist, _ver)
                if prev is not None and prev.cls is not cls:
                    raise DuplicateComponentError(
                        f"{_kind.name} type '{type_name}' is registered twice: by "
                        f"{prev.describe()} and by {info.describe()}. Uninstall one or rename "
                        f"the type."
                    )
                table[_kind.name][type_name] = info

            kwargs = {"register": register} if "register" in impl.argnames else {}
            try:
                impl.function(**kwargs)
            except DuplicateComponentError:
                raise
            except Exception as exc:
                if plugins._strict() or plugin in plugins.BUILTIN_MODULES:
                    raise
                failure = plugins.PluginFailure(
                    plugin, dist, version, f"{type(exc).__name__} in {kind.hook}: {exc}"
                )
                pm.failures.append(failure)  # type: ignore[attr-defined]
                print(failure.line(), file=sys.stderr)
    return table


def _table() -> dict[str, dict[str, ComponentInfo]]:
    global _entries
    with _lock:
        if _entries is None:
            _entries = _collect()
        return _entries


def kinds() -> tuple[str, ...]:
    """The component kinds, e.g. ``('tokenizer', 'prior', 'conditioner', ...)``."""
    return tuple(_KINDS)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        close = difflib.get_close_matches(kind, _KINDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownComponentError(
            f"unknown component kind '{kind}'{hint}; kinds: {', '.join(_KINDS)}."
        )


def list(kind: str, pattern: str = "*") -> builtins.list[str]:
    """Sorted type names of ``kind`` matching the fnmatch ``pattern``."""
    _check_kind(kind)
    return sorted(t for t in _table()[kind] if fnmatch.fnmatchcase(t, pattern))


def entries(kind: str | None = None) -> builtins.list[ComponentInfo]:
    """Every registered component (of one kind, or all), sorted by kind then type."""
    if kind is not None:
        _check_kind(kind)
    table = _table()
    wanted = (kind,) if kind is not None else tuple(_KINDS)
    return [table[k][t] for k in wanted for t in sorted(table[k])]


def get(kind: str, type: str) -> ComponentInfo:
    """The registered component ``type`` of ``kind``; unknown types list the known ones."""
    _check_kind(kind)
    table = _table()[kind]
    if type not in table:
        known = sorted(table)
        close = difflib.get_close_matches(type, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownComponentError(
            f"unknown {kind} type '{type}'{hint}; known {kind} types: "
            f"{', '.join(known) or '(none)'}. Run `latentgen plugins` to see what is installed."
        )
    return table[type]


def kind_of(config: ComponentConfig) -> str:
    """The kind whose registry holds this config's class."""
    for kind, table in _table().items():
        info = table.get(config.type)
        if info is not None and isinstance(config, info.config_cls):
            return kind
    raise UnknownComponentError(
        f"{type(config).__qualname__} (type '{config.type}') is not registered under any kind. "
        "Register its component class through a latentgen plugin hook."
    )


def build(kind_or_config: str | ComponentConfig, config: Any = None) -> Any:
    """Build a component: ``build("prior", {...})``, ``build("prior", cfg)`` or ``build(cfg)``."""
    from latentgen.specs import parse_component

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
