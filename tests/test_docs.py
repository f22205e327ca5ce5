"""Every ```python block in docs/*.md runs, in order, as written (README examples too)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import latentgen.hookspecs as hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    blocks = BLOCK.findall(doc.read_text())
    if not blocks:
        pytest.skip(f"{doc.name} has no python examples")
    monkeypatch.chdir(tmp_path)
    name = f"latentgen_doc_{doc.stem.replace('-', '_')}"
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), module.__dict__)
    finally:
        sys.modules.pop(name, None)
        from latentgen import plugins

        for plugin_name in ("latentgen-docs",):
            if plugins.get_plugin_manager().get_plugin(plugin_name) is not None:
                plugins.unregister_plugin(plugin_name)


HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("register_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    text = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### {hook}(register)" in text, f"docs/plugins.md needs a section for {hook}"
    section = text.split(f"### {hook}(register)", 1)[1].split("\n### ", 1)[0]
    assert f"def {hook}(register):" in section, f"{hook} needs a runnable example"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    tests = (ROOT / "tests" / "test_plugins.py").read_text()
    kind = hook.removeprefix("register_").removesuffix("s")
    assert f"def test_hook_{hook}(" in tests or f'"{kind}"' in tests, (
        f"tests/test_plugins.py needs test_hook_{hook}"
    )
