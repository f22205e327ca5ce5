"""`latentgen new-plugin` writes a package that builds, passes its own tests, and says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from latentgen.cli import main
from latentgen.errors import InputError
from latentgen.scaffold import new_plugin, plugin_names

ROOT = Path(__file__).resolve().parents[1]


def _env(gen: Path, **extra: str) -> dict[str, str]:
    """The generated src in front of this checkout's path; no pip install anywhere."""
    path = os.pathsep.join(p for p in (str(gen / "src"), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, LATENTGEN_STRICT_PLUGINS="1", **extra)


def _pytest(gen: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=gen,
        env=_env(gen, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return new_plugin("sketch", tmp_path_factory.mktemp("gen") / "latentgen-sketch")


def test_writes_one_component_of_each_kind_with_tests_and_ci(generated):
    init = (generated / "src" / "latentgen_sketch" / "__init__.py").read_text()
    hooks = re.findall(r"def (register_\w+)\(register\):", init)
    from latentgen import hookspecs

    assert sorted(hooks) == sorted(n for n in dir(hookspecs) if n.startswith("register_"))
    pyproject = (generated / "pyproject.toml").read_text()
    assert "[build-system]" in pyproject and 'where = ["src"]' in pyproject
    assert 'sketch = "latentgen_sketch"' in pyproject
    ci = (generated / ".github" / "workflows" / "test.yml").read_text()
    assert 'LATENTGEN_LOAD_PLUGINS="" LATENTGEN_STRICT_PLUGINS=1 PYTHONPATH=src pytest' in ci
    assert not list(generated.rglob("*.tmpl")) and "{{" not in init


def test_generated_package_passes_its_own_tests(generated):
    res = _pytest(generated, LATENTGEN_LOAD_PLUGINS="")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 25, res.stdout[-500:]
    assert "failed" not in res.stdout and "error" not in res.stdout.lower()


def test_generated_package_is_lint_clean(generated):
    ruff = str(Path(sys.executable).parent / "ruff")
    for args in (["check", "."], ["format", "--check", "."]):  # with the package's own config
        res = subprocess.run([ruff, *args], cwd=generated, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_generated_pyproject_builds_a_wheel(generated, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(generated),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PIP_NO_CACHE_DIR="1"),
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("latentgen_sketch-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        eps = zf.read("latentgen_sketch-0.1.0.dist-info/entry_points.txt").decode()
    assert "latentgen_sketch/prior.py" in names
    assert "[latentgen]\nsketch = latentgen_sketch" in eps


def test_installed_copy_beside_the_checkout_gets_a_clear_message(generated, tmp_path):
    # "Install" the package by its metadata only, then run its tests without
    # LATENTGEN_LOAD_PLUGINS="": the installed copy loads, and registering the checkout says why
    # that cannot work and what to set.
    info = tmp_path / "latentgen_sketch-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: latentgen-sketch\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text("[latentgen]\nsketch = latentgen_sketch\n")
    env = _env(generated)
    env.pop("LATENTGEN_LOAD_PLUGINS", None)
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "every_kind"],
        cwd=generated,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0
    assert "a plugin named 'latentgen-sketch' is already registered (latentgen-sketch 0.1.0)" in (
        res.stdout
    )
    assert 'set LATENTGEN_LOAD_PLUGINS="" so the installed copy is not loaded' in res.stdout


@pytest.mark.parametrize(
    "bad", ["", "Sketch", "my plugin", "1st", "a--b", "sketch-", "class", "latentgen-", "a.b"]
)
def test_bad_name_is_refused(bad, tmp_path):
    with pytest.raises(InputError, match="lowercase letters, digits") as err:
        new_plugin(bad, tmp_path / "x")
    assert repr(bad) in str(err.value)
    assert not (tmp_path / "x").exists()


def test_names_follow_the_conventions():
    assert plugin_names("latentgen-pose-net") == plugin_names("pose-net")
    names = plugin_names("pose-net")
    assert (names.name, names.dist, names.module) == (
        "pose-net",
        "latentgen-pose-net",
        "latentgen_pose_net",
    )


def test_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["new-plugin", "sketch", "--dir", str(target)])
    assert res.exit_code == 1
    assert f"{target} already exists; new-plugin does not overwrite anything" in res.output
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp dir left behind


def test_cli_default_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["new-plugin", "latentgen-sketch"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "latentgen-sketch" / "src" / "latentgen_sketch" / "prior.py").is_file()
    assert "wrote latentgen-sketch (module latentgen_sketch, types 'sketch.*')" in res.output
    bad = CliRunner().invoke(main, ["new-plugin", "My Plugin"])
    assert bad.exit_code == 1 and "plugin name 'My Plugin' cannot be used" in bad.output


def test_python_dash_m_latentgen(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "latentgen", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("latentgen, version ")
    res = subprocess.run(
        [sys.executable, "-m", "latentgen", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "Usage: latentgen" in res.stdout and "new-plugin" in res.stdout


def test_docs_show_the_pyproject_new_plugin_writes(tmp_path):
    shown = (ROOT / "docs" / "plugins.md").read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    written = (new_plugin("docs", tmp_path / "latentgen-docs") / "pyproject.toml").read_text()
    assert shown == written
