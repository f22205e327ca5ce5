"""``latentgen new-plugin``: write a working plugin package from the template in templates/plugin.

The package has one component of each kind, their tests (latentgen's contracts), a
``pyproject.toml`` that builds (src layout, entry point) and a CI workflow.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from latentgen.errors import InputError
from latentgen.version import __version__

__all__ = ["PluginNames", "new_plugin", "plugin_names"]

_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_SUFFIX = ".tmpl"
_MODULE_DIR = "__module__"  # the template's placeholder for the package directory


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin name gives: ``sketch`` -> latentgen-sketch, latentgen_sketch."""

    name: str  # entry point name and type prefix: types are "<name>.<type>"
    dist: str  # distribution: latentgen-<name>
    module: str  # import name: latentgen_<name with _ for ->


def plugin_names(name: str) -> PluginNames:
    """Check a plugin name (``sketch`` or ``latentgen-sketch``) and derive the others from it."""
    short = name.removeprefix("latentgen-")
    module = "latentgen_" + short.replace("-", "_")
    if not _NAME.fullmatch(short) or keyword.iskeyword(short):
        raise InputError(
            f"plugin name {name!r} cannot be used: write lowercase letters, digits and single "
            "'-' between them, starting with a letter, e.g. 'sketch' (distribution "
            "latentgen-sketch, module latentgen_sketch, types 'sketch.*')."
        )
    return PluginNames(short, f"latentgen-{short}", module)


def _render(text: str, names: PluginNames) -> str:
    for key, value in (
        ("name", names.name),
        ("dist", names.dist),
        ("module", names.module),
        ("latentgen_version", __version__),
    ):
        text = text.replace("{{" + key + "}}", value)
    return text


def new_plugin(name: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """Write the package ``latentgen-<name>`` into ``directory`` (default ./latentgen-<name>).

    Refuses an existing ``directory``; the package appears whole or not at all (it is written
    beside its target and renamed into place).
    """
    names = plugin_names(name)
    target = Path(directory) if directory is not None else Path(names.dist)
    if target.exists():
        raise InputError(
            f"{target} already exists; new-plugin does not overwrite anything. Pass another "
            "--dir, or remove that directory first."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    template = resources.files("latentgen") / "templates" / "plugin"
    try:
        with resources.as_file(template) as root:
            for src in sorted(root.rglob("*" + _SUFFIX)):
                rel = src.relative_to(root).with_suffix("")  # drop .tmpl
                parts = [names.module if p == _MODULE_DIR else p for p in rel.parts]
                dest = tmp.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(_render(src.read_text(), names))
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
