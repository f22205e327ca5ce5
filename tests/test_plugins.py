"""Plugin loading: built-ins through hooks, throwaway plugins, failures that spare the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Literal

import pytest

import latentgen
from latentgen import ComponentConfig, Conditioner, Conditioning, registry
from latentgen.errors import DuplicateComponentError, PluginLoadError
from latentgen.hookspecs import hookimpl
from latentgen.plugins import plugin_infos

BIN = Path(sys.executable).parent


class _EchoConfig(ComponentConfig):
    type: Literal["test.echo"] = "test.echo"
    vocab_size: int = 3


class _Echo(Conditioner):
    Config = _EchoConfig

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def encode(self, raw):
        import torch

        return Conditioning(torch.as_tensor(raw).view(-1, 1).long(), self.vocab_size)


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def test_builtins_register_through_hooks():
    infos = {p.name: p for p in plugin_infos()}
    assert "latentgen.builtins.conditioners" in infos
    assert infos["latentgen.builtins.conditioners"].builtin
    info = registry.get("conditioner", "class_label")
    assert info.plugin == "latentgen" and info.version == latentgen.__version__


def test_throwaway_plugin_registers_and_unregisters(latentgen_plugin):
    assert "test.echo" not in registry.list("conditioner")
    latentgen_plugin(
        _plugin(register_conditioners=lambda register: register(_Echo)),
        name="echo-plugin",
        version="9.9",
    )
    info = registry.get("conditioner", "test.echo")
    assert (info.cls, info.plugin, info.version) == (_Echo, "echo-plugin", "9.9")
    built = registry.build("conditioner", {"type": "test.echo"})
    assert built.encode([1, 2]).tokens.tolist() == [[1], [2]]


def test_throwaway_plugin_is_gone_after_test():
    assert "test.echo" not in registry.list("conditioner")


def test_duplicate_type_names_both_plugins(latentgen_plugin):
    latentgen_plugin(_plugin(register_conditioners=lambda register: register(_Echo)), name="one")

    class _Other(_Echo):
        pass

    latentgen_plugin(_plugin(register_conditioners=lambda register: register(_Other)), name="two")
    with pytest.raises(DuplicateComponentError, match="registered twice") as err:
        registry.list("conditioner")
    assert "'one'" in str(err.value) and "'two'" in str(err.value)


def test_misspelled_hook_gets_did_you_mean(latentgen_plugin):
    def register_conditioner(register):  # missing the "s"
        register(_Echo)

    with pytest.raises(PluginLoadError, match="did you mean 'register_conditioners'"):
        latentgen_plugin(_plugin(register_conditioner=register_conditioner), name="typo")
    assert "typo" not in {p.name for p in plugin_infos()}


def _failure(name):
    from latentgen.plugins import plugin_failures

    return next(f.error for f in plugin_failures() if f.name == name)


def test_register_rejects_non_component(latentgen_plugin, capsys, monkeypatch):
    monkeypatch.delenv("LATENTGEN_STRICT_PLUGINS", raising=False)
    latentgen_plugin(_plugin(register_conditioners=lambda register: register(dict)), name="bad")
    assert "class_label" in registry.list("conditioner")  # the host carries on
    assert "not a subclass of Conditioner" in _failure("bad")
    assert "plugin bad 0 failed to load" in capsys.readouterr().err


def test_register_in_strict_mode_raises(latentgen_plugin, monkeypatch):
    monkeypatch.setenv("LATENTGEN_STRICT_PLUGINS", "1")
    latentgen_plugin(_plugin(register_conditioners=lambda register: register(dict)), name="bad")
    with pytest.raises(PluginLoadError, match="not a subclass of Conditioner"):
        registry.list("conditioner")


def test_register_rejects_non_literal_type(latentgen_plugin, monkeypatch):
    monkeypatch.delenv("LATENTGEN_STRICT_PLUGINS", raising=False)

    class LooseConfig(ComponentConfig):
        type: str = "loose"

    class Loose(_Echo):
        Config = LooseConfig

    latentgen_plugin(_plugin(register_conditioners=lambda register: register(Loose)), name="loose")
    registry.list("conditioner")
    assert "Literal['name']" in _failure("loose")


def test_isolated_plugins_has_builtins_only(isolated_plugins):
    names = {p.name for p in plugin_infos()}
    assert "latentgen-toy" not in names
    assert "class_label" in registry.list("conditioner")
    assert "toy.palette" not in registry.list("tokenizer")


# -- hooks: each hook is exercised by a throwaway plugin (named test_hook_<name>) -------------


def _tiny_component(kind: str):
    """A minimal registered class of each kind, built on the public base classes."""
    import torch

    from latentgen.data.base import ImageDataset
    from latentgen.priors.attention import AttentionBackend

    bases = {
        "conditioner": _Echo,
        "dataset": ImageDataset,
        "attention_backend": AttentionBackend,
    }

    class Cfg(ComponentConfig):
        type: Literal["test.tiny"] = "test.tiny"

    if kind == "dataset":

        class Tiny(ImageDataset):
            Config = Cfg

            def __len__(self):
                return 1

            def __getitem__(self, i):
                return {"image": torch.zeros(3, 4, 4)}

        return Tiny
    if kind == "attention_backend":

        class TinyAttention(AttentionBackend):
            Config = Cfg

            def attend(self, q, k, v, causal=False, mask=None):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return TinyAttention
    base = bases[kind]
    return type("Tiny", (base,), {"Config": Cfg})


@pytest.mark.parametrize("kind", ["conditioner", "dataset", "attention_backend"])
def test_hook_for_kind(kind, latentgen_plugin):
    cls = _tiny_component(kind)
    hook = dict(
        conditioner="register_conditioners",
        dataset="register_datasets",
        attention_backend="register_attention_backends",
    )[kind]
    latentgen_plugin(_plugin(**{hook: lambda register: register(cls)}), name=f"tiny-{kind}")
    assert registry.get(kind, "test.tiny").cls is cls


def test_hook_register_tokenizers(latentgen_plugin):
    from latentgen_toy.palette import PaletteTokenizer, PaletteTokenizerConfig

    class Cfg(PaletteTokenizerConfig):
        type: Literal["test.palette"] = "test.palette"  # type: ignore[assignment]

    class Tok(PaletteTokenizer):
        Config = Cfg

    latentgen_plugin(_plugin(register_tokenizers=lambda register: register(Tok)), name="t")
    assert registry.build("tokenizer", {"type": "test.palette"}).vocab_size == 16


def test_hook_register_priors(latentgen_plugin):
    from latentgen_toy.ngram import NGramPrior, NGramPriorConfig

    class Cfg(NGramPriorConfig):
        type: Literal["test.ngram"] = "test.ngram"  # type: ignore[assignment]

    class P(NGramPrior):
        Config = Cfg

    latentgen_plugin(_plugin(register_priors=lambda register: register(P)), name="p")
    assert registry.build("prior", {"type": "test.ngram", "vocab_size": 4}).vocab_size == 4


def test_hook_register_quantizers(latentgen_plugin):
    import torch

    from latentgen import Quantizer, QuantizerOutput

    class Cfg(ComponentConfig):
        type: Literal["test.round"] = "test.round"

    class Round(Quantizer):
        Config = Cfg
        codebook_size = 2
        dim = 1

        def forward(self, z):
            idx = (z > 0).long()[:, 0]
            return QuantizerOutput(self.embed(idx), idx, z.new_zeros(()))

        def embed(self, indices):
            return indices[:, None].float() * 2 - 1

    latentgen_plugin(_plugin(register_quantizers=lambda register: register(Round)), name="q")
    q = registry.build("quantizer", {"type": "test.round"})
    assert q(torch.tensor([[[[0.3]]]])).indices.item() == 1


# -- entry points, in a subprocess so the real loader runs ---------------------------------------


def _fake_dist(root: Path, dist: str, module: str, body: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(f"[latentgen]\n{module} = {module}\n")


def _run(args, tmp_path, **env):
    full = dict(os.environ, PYTHONPATH=str(tmp_path), **env)
    full.pop("LATENTGEN_STRICT_PLUGINS", None) if "LATENTGEN_STRICT_PLUGINS" not in env else None
    return subprocess.run(
        [str(BIN / "latentgen"), *args], capture_output=True, text=True, env=full, timeout=120
    )


@pytest.fixture
def broken_dists(tmp_path):
    _fake_dist(tmp_path, "latentgen-broken", "broken_plugin", "import foo_cuda_missing\n")
    _fake_dist(
        tmp_path,
        "latentgen-typo",
        "typo_plugin",
        """
        import latentgen
        @latentgen.hookimpl
        def register_tokenizer(register):
            pass
    """,
    )
    return tmp_path


def test_broken_plugin_does_not_take_host_down(broken_dists):
    res = _run(["plugins", "--json"], broken_dists)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert "toy.palette" in rows["latentgen-toy"]["components"]["tokenizer"]
    assert "No module named 'foo_cuda_missing'" in rows["latentgen-broken"]["error"]
    assert "did you mean 'register_tokenizers'" in rows["latentgen-typo"]["error"]
    lines = [ln for ln in res.stderr.splitlines() if "latentgen-broken" in ln]
    assert len(lines) == 1 and "LATENTGEN_STRICT_PLUGINS=1" in lines[0]


def test_strict_mode_reraises(broken_dists):
    res = _run(
        ["plugins"],
        broken_dists,
        LATENTGEN_STRICT_PLUGINS="1",
        LATENTGEN_LOAD_PLUGINS="latentgen-broken",
    )
    assert res.returncode != 0
    assert "foo_cuda_missing" in res.stderr


def test_load_plugins_selects(broken_dists):
    res = _run(["plugins", "--json"], broken_dists, LATENTGEN_LOAD_PLUGINS="latentgen-toy")
    names = {r["name"] for r in json.loads(res.stdout)}
    assert names == {"latentgen", "latentgen-toy"}
    res = _run(["plugins", "--json"], broken_dists, LATENTGEN_LOAD_PLUGINS="")
    assert {r["name"] for r in json.loads(res.stdout)} == {"latentgen"}


def test_installed_toy_plugin_strict():
    res = subprocess.run(
        [str(BIN / "latentgen"), "plugins", "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, LATENTGEN_STRICT_PLUGINS="1"),
    )
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["latentgen-toy"]["components"] == {
        "tokenizer": ["toy.palette"],
        "prior": ["toy.ngram"],
    }
    assert rows["latentgen-toy"]["version"] == "0.1.0"
