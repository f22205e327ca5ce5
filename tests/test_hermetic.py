"""The suite is hermetic: a user's populated caches and third-party plugins do not change it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from examples import shipped_plugins, swept
from latentgen import registry
from test_lpips import HAVE_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
CACHE_VARS = ("HOME", "XDG_CACHE_HOME", "LATENTGEN_CACHE", "TORCH_HOME", "HF_HOME")


def test_every_cache_points_into_one_session_temp_dir() -> None:
    dirs = [Path(os.environ[v]) for v in CACHE_VARS]
    sandbox = Path(os.environ["LATENTGEN_CACHE"]).parent
    assert sandbox.is_relative_to(tempfile.gettempdir())
    assert all(d.is_relative_to(sandbox) for d in dirs), dirs
    assert Path.home().is_relative_to(sandbox)
    assert Path(torch.hub.get_dir()).is_relative_to(sandbox)


def test_the_sweep_covers_what_latentgen_ships() -> None:
    assert {"latentgen", "latentgen-toy"} <= shipped_plugins()
    assert {"vqgan", "vqvae", "toy.palette"} <= set(swept("tokenizer"))
    assert {"transformer", "pixelsnail", "toy.ngram"} <= set(swept("prior"))
    for kind in registry.kinds():  # every shipped type of every kind is swept
        ours = [
            e.type for e in registry.entries(kind) if e.plugin in ("latentgen", "latentgen-toy")
        ]
        assert set(ours) <= set(swept(kind)), kind


_THIRD_PARTY = """
from typing import Literal

import latentgen
from latentgen.conditioners.label import ClassLabelConditioner, ClassLabelConfig
from latentgen.tokenizers.vqvae import VQVAE, VQVAEConfig


class ElsewhereConfig(VQVAEConfig):
    type: Literal["elsewhere.vq"] = "elsewhere.vq"


class Elsewhere(VQVAE):
    Config = ElsewhereConfig


class TagConfig(ClassLabelConfig):
    type: Literal["elsewhere.tag"] = "elsewhere.tag"


class Tag(ClassLabelConditioner):
    Config = TagConfig


@latentgen.hookimpl
def register_tokenizers(register):
    register(Elsewhere)


@latentgen.hookimpl
def register_conditioners(register):
    register(Tag)
"""


def _fake_user_machine(root: Path) -> tuple[Path, Path, dict[Path, bytes]]:
    """A home whose caches hold stale, broken weights, and a third-party plugin dist-info."""
    home = root / "home"
    stale = {
        home / ".cache/latentgen/lpips/vgg16_trunk.safetensors": b"stale trunk from 0.0.9",
        home / ".cache/latentgen/lpips/vgg16_heads.safetensors": b"stale heads from 0.0.9",
        home / ".cache/torch/hub/checkpoints/vgg16-397923af.pth": b"not a checkpoint",
    }
    for path, data in stale.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    site = root / "site"
    site.mkdir()
    (site / "elsewhere_plugin.py").write_text(textwrap.dedent(_THIRD_PARTY))
    info = site / "latentgen_elsewhere-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: latentgen-elsewhere\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text("[latentgen]\nelsewhere = elsewhere_plugin\n")
    return home, site, stale


def test_suite_passes_beside_a_populated_cache_and_a_third_party_plugin(tmp_path: Path) -> None:
    home, site, stale = _fake_user_machine(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env.update(
        HOME=str(home),
        PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]),
        LATENTGEN_STRICT_PLUGINS="1",  # the third-party plugin must load, not be skipped
    )

    def pytest(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    latentgen = Path(sys.executable).parent / "latentgen"
    listed = subprocess.run([latentgen, "plugins"], env=env, capture_output=True, text=True)
    assert "elsewhere.vq" in listed.stdout, listed.stdout + listed.stderr  # it is installed

    collected = pytest("--collect-only", "tests/test_contracts.py", "tests/test_specs.py")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "TestTokenizerVqgan" in collected.stdout and "elsewhere" not in collected.stdout.lower()

    ran = pytest(
        "tests/test_lpips.py::test_conversion_writes_cache_that_later_loads_alone",
        "tests/test_lpips.py::test_default_cache_is_the_sessions_own",
        "tests/test_lpips.py::test_loading_for_one_cache_dir_still_converts_into_another",
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    if HAVE_WEIGHTS:  # without the lpips packages these three skip, as in test_lpips.py
        assert "3 passed" in ran.stdout, ran.stdout[-3000:]
    # The user's home is neither read into the run nor written by it.
    assert {p: p.read_bytes() for p in stale} == stale
    assert sorted(p for p in home.rglob("*") if p.is_file()) == sorted(stale)
