"""Every ```python block in docs/*.md runs, in order, as written (README examples too)."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

import latentgen.hookspecs as hookspecs
from latentgen.testing import ConditionerContract, PriorContract, TokenizerContract
from latentgen.testing.contracts import _Contract

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


# Docs that call their own module by the import name they document for it.
ALIASES = {"plugins.md": "latentgen_docs"}
# Plugins the docs register; removed whatever happens.
DOC_PLUGINS = ("latentgen-docs", "latentgen-docs-conditional")


def _run_contracts(namespace: dict, tmp_path: Path) -> list[str]:
    """Run every ``Test*`` contract class a doc defines, as pytest would; returns what ran."""
    ran = []
    for name, cls in list(namespace.items()):
        if not (isinstance(cls, type) and issubclass(cls, _Contract) and name.startswith("Test")):
            continue
        for attr in sorted(a for a in dir(cls) if a.startswith("test_")):
            method = getattr(cls(), attr)
            kwargs = {}
            if "tmp_path" in inspect.signature(method).parameters:
                kwargs["tmp_path"] = tmp_path / f"{name}.{attr}"
                kwargs["tmp_path"].mkdir(parents=True)
            try:
                method(**kwargs)
            except pytest.skip.Exception:
                continue
            ran.append(f"{name}.{attr}")
    return ran


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    blocks = BLOCK.findall(doc.read_text())
    if not blocks:
        pytest.skip(f"{doc.name} has no python examples")
    monkeypatch.chdir(tmp_path)
    name = f"latentgen_doc_{doc.stem.replace('-', '_')}"
    module = types.ModuleType(name)
    names = [name, *([ALIASES[doc.name]] if doc.name in ALIASES else [])]
    for n in names:
        sys.modules[n] = module
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), module.__dict__)
        ran = _run_contracts(module.__dict__, tmp_path / "contracts")
        if doc.name == "plugins.md":
            # The contracts shown run on the examples, including the bad-input check.
            assert "TestParity.test_bad_raw" in ran
            assert {r.split(".")[0] for r in ran} == {
                "TestMeanPool",
                "TestUniform",
                "TestParity",
                "TestLabelBias",
            }
    finally:
        for n in names:
            sys.modules.pop(n, None)
        from latentgen import plugins

        for plugin_name in DOC_PLUGINS:
            if plugins.get_plugin_manager().get_plugin(plugin_name) is not None:
                plugins.unregister_plugin(plugin_name)


def test_every_contract_attribute_is_documented():
    text = (ROOT / "docs" / "plugins.md").read_text()
    table = text.split("| contract | attribute |", 1)[1].split("\n\n", 1)[0]
    for contract in (TokenizerContract, PriorContract, ConditionerContract):
        attrs = {
            a
            for klass in contract.__mro__
            for a in getattr(klass, "__annotations__", {})
            if not a.startswith("_") and a != "kind"
        }
        if contract is PriorContract:
            attrs.add("conds(prior)")  # a method to override, not an attribute
        for attr in attrs:
            assert f"`{attr}`" in table, f"docs/plugins.md: document {contract.__name__}.{attr}"


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
