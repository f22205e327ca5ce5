"""Loading plugins: the pluggy manager, entry points one by one, what each plugin registered,
and a record of what failed.

A plugin's components are collected the moment it is registered, so every problem with it (an
unknown hook, a class without a ``Config``, a type another plugin already took) is found then,
named, and charged to that plugin alone: an installed plugin is recorded as failed (or, in strict
mode, raises), while ``register_plugin`` raises at once, since its caller is right there.

Environment:
    LATENTGEN_LOAD_PLUGINS   comma-separated distribution names to load (unset: all; "": none).
    LATENTGEN_STRICT_PLUGINS=1  re-raise a plugin's failure instead of recording it (CI sets it).
    LATENTGEN_TRACE_PLUGINS=1   print every hook call and its result to stderr.
"""

from __future__ import annotations

import builtins
import difflib
import importlib
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal, get_args, get_origin

import pluggy

from latentgen import hookspecs
from latentgen.components import Component, ComponentConfig
from latentgen.errors import DuplicateComponentError, LatentgenError, PluginLoadError
from latentgen.version import __version__

__all__ = [
    "BUILTIN_MODULES",
    "KINDS",
    "ComponentInfo",
    "PluginFailure",
    "PluginInfo",
    "component_table",
    "excluded_plugins",
    "format_plugin_rows",
    "get_plugin_manager",
    "missing_plugin_hint",
    "plugin_failures",
    "plugin_infos",
    "plugin_rows",
    "plugin_version",
    "register_plugin",
    "reset_plugins",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = "latentgen"
BUILTIN_DIST = "latentgen"
BUILTIN_MODULES = (
    "latentgen.builtins.tokenizers",
    "latentgen.builtins.quantizers",
    "latentgen.builtins.priors",
    "latentgen.builtins.conditioners",
    "latentgen.builtins.attention",
    "latentgen.builtins.datasets",
    "latentgen.builtins.classifiers",
)


@dataclass(frozen=True)
class _Kind:
    hook: str
    base: str  # the public base class a registered class subclasses (for messages)


#: Component kind -> the hook that registers it and the base class its classes subclass. A class
#: belongs to a kind through ``Component.kind``, so this module need not import the base classes
#: (they import the specs, which import the registry, which imports this module).
KINDS: dict[str, _Kind] = {
    "tokenizer": _Kind("register_tokenizers", "latentgen.Tokenizer"),
    "prior": _Kind("register_priors", "latentgen.Prior"),
    "conditioner": _Kind("register_conditioners", "latentgen.Conditioner"),
    "quantizer": _Kind("register_quantizers", "latentgen.Quantizer"),
    "attention_backend": _Kind(
        "register_attention_backends", "latentgen.priors.attention.AttentionBackend"
    ),
    "dataset": _Kind("register_datasets", "latentgen.ImageDataset"),
    "classifier": _Kind("register_classifiers", "latentgen.classifiers.Classifier"),
}


@dataclass(frozen=True)
class ComponentInfo:
    """One registered component: its kind, type, classes, and the distribution that provides it."""

    kind: str
    type: str
    cls: builtins.type[Any]
    config_cls: builtins.type[ComponentConfig]
    plugin: str  # distribution name ("latentgen" for built-ins)
    version: str
    source: str = ""  # the plugin's registration name (a module name for built-ins)

    @property
    def qualname(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def describe(self) -> str:
        return f"'{self.plugin}' {self.version} ({self.qualname})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded (or was disabled), and why."""

    name: str
    dist: str
    version: str
    error: str
    traceback: str = ""
    disabled: bool = False  # loaded, but switched off because it clashed with another plugin

    def line(self) -> str:
        if self.disabled:
            return (
                f"latentgen: plugin {self.dist} {self.version} is disabled: {self.error} — "
                "latentgen carries on without it (LATENTGEN_STRICT_PLUGINS=1 makes this an error)"
            )
        return (
            f"latentgen: plugin {self.dist} {self.version} failed to load: {self.error} — run "
            f"with LATENTGEN_STRICT_PLUGINS=1 for the traceback, or `pip uninstall {self.dist}`"
        )


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its registration name, distribution, version and the hooks it implements."""

    name: str
    dist: str
    version: str
    hooks: tuple[str, ...] = field(default_factory=tuple)
    builtin: bool = False


def _strict() -> bool:
    return os.environ.get("LATENTGEN_STRICT_PLUGINS", "").lower() in ("1", "true", "yes")


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("register_")]


def _unknown_hook_message(bad: list[str]) -> str:
    parts = []
    for name in bad:
        close = difflib.get_close_matches(name, _hook_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parts.append(f"'{name}'{hint}")
    return f"implements unknown hook(s) {', '.join(parts)}; known hooks: {', '.join(_hook_names())}"


def _qualname(cls: Any) -> str:
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(cls)


def _check_class(kind: str, cls: Any, plugin: str) -> tuple[str, type[ComponentConfig]]:
    """The type name and config class of ``cls``, or a ``PluginLoadError`` naming the class."""
    where = f"plugin {plugin} registered {_qualname(cls)} as a {kind}"
    if not isinstance(cls, type) or not issubclass(cls, Component) or cls.kind != kind:
        raise PluginLoadError(f"{where}, but it is not a subclass of {KINDS[kind].base}.")
    config_cls = getattr(cls, "Config", None)
    if not isinstance(config_cls, type) or not issubclass(config_cls, ComponentConfig):
        got = "no `Config`" if config_cls is None else f"`Config = {config_cls!r}`"
        raise PluginLoadError(
            f"{where}, but it has {got}, not a latentgen.ComponentConfig subclass. Add "
            f"`Config = MyConfig` where `class MyConfig(ComponentConfig): type: Literal['name']`."
        )
    ann = config_cls.model_fields["type"].annotation
    args = get_args(ann)
    if get_origin(ann) is not Literal or len(args) != 1 or not isinstance(args[0], str):
        raise PluginLoadError(
            f"{where}, but {_qualname(config_cls)}.type is {ann!r}; it must be "
            f"`Literal['name']` with exactly one string, e.g. "
            f"`type: Literal['{plugin.removeprefix('latentgen-')}.name'] = "
            f"'{plugin.removeprefix('latentgen-')}.name'`."
        )
    return args[0], config_cls


def _duplicate_message(prev: ComponentInfo, info: ComponentInfo) -> str:
    msg = (
        f"{info.kind} type '{info.type}' is registered twice: by {prev.describe()} and by "
        f"{info.describe()}."
    )
    if prev.qualname == info.qualname:
        return (
            f"{msg} These are two copies of one plugin (an installed one and one registered "
            f"by hand?): to test a checkout without its installed copy, set "
            f'LATENTGEN_LOAD_PLUGINS="" (or leave {prev.plugin} out of it).'
        )
    return f"{msg} Uninstall one or rename the type."


class _Manager(pluggy.PluginManager):
    """A PluginManager that collects each plugin's components as it is registered."""

    def __init__(self) -> None:
        super().__init__("latentgen")
        self.dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.failures: list[PluginFailure] = []
        self.excluded: dict[str, str] = {}  # installed distribution -> version, not loaded
        self.components: dict[str, dict[str, ComponentInfo]] = {k: {} for k in KINDS}

    def register(
        self, plugin: Any, name: str | None = None, dist: str | None = None, version: str = "0"
    ) -> str | None:
        """Register ``plugin`` and its components; on any problem undo it and raise."""
        name = name or self.get_canonical_name(plugin)
        taken = self.get_plugin(name)
        if taken is not None:
            have_dist, have_version = self.dists.get(name, (name, "?"))
            raise PluginLoadError(
                f"a plugin named '{name}' is already registered ({have_dist} {have_version}). "
                f"If {have_dist} is installed and you are testing its checkout, set "
                f'LATENTGEN_LOAD_PLUGINS="" so the installed copy is not loaded; otherwise '
                "register under another name."
            )
        other = next((n for n, p in self.list_name_plugin() if p is plugin), None)
        if other is not None:
            raise PluginLoadError(f"{plugin!r} is already registered as '{other}'.")
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as e:
            self._forget(name)
            raise PluginLoadError(f"plugin {name}: {e}") from None
        if registered is None:  # blocked
            return None
        self.dists[name] = (dist or name, version)
        try:
            bad = [hc.name for hc in (self.get_hookcallers(plugin) or []) if not hc.has_spec()]
            if bad:
                raise PluginLoadError(f"plugin {name} {_unknown_hook_message(bad)}")
            found = self._collect(plugin, name)
        except BaseException:
            self._forget(name)
            raise
        for info in found:
            self.components[info.kind][info.type] = info
        return name

    def _forget(self, name: str) -> None:
        super().unregister(name=name)
        self.dists.pop(name, None)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        gone = name or self.get_name(plugin)
        result = super().unregister(plugin, name)
        self.failures = [f for f in self.failures if f.name != gone]
        self.dists.pop(gone or "", None)
        for table in self.components.values():
            for type_name in [t for t, info in table.items() if info.source == gone]:
                del table[type_name]
        return result

    def _collect(self, plugin: Any, name: str) -> list[ComponentInfo]:
        """Call each of the plugin's hooks with a checking ``register``; return what it adds."""
        dist, version = self.dists[name]
        found: dict[tuple[str, str], ComponentInfo] = {}
        for kind, spec in KINDS.items():
            for impl in getattr(self.hook, spec.hook).get_hookimpls():
                if impl.plugin is not plugin:
                    continue

                def register(cls: Any, _kind: str = kind) -> None:
                    type_name, config_cls = _check_class(_kind, cls, name)
                    info = ComponentInfo(_kind, type_name, cls, config_cls, dist, version, name)
                    prev = found.get((_kind, type_name)) or self.components[_kind].get(type_name)
                    if prev is not None and (prev.source != name or prev.cls is not cls):
                        raise DuplicateComponentError(_duplicate_message(prev, info))
                    found[(_kind, type_name)] = info

                kwargs = {"register": register} if "register" in impl.argnames else {}
                try:
                    impl.function(**kwargs)
                except LatentgenError:
                    raise
                except Exception as exc:
                    raise PluginLoadError(
                        f"plugin {name}'s {spec.hook} raised {type(exc).__name__}: {exc}"
                    ) from exc
        return list(found.values())


_lock = threading.RLock()
_pm: _Manager | None = None


def _load(pm: _Manager, load: Any, name: str, dist: str, version: str) -> None:
    """Register an installed plugin; record its failure (strict mode and built-ins raise)."""
    try:
        pm.register(load(), name=name, dist=dist, version=version)
    except Exception as exc:
        if _strict() or dist == BUILTIN_DIST:
            raise
        disabled = isinstance(exc, DuplicateComponentError)
        if disabled:
            err = f"{exc} {dist} loaded later, so it is the one left out."
        else:
            err = f"{type(exc).__name__}: {exc}"
        pm.failures.append(
            PluginFailure(name, dist, version, err, traceback.format_exc(), disabled=disabled)
        )


def _selected(dist: str, names: set[str] | None) -> bool:
    if names is None:
        return True
    return dist.lower().replace("_", "-") in names


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    if ep.dist is None:
        return ep.name, "?"
    return ep.dist.metadata["Name"], ep.dist.version


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points in a fixed order (by distribution, then name), each once."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = (_dist_of(ep)[0], ep.name, ep.value)
        if key not in seen:  # the same dist can appear twice on sys.path (editable installs)
            seen.add(key)
            out.append(ep)
    # Sorted so "the plugin loaded later" (the one a clash disables) does not depend on the
    # order a file system lists site-packages in.
    return sorted(out, key=lambda ep: (_dist_of(ep)[0].lower(), ep.name))


def _load_filter() -> set[str] | None:
    env = os.environ.get("LATENTGEN_LOAD_PLUGINS")
    if env is None:
        return None
    return {n.strip().lower().replace("_", "-") for n in env.split(",") if n.strip()}


def _load_entry_points(pm: _Manager) -> None:
    names = _load_filter()
    eps = _entry_points()
    per_dist: dict[str, int] = {}
    for ep in eps:
        per_dist[_dist_of(ep)[0]] = per_dist.get(_dist_of(ep)[0], 0) + 1
    ep_names: dict[str, str] = {}
    for ep in eps:
        dist, version = _dist_of(ep)
        if not _selected(dist, names):
            pm.excluded[dist] = version
            continue
        if ep.name in ep_names and ep_names[ep.name] != dist:
            print(
                f"latentgen: warning: distributions {ep_names[ep.name]} and {dist} both declare "
                f"entry point '{ep.name}'; both are loaded under their distribution names",
                file=sys.stderr,
            )
        ep_names[ep.name] = dist
        name = dist if per_dist[dist] == 1 else f"{dist}:{ep.name}"
        _load(pm, ep.load, name, dist, version)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-ins plus installed entry points (built once)."""
    global _pm
    with _lock:
        if _pm is not None:
            return _pm
        pm = _Manager()
        pm.add_hookspecs(hookspecs)
        for modname in BUILTIN_MODULES:
            module = importlib.import_module(modname)
            _load(pm, lambda m=module: m, modname, BUILTIN_DIST, __version__)
        _load_entry_points(pm)
        if os.environ.get("LATENTGEN_TRACE_PLUGINS", "").lower() in ("1", "true", "yes"):

            def before(hook_name: str, impls: Any, kwargs: Any) -> None:
                print(
                    f"latentgen: hook {hook_name} -> {[i.plugin_name for i in impls]}",
                    file=sys.stderr,
                )

            def after(outcome: Any, hook_name: str, impls: Any, kwargs: Any) -> None:
                print(f"latentgen: hook {hook_name} done", file=sys.stderr)

            pm.add_hookcall_monitoring(before, after)
        for failure in pm.failures:
            print(failure.line(), file=sys.stderr)
        _pm = pm
        return pm


def _manager() -> _Manager:
    pm = get_plugin_manager()
    assert isinstance(pm, _Manager)
    return pm


def component_table() -> dict[str, dict[str, ComponentInfo]]:
    """kind -> type -> ``ComponentInfo`` for every loaded plugin (the registry reads this)."""
    return _manager().components


def plugin_version(name: str) -> tuple[str, str]:
    """``(distribution, version)`` of a registered plugin name."""
    return _manager().dists.get(name, (name, "?"))


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to load or were disabled (empty in strict mode, which raises)."""
    return list(_manager().failures)


def excluded_plugins() -> dict[str, str]:
    """Installed plugin distributions (-> version) that ``LATENTGEN_LOAD_PLUGINS`` left out."""
    return dict(_manager().excluded)


def missing_plugin_hint(dist: str, version: str = "?") -> str:
    """Why the components of ``dist`` are not available, and what to do about it."""
    pm = _manager()
    if dist in pm.excluded:
        env = os.environ.get("LATENTGEN_LOAD_PLUGINS", "")
        return (
            f"{dist} is installed but excluded by LATENTGEN_LOAD_PLUGINS={env!r}: add {dist} "
            "to that list or unset the variable"
        )
    failure = next((f for f in pm.failures if f.dist == dist), None)
    if failure is not None:
        state = "is disabled" if failure.disabled else "is installed but failed to load"
        return f"{dist} {state}: {failure.error}"
    if dist == BUILTIN_DIST:
        return (
            f"it was built into latentgen {version}, and this latentgen {__version__} lacks "
            "it: install that version of latentgen"
        )
    return f'{dist} {version} is not installed: pip install "{dist}>={version}"'


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin with the hooks it implements; built-ins first."""
    pm = _manager()
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist, version = pm.dists.get(name, (name, "?"))
        hooks = tuple(sorted(hc.name for hc in (pm.get_hookcallers(plugin) or [])))
        out.append(PluginInfo(name, dist, version, hooks, builtin=name in BUILTIN_MODULES))
    out.sort(key=lambda p: (not p.builtin, p.name))
    return out


def plugin_rows(hook: str | None = None) -> list[dict[str, Any]]:
    """One row per distribution: name, version, hooks, components by kind, builtin, error.

    Plugins that failed to load or were disabled come last, with ``error`` set; ``hook`` keeps
    only the loaded plugins that implement it.
    """
    if hook is not None and hook not in _hook_names():
        close = difflib.get_close_matches(hook, _hook_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PluginLoadError(f"unknown hook '{hook}'{hint}; hooks: {', '.join(_hook_names())}")
    rows: dict[str, dict[str, Any]] = {}
    for info in plugin_infos():
        row = rows.setdefault(
            info.dist,
            {
                "name": info.dist,
                "version": info.version,
                "hooks": [],
                "components": {},
                "builtin": info.builtin,
                "error": None,
            },
        )
        row["hooks"] = sorted(set(row["hooks"]) | set(info.hooks))
    for kind, table in component_table().items():
        for type_name in sorted(table):
            entry = table[type_name]
            rows[entry.plugin]["components"].setdefault(kind, []).append(type_name)
    failed = [
        {
            "name": f.dist,
            "version": f.version,
            "hooks": [],
            "components": {},
            "builtin": False,
            "error": f.error,
        }
        for f in plugin_failures()
    ]
    return [r for r in rows.values() if hook is None or hook in r["hooks"]] + failed


def format_plugin_rows(rows: list[dict[str, Any]]) -> str:
    """``plugin_rows`` as the table ``latentgen plugins`` prints."""
    lines = [f"{'plugin':<20} {'version':<9} components"]
    for r in rows:
        if r["error"] is None:
            comps = " | ".join(f"{k}: {', '.join(v)}" for k, v in r["components"].items())
            lines.append(f"{r['name']:<20} {r['version']:<9} {comps or '(none)'}")
    failed = [r for r in rows if r["error"] is not None]
    if failed:
        lines.append("failed to load or disabled:")
        lines += [f"{r['name']:<20} {r['version']:<9} {r['error']}" for r in failed]
    return "\n".join(lines)


def register_plugin(
    plugin: Any, name: str | None = None, dist: str | None = None, version: str = "0"
) -> str:
    """Register a plugin object at run time (tests, notebooks); returns its name.

    Its hooks run at once: an unknown hook, a class without a ``Config`` or with a non-Literal
    ``type``, or a type another plugin has taken raises here (``PluginLoadError`` or
    ``DuplicateComponentError``), whatever the strict setting, since the caller can fix it.
    """
    pm = _manager()
    name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
    registered = pm.register(plugin, name=name, dist=dist or name, version=version)
    if registered is None:
        raise PluginLoadError(f"plugin name '{name}' is blocked; register under another name.")
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with ``register_plugin`` (and any failure recorded for it)."""
    _manager().unregister(name=name)


def reset_plugins() -> None:
    """Forget the manager so the next use reloads built-ins and entry points (tests)."""
    global _pm
    with _lock:
        _pm = None
