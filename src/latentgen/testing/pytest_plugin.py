"""pytest fixtures for latentgen and its plugins (loaded through the ``pytest11`` entry point).

- ``latentgen_plugin``: ``latentgen_plugin(obj, name=None)`` registers a plugin object (a module
  or any object with ``@latentgen.hookimpl`` functions) for one test, unregistered afterwards.
- ``isolated_plugins``: a plugin manager with the built-ins only (no installed entry points).
- ``tiny_images``: a seeded ``[2, 3, 16, 16]`` batch in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def latentgen_plugin() -> Iterator[Callable[..., str]]:
    from latentgen import plugins

    names: list[str] = []

    def register(plugin: Any, name: str | None = None, **kwargs: Any) -> str:
        registered = plugins.register_plugin(plugin, name=name, **kwargs)
        names.append(registered)
        return registered

    try:
        yield register
    finally:
        for name in reversed(names):
            plugins.unregister_plugin(name)


@pytest.fixture
def isolated_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from latentgen import plugins

    monkeypatch.setenv("LATENTGEN_LOAD_PLUGINS", "")
    plugins.reset_plugins()
    try:
        yield plugins.get_plugin_manager()
    finally:
        monkeypatch.undo()
        plugins.reset_plugins()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
