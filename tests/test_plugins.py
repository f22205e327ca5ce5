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


def test_duplicate_type_fails_at_registration_naming_both_plugins(latentgen_plugin):
    latentgen_plugin(_plugin(register_conditioners=lambda register: register(_Echo)), name="one")

    class _Other(_Echo):
        pass

    with pytest.raises(DuplicateComponentError, match="registered twice") as err:
        latentgen_plugin(
            _plugin(register_conditioners=lambda register: register(_Other)), name="two"
        )
    assert "'one'" in str(err.value) and "'two'" in str(err.value)
    assert "_Other" in str(err.value) and "rename the type" in str(err.value)
    # The first plugin keeps its type and the second left nothing behind.
    assert registry.get("conditioner", "test.echo").cls is _Echo
    assert "two" not in {p.name for p in plugin_infos()}


def test_same_plugin_registered_twice_says_how_to_test_a_checkout(latentgen_plugin):
    plugin = _plugin(register_conditioners=lambda register: register(_Echo))
    latentgen_plugin(plugin, name="latentgen-echo", version="1.0")
    # A second copy of the same package (same class names, other objects) ...
    copy = _plugin(
        register_conditioners=lambda register: register(
            type(_Echo)(
                "_Echo",
                (_Echo,),
                {"__module__": _Echo.__module__, "__qualname__": _Echo.__qualname__},
            )
        )
    )
    with pytest.raises(DuplicateComponentError, match='LATENTGEN_LOAD_PLUGINS=""'):
        latentgen_plugin(copy, name="latentgen-echo-dev")
    # ... or under the name the installed copy already holds.
    with pytest.raises(PluginLoadError, match="already registered") as err:
        latentgen_plugin(copy, name="latentgen-echo")
    assert "latentgen-echo 1.0" in str(err.value)
    assert 'LATENTGEN_LOAD_PLUGINS=""' in str(err.value)


def test_misspelled_hook_gets_did_you_mean(latentgen_plugin):
    def register_conditioner(register):  # missing the "s"
        register(_Echo)

    with pytest.raises(PluginLoadError, match="did you mean 'register_conditioners'"):
        latentgen_plugin(_plugin(register_conditioner=register_conditioner), name="typo")
    assert "typo" not in {p.name for p in plugin_infos()}


@pytest.mark.parametrize("strict", ["1", ""])
def test_register_rejects_non_component_at_registration(latentgen_plugin, monkeypatch, strict):
    monkeypatch.setenv("LATENTGEN_STRICT_PLUGINS", strict)
    with pytest.raises(
        PluginLoadError,
        match=r"builtins.dict as a conditioner, but it is not a "
        r"subclass of latentgen.Conditioner",
    ):
        latentgen_plugin(_plugin(register_conditioners=lambda register: register(dict)), name="b")
    assert "class_label" in registry.list("conditioner")  # the host carries on
    assert "b" not in {p.name for p in plugin_infos()}


def test_register_rejects_class_without_config(latentgen_plugin):
    class NoConfig(Conditioner):
        vocab_size = 2

        def encode(self, raw):
            raise NotImplementedError

    with pytest.raises(PluginLoadError, match="has no `Config`") as err:
        latentgen_plugin(_plugin(register_conditioners=lambda register: register(NoConfig)))
    assert "test_register_rejects_class_without_config.<locals>.NoConfig" in str(err.value)


def test_register_rejects_non_literal_type(latentgen_plugin):
    class LooseConfig(ComponentConfig):
        type: str = "loose"

    class Loose(_Echo):
        Config = LooseConfig

    with pytest.raises(PluginLoadError, match=r"Literal\['name'\]") as err:
        latentgen_plugin(_plugin(register_conditioners=lambda register: register(Loose)), name="l")
    assert "<locals>.Loose as a conditioner" in str(err.value)
    assert "<locals>.LooseConfig.type is <class 'str'>" in str(err.value)


def test_hook_that_raises_fails_registration(latentgen_plugin):
    def register_conditioners(register):
        raise RuntimeError("no GPU kernels")

    with pytest.raises(PluginLoadError, match="register_conditioners raised RuntimeError: no GPU"):
        latentgen_plugin(_plugin(register_conditioners=register_conditioners), name="boom")


def test_excluded_plugin_says_so(isolated_plugins, tmp_path):
    with pytest.raises(latentgen.UnknownComponentError) as err:
        registry.get("tokenizer", "toy.palette")
    assert "excluded by LATENTGEN_LOAD_PLUGINS=''" in str(err.value)
    assert "latentgen-toy" in str(err.value)
    from latentgen.plugins import missing_plugin_hint

    assert missing_plugin_hint("latentgen-toy", "0.1.0") == (
        "latentgen-toy is installed but excluded by LATENTGEN_LOAD_PLUGINS='': add "
        "latentgen-toy to that list or unset the variable"
    )
    assert missing_plugin_hint("latentgen-nowhere", "2.0") == (
        'latentgen-nowhere 2.0 is not installed: pip install "latentgen-nowhere>=2.0"'
    )


def test_pipeline_of_excluded_plugin_says_so(tmp_path, monkeypatch):
    from latentgen import Pipeline, plugins

    Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 4},
            "prior": {"type": "toy.ngram", "vocab_size": 4},
        }
    ).save_pretrained(tmp_path / "toy")
    monkeypatch.setenv("LATENTGEN_LOAD_PLUGINS", "")
    plugins.reset_plugins()
    try:
        with pytest.raises(latentgen.UnknownComponentError) as err:
            Pipeline.from_pretrained(tmp_path / "toy")
    finally:
        monkeypatch.undo()
        plugins.reset_plugins()
    assert "latentgen-toy is installed but excluded by LATENTGEN_LOAD_PLUGINS=''" in str(err.value)
    assert "pip install" not in str(err.value)


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


def test_hook_register_classifiers(latentgen_plugin):
    import torch

    from latentgen.classifiers import ClassifierConfig, CNNClassifier

    class Cfg(ClassifierConfig):
        type: Literal["test.clf"] = "test.clf"  # type: ignore[assignment]

    class Mine(CNNClassifier):
        Config = Cfg

    latentgen_plugin(_plugin(register_classifiers=lambda register: register(Mine)), name="c")
    cfg = {"type": "test.clf", "num_classes": 2, "image_size": 8, "widths": [4]}
    clf = registry.build("classifier", cfg)
    assert isinstance(clf, Mine) and clf.probs(torch.zeros(1, 3, 8, 8)).shape == (1, 2)


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
    # The fake dists go in front of the current path, so the child runs this checkout's code.
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    full = dict(os.environ, PYTHONPATH=path, **env)
    if "LATENTGEN_STRICT_PLUGINS" not in env:
        full.pop("LATENTGEN_STRICT_PLUGINS", None)
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


_DUP_BODY = """
import latentgen
import torch
from typing import Literal
from latentgen import ComponentConfig, Conditioner, Conditioning

class DupConfig(ComponentConfig):
    type: Literal["dup.parity"] = "dup.parity"

class Dup(Conditioner):
    Config = DupConfig
    vocab_size = 2

    def encode(self, raw):
        return Conditioning(torch.as_tensor(raw).view(-1, 1).long() % 2, 2)

@latentgen.hookimpl
def register_conditioners(register):
    register(Dup)
"""


@pytest.fixture
def clashing_dists(tmp_path):
    """Two installed plugins that both register conditioner type 'dup.parity'."""
    _fake_dist(tmp_path, "latentgen-dupa", "dupa_plugin", _DUP_BODY)
    _fake_dist(tmp_path, "latentgen-dupb", "dupb_plugin", _DUP_BODY)
    return tmp_path


def test_clashing_type_disables_the_later_plugin(clashing_dists, tmp_path):
    res = _run(["plugins", "--json"], clashing_dists)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["latentgen-dupa"]["components"] == {"conditioner": ["dup.parity"]}
    assert rows["latentgen-dupa"]["error"] is None
    error = rows["latentgen-dupb"]["error"]
    assert "'latentgen-dupa' 0.2 (dupa_plugin.Dup)" in error
    assert "'latentgen-dupb' 0.2 (dupb_plugin.Dup)" in error
    assert "latentgen-dupb loaded later, so it is the one left out" in error
    # Every other plugin's components are still listed.
    assert "toy.palette" in rows["latentgen-toy"]["components"]["tokenizer"]
    assert "class_label" in rows["latentgen"]["components"]["conditioner"]
    assert [ln for ln in res.stderr.splitlines() if "latentgen-dupb 0.2 is disabled" in ln]
    text = _run(["plugins"], clashing_dists).stdout
    assert "failed to load or disabled:" in text and "toy.palette, " not in text
    assert "tokenizer: toy.palette" in text


def test_clashing_type_leaves_unrelated_commands_working(clashing_dists, tmp_path):
    from latentgen import Pipeline

    Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 4},
            "prior": {"type": "toy.ngram", "vocab_size": 4},
        }
    ).save_pretrained(tmp_path / "toy")
    out = tmp_path / "s.png"
    res = _run(
        ["sample", str(tmp_path / "toy"), "-n", "2", "--size", "8", "-o", str(out)], clashing_dists
    )
    assert res.returncode == 0, res.stderr
    assert out.is_file()


def test_clashing_type_in_strict_mode_raises(clashing_dists):
    res = _run(["plugins"], clashing_dists, LATENTGEN_STRICT_PLUGINS="1")
    assert res.returncode != 0
    assert "registered twice" in res.stderr
    assert "'latentgen-dupa'" in res.stderr and "'latentgen-dupb'" in res.stderr


def test_cli_gives_conditioners_the_raw_values_the_docs_list(latentgen_plugin, tmp_path):
    import torch
    from click.testing import CliRunner
    from PIL import Image

    from latentgen import InputError, Pipeline
    from latentgen.cli import main

    seen = []

    class RecordConfig(ComponentConfig):
        type: Literal["test.record"] = "test.record"

    class Record(Conditioner):
        Config = RecordConfig
        vocab_size = 2

        def encode(self, raw):
            if raw == "bad":
                raise InputError("test.record cannot take 'bad'; pass x=1.")
            seen.append(raw)
            return Conditioning(torch.zeros(1, 1, dtype=torch.long), 2)

    latentgen_plugin(_plugin(register_conditioners=lambda register: register(Record)), name="rec")
    Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 4},
            "prior": {"type": "toy.ngram", "vocab_size": 4, "conditions": {"x": {"vocab_size": 2}}},
            "conditioners": {"x": {"type": "test.record"}},
        }
    ).save_pretrained(tmp_path / "pipe")
    Image.new("P", (8, 8), 3).save(tmp_path / "map.png")

    def sample(value):
        args = ["sample", str(tmp_path / "pipe"), "-n", "1", "--size", "8"]
        return CliRunner().invoke(main, [*args, "-o", str(tmp_path / "s.png"), "-c", f"x={value}"])

    for value in (f"@{tmp_path / 'map.png'}", "[[0, 1], [1, 0]]", "3", "shirt"):
        res = sample(value)
        assert res.exit_code == 0, res.output
    image, nested, number, word = seen
    assert isinstance(image, Image.Image) and image.mode == "P"  # as decoded, not converted
    assert nested == [[0, 1], [1, 0]] and number == 3 and word == "shirt"
    res = sample("bad")
    assert res.exit_code == 1 and "test.record cannot take 'bad'; pass x=1." in res.output
    assert "Traceback" not in res.output


def test_plugins_hook_filter_and_unknown_hook():
    from click.testing import CliRunner

    from latentgen.cli import main

    res = CliRunner().invoke(main, ["plugins", "--json", "--hook", "register_priors"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert rows and all("register_priors" in r["hooks"] for r in rows)
    res = CliRunner().invoke(main, ["plugins", "--hook", "register_prior"])
    assert res.exit_code == 1
    assert "unknown hook 'register_prior' (did you mean 'register_priors'?)" in res.output
