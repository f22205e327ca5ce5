"""Loading plugins: the pluggy manager, entry points one by one, and a record of what failed.

Environment:
    LATENTGEN_LOAD_PLUGINS   comma-separated distribution names to load (unset: all; "": none).
    LATENTGEN_STRICT_PLUGINS=1  re-raise a plugin's failure instead of recording it (CI sets it).
    LATENTGEN_TRACE_PLUGINS=1   print every hook call and its result to stderr.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from latentgen import __version__, hookspecs
from latentgen.errors import PluginLoadError

__all__ = [
    "BUILTIN_MODULES",
    "PluginFailure",
    "PluginInfo",
    "get_plugin_manager",
    "plugin_failures",
    "plugin_infos",
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
)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    name: str
    dist: str
    version: str
    error: str
    traceback: str = ""

    def line(self) -> str:
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


class _Manager(pluggy.PluginManager):
    """A PluginManager that keeps the registry in step with every register/unregister."""

    def __init__(self) -> None:
        super().__init__("latentgen")
        self.dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.failures: list[PluginFailure] = []

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        result = super().register(plugin, name)
        _invalidate_registry()
        return result

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        result = super().unregister(plugin, name)
        gone = name or self.get_name(plugin)
        self.failures = [f for f in self.failures if f.name != gone]
        for key in [k for k in self.dists if self.get_plugin(k) is None]:
            self.dists.pop(key, None)
        _invalidate_registry()
        return result


_lock = threading.RLock()
_pm: _Manager | None = None


def _invalidate_registry() -> None:
    from latentgen import registry  # lazy: registry imports this module

    registry._invalidate()


def _unknown_hooks(pm: _Manager, plugin: Any) -> list[str]:
    callers = pm.get_hookcallers(plugin) or []
    return [hc.name for hc in callers if not hc.has_spec()]


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("register_")]


def _unknown_hook_message(bad: list[str]) -> str:
    parts = []
    for name in bad:
        close = difflib.get_close_matches(name, _hook_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parts.append(f"'{name}'{hint}")
    return f"implements unknown hook(s) {', '.join(parts)}; known hooks: {', '.join(_hook_names())}"


def _add(pm: _Manager, plugin: Any, name: str, dist: str, version: str) -> None:
    """Register one plugin and check its hooks, recording (or in strict mode raising) failures."""
    pm.register(plugin, name=name)
    pm.dists[name] = (dist, version)
    bad = _unknown_hooks(pm, plugin)
    if bad:
        pm.unregister(name=name)
        msg = f"plugin {name} {_unknown_hook_message(bad)}"
        if _strict():
            raise PluginLoadError(msg)
        pm.failures.append(PluginFailure(name, dist, version, f"PluginLoadError: {msg}"))


def _selected(dist: str, names: set[str] | None) -> bool:
    if names is None:
        return True
    norm = dist.lower().replace("_", "-")
    return norm in names


def _entry_points() -> list[metadata.EntryPoint]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        key = (dist, ep.name, ep.value)
        if key not in seen:  # the same dist can appear twice on sys.path (editable installs)
            seen.add(key)
            out.append(ep)
    return out


def _load_entry_points(pm: _Manager) -> None:
    env = os.environ.get("LATENTGEN_LOAD_PLUGINS")
    names = None if env is None else {n.strip().lower().replace("_", "-") for n in env.split(",")}
    names = None if names is None else {n for n in names if n}
    eps = _entry_points()
    per_dist: dict[str, int] = {}
    for ep in eps:
        dist = ep.dist.metadata["Name"] if ep.dist is not None else ep.name
        per_dist[dist] = per_dist.get(dist, 0) + 1
    ep_names: dict[str, str] = {}
    for ep in eps:
        dist = ep.dist.metadata["Name"] if ep.dist is not None else ep.name
        version = ep.dist.version if ep.dist is not None else "?"
        if not _selected(dist, names):
            continue
        if ep.name in ep_names and ep_names[ep.name] != dist:
            print(
                f"latentgen: warning: distributions {ep_names[ep.name]} and {dist} both declare "
                f"entry point '{ep.name}'; both are loaded under their distribution names",
                file=sys.stderr,
            )
        ep_names[ep.name] = dist
        name = dist if per_dist[dist] == 1 else f"{dist}:{ep.name}"
        try:
            plugin = ep.load()
            _add(pm, plugin, name, dist, version)
        except Exception as exc:
            if _strict():
                raise
            err = f"{type(exc).__name__}: {exc}"
            pm.failures.append(PluginFailure(name, dist, version, err, traceback.format_exc()))


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
            _add(pm, module, modname, BUILTIN_DIST, __version__)
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


def plugin_version(name: str) -> tuple[str, str]:
    """``(distribution, version)`` of a registered plugin name."""
    pm = _manager()
    return pm.dists.get(name, (name, "?"))


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to load (empty in strict mode, which raises instead)."""
    return list(_manager().failures)


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


def register_plugin(
    plugin: Any, name: str | None = None, dist: str | None = None, version: str = "0"
) -> str:
    """Register a plugin object at run time (tests, notebooks); returns its name.

    The plugin's hooks are checked at once: an unknown hook name raises ``PluginLoadError``
    with a did-you-mean, whatever the strict setting, since the caller is right here to fix it.
    """
    pm = _manager()
    name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
    pm.register(plugin, name=name)
    pm.dists[name] = (dist or name, version)
    bad = _unknown_hooks(pm, plugin)
    if bad:
        pm.unregister(name=name)
        raise PluginLoadError(f"plugin {name} {_unknown_hook_message(bad)}")
    return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with ``register_plugin``."""
    _manager().unregister(name=name)


def reset_plugins() -> None:
    """Forget the manager so the next use reloads built-ins and entry points (tests)."""
    global _pm
    with _lock:
        _pm = None
    _invalidate_registry()
