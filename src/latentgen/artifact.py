"""Component artifacts: one directory per component, written and read by this module alone.

A component directory (a trained tokenizer, each part of a saved pipeline) holds::

    component.json        format + version, kind, type, config, providing plugin + version,
                          and the sha256 of each file
    weights.safetensors   the state dict (absent when the component has no tensors); its header
                          records kind, type, config and the config's sha256

``save_component`` writes one atomically; ``load_component`` reads one strictly: every file
must lie inside the directory and match its sha256, the config must be the one the weights were
saved with (``n_head`` 4 -> 8 changes no shape but every sample), and every key and shape must
fit. A pipeline directory is ``pipeline.json`` (spec, versions, card) plus one component
directory per component (``tokenizer/``, ``prior/``, ``conditioners/<name>/``);
``find_component`` finds a component in a pipeline directory, a component directory, an older
release's tokenizer directory or a training run's ``final/``. Older formats are read through
``PIPELINE_MIGRATIONS`` (``pipeline.json`` version 1: flat ``X.safetensors`` files) and
``_legacy_tokenizer`` (``tokenizer.json``), never rewritten in place.

A conditioner that holds a cond-stage tokenizer (a segmentation or depth map's own VQGAN) keeps
it as a submodule built from a tokenizer config nested in its own config, so the conditioner's
directory stores that tokenizer's weights under ``tokenizer.*`` keys like any other state. To
start it from a trained tokenizer, the command resolves the path with ``find_component(path,
"tokenizer")`` (as ``train prior`` does for ``tokenizer_path``), puts ``ref.config`` into the
conditioner's config and loads the weights with ``load_weights(ref, conditioner.tokenizer)``:
never inside a pydantic validator, so reading a config never touches the disk.

Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from latentgen.errors import CheckpointError, UnknownComponentError
from latentgen.files import (
    atomic_directory,
    atomic_write_json,
    load_tensors_with_metadata,
    read_json,
    save_tensors,
    sha256_file,
)

if TYPE_CHECKING:
    from latentgen.specs import ComponentConfig

__all__ = [
    "COMPONENT_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "PIPELINE_FILE",
    "PIPELINE_FORMAT",
    "PIPELINE_FORMAT_VERSION",
    "PIPELINE_MIGRATIONS",
    "WEIGHTS_FILE",
    "ComponentRef",
    "check_state_dict",
    "config_digest",
    "find_component",
    "load_component",
    "load_module",
    "load_weights",
    "read_component",
    "read_pipeline_manifest",
    "save_component",
    "state_dict_problems",
    "write_component",
]

COMPONENT_FILE = "component.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "latentgen.component"
FORMAT_VERSION = 1
PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "latentgen.pipeline"
PIPELINE_FORMAT_VERSION = 2
# One header key holding a JSON record: safetensors 0.8 writes several metadata keys in hash
# order, which would make two saves of the same component differ byte for byte.
_RECORD_KEY = "latentgen.component"
_LEGACY_TOKENIZER_FILE = "tokenizer.json"  # latentgen 0.1.0's trained-tokenizer directory
_HASH_HINT = (
    "If you assembled this directory by hand, record each file's hash (`sha256sum FILE`) in "
    "its manifest; better, save the component with latentgen.artifact.save_component."
)


_CONFIG_HINT = (
    "A change that fits every shape can still change every output: restore the saved values, "
    "or train weights for the new config."
)


# -- key and shape differences (the one diff every loader and converter uses) ---------------------
def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def state_dict_problems(
    expected: Mapping[str, Any],
    got: Mapping[str, Any],
    source: str = "file",
    limit: int | None = 8,
) -> list[str]:
    """One line per kind of difference between two state dicts (empty: keys and shapes agree).

    Values are tensors, or anything with a ``shape``; ``source`` names where ``got`` came from
    in the shape lines (``"file"``, ``"checkpoint"``); ``limit`` caps the keys listed per line.
    """
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: {source} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    lines = []
    for label, items in (
        ("missing key(s)", missing),
        ("unexpected key(s)", unexpected),
        ("shape mismatch(es)", shapes),
    ):
        if items:
            listed = _head(items, limit) if limit else ", ".join(items)
            lines.append(f"{len(items)} {label}: {listed}")
    return lines


def check_state_dict(
    expected: Mapping[str, Any], got: Mapping[str, Any], what: str, hint: str = ""
) -> None:
    """Raise one ``CheckpointError`` listing every key and shape difference at once."""
    problems = state_dict_problems(expected, got)
    if problems:
        raise CheckpointError(
            f"{what} does not match its spec: "
            + "; ".join(problems)
            + "."
            + (f" {hint}" if hint else "")
        )


def load_module(
    module: nn.Module, tensors: Mapping[str, Tensor], what: str, hint: str = ""
) -> None:
    """Strictly load ``tensors`` into ``module`` after checking every key and shape at once."""
    check_state_dict(module.state_dict(), tensors, what, hint)
    with torch.no_grad():
        module.load_state_dict(dict(tensors), strict=True)


# -- configs ------------------------------------------------------------------------------------
def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def config_digest(config: ComponentConfig | Mapping[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys, no spaces)."""
    data = config if isinstance(config, Mapping) else config.model_dump(mode="json")
    return hashlib.sha256(_canonical(data).encode()).hexdigest()


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``field: saved -> now`` for every leaf that differs between two JSON values."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved:
                out.append(f"{name}: (absent) -> {current[key]!r}")
            elif key not in current:
                out.append(f"{name}: {saved[key]!r} -> (absent)")
            else:
                out.extend(_differences(saved[key], current[key], name))
        return out
    return [] if saved == current else [f"{prefix or 'config'}: {saved!r} -> {current!r}"]


def _config_differences(saved: Mapping[str, Any], current: ComponentConfig) -> list[str]:
    """Fields where ``current`` differs from ``saved``, after both pass the current config class.

    Validating the saved JSON again fills fields a later release added with their defaults, so
    a field that did not exist when the weights were saved is not a difference.
    """
    now = current.model_dump(mode="json")
    if _canonical(saved) == _canonical(now):
        return []
    from pydantic import ValidationError

    try:
        saved = type(current).model_validate(dict(saved)).model_dump(mode="json")
    except ValidationError:
        saved = dict(saved)  # no longer a valid config: compare it as written
    return _differences(saved, now)


# -- the manifest ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentRef:
    """A component on disk: its directory and its (validated) manifest.

    ``where`` names the manifest in messages; ``legacy`` marks a manifest upgraded from an
    older release's format, whose weights carry no config record.
    """

    root: Path
    manifest: dict[str, Any]
    where: str
    legacy: bool = False

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def type(self) -> str:
        return str(self.manifest["type"])

    @property
    def config(self) -> dict[str, Any]:
        """The component's config as JSON (pass it to ``registry.build(kind, ...)``)."""
        return dict(self.manifest["config"])


def _check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """Every field ``load_component`` reads, with the right JSON type, or a ``CheckpointError``."""
    if not isinstance(manifest, Mapping):
        raise CheckpointError(
            f"{where} must be a JSON object, got {type(manifest).__name__}; the file is damaged."
        )
    for key, types, desc in (
        ("kind", str, "a string"),
        ("type", str, "a string"),
        ("config", Mapping, "a mapping"),
        ("files", Mapping, "a mapping of file name to sha256"),
    ):
        if not isinstance(manifest.get(key), types):
            got = type(manifest.get(key)).__name__ if key in manifest else "missing"
            raise CheckpointError(
                f"{where}: '{key}' must be {desc}, got {got}; the file was edited by hand or is "
                "damaged. Save the component again."
            )
    for name, digest in manifest["files"].items():
        if not isinstance(digest, str) or not digest:
            raise CheckpointError(
                f"{where}: file '{name}' has no sha256 (got {digest!r}); latentgen loads only "
                f"files whose hash is recorded. {_HASH_HINT}"
            )
    by = manifest.get("provided_by")
    if by is not None and not isinstance(by, Mapping):
        raise CheckpointError(f"{where}: 'provided_by' must be a mapping, got {type(by).__name__}.")
    return dict(manifest)


def _inside(root: Path, name: Any, where: str, entry: str) -> Path:
    """``root / name``, refused unless it is a relative path that resolves inside ``root``."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"{where}: {entry} must be a file name (a string), got {type(name).__name__} "
            f"{name!r}; the file was edited by hand or is damaged."
        )
    path = root / name
    base = root.resolve()
    resolved = path.resolve()
    if Path(name).is_absolute() or not resolved.is_relative_to(base):
        raise CheckpointError(
            f"{where}: {entry} points outside its directory ({name!r} resolves to {resolved}, "
            f"not inside {base}); latentgen reads only files inside the directory it loads. "
            "Put the file inside the directory and name it relative to it."
        )
    return path


def write_component(module: nn.Module, kind: str, directory: Path) -> dict[str, Any]:
    """Write ``module``'s component files into ``directory`` (created); returns the manifest.

    Not atomic by itself: ``save_component`` and ``Pipeline.save_pretrained`` call it inside
    an ``atomic_directory``.
    """
    from latentgen import registry
    from latentgen.version import __version__

    config: ComponentConfig = getattr(module, "config")  # noqa: B009 -- typed for mypy
    try:
        info = registry.get(kind, config.type)
        provided_by: dict[str, str] | None = {"plugin": info.plugin, "version": info.version}
    except UnknownComponentError:
        # A class used from Python without a plugin: saved all the same, and loading it back
        # needs the type registered (load_component says so).
        provided_by = None
    data = config.model_dump(mode="json")
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    state = module.state_dict()
    if state:
        record = {
            "kind": kind,
            "type": config.type,
            "config": data,
            "config_sha256": config_digest(data),
        }
        save_tensors(directory / WEIGHTS_FILE, state, {_RECORD_KEY: _canonical(record)})
        files[WEIGHTS_FILE] = sha256_file(directory / WEIGHTS_FILE)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "latentgen_version": __version__,
        "kind": kind,
        "type": config.type,
        "config": data,
        "provided_by": provided_by,
        "files": files,
    }
    atomic_write_json(directory / COMPONENT_FILE, manifest)
    return manifest


def save_component(module: nn.Module, kind: str, path: str | os.PathLike[str]) -> Path:
    """Write ``module`` as a component directory at ``path``, atomically (replacing it)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_component(module, kind, tmp)
    return path


def _read_versioned(
    file: Path,
    fmt: str,
    version: int,
    save_hint: str,
    migrations: Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """A JSON manifest of format ``fmt``, upgraded through ``migrations`` to ``version``."""
    from latentgen.version import __version__

    if not file.is_file():
        raise CheckpointError(
            f"{file.parent} is not a latentgen {fmt.split('.')[-1]} directory: {file.name} is "
            f"missing. {save_hint}"
        )
    meta = read_json(file, f"{fmt.split('.')[-1]} file")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{file} is not a {fmt} file (format {got!r}, expected {fmt!r}).")
    found = meta.get("format_version")
    while isinstance(found, int) and found < version and found in (migrations or {}):
        try:
            meta = (migrations or {})[found](meta)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
        found = meta["format_version"]
    if found != version:
        raise CheckpointError(
            f"{file} has format_version {found!r}; this latentgen {__version__} reads version "
            f"{version}. Upgrade latentgen (pip install -U latentgen) to load it."
        )
    return meta


def read_component(path: str | os.PathLike[str]) -> ComponentRef:
    """The manifest of the component directory ``path`` (``component.json``), checked."""
    file = Path(path) / COMPONENT_FILE
    meta = _read_versioned(
        file,
        FORMAT,
        FORMAT_VERSION,
        "Save one with latentgen.artifact.save_component (or Pipeline.save_pretrained).",
    )
    return ComponentRef(Path(path), _check_manifest(meta, str(file)), str(file))


# -- pipeline directories -------------------------------------------------------------------------
def _pipeline_v1_to_v2(meta: dict[str, Any]) -> dict[str, Any]:
    """0.1.0's flat layout (``X.safetensors`` beside pipeline.json) -> inline component refs.

    Each component keeps its files where they are; its manifest moves into the entry, and its
    config comes from the spec (0.1.0 recorded configs nowhere else).
    """
    components = meta.get("components")
    if not isinstance(components, Mapping):
        raise CheckpointError(
            "'components' must be a mapping of component name to entry, got "
            f"{type(components).__name__}; the file is damaged. Save the pipeline again."
        )
    spec: Mapping[str, Any] = meta["spec"] if isinstance(meta.get("spec"), Mapping) else {}
    conds: Mapping[str, Any] = spec.get("conditioners") or {}
    if not isinstance(conds, Mapping):
        conds = {}
    out: dict[str, Any] = {}
    for name, entry in components.items():
        if not isinstance(entry, Mapping):
            raise CheckpointError(
                f"component '{name}' must be a mapping, got {type(entry).__name__}; the file "
                "is damaged. Save the pipeline again."
            )
        file = entry.get("file")
        if file is not None and not isinstance(file, str):
            raise CheckpointError(
                f"component '{name}': 'file' must be a file name (a string) or null, got "
                f"{type(file).__name__} {file!r}; the file is damaged."
            )
        short = name.split(".", 1)[-1]
        config = conds.get(short) if name.startswith("conditioners.") else spec.get(name)
        out[name] = {
            "path": ".",
            "manifest": {
                "kind": entry.get("kind"),
                "type": entry.get("type"),
                "config": config if isinstance(config, Mapping) else {"type": entry.get("type")},
                "provided_by": entry.get("provided_by"),
                "files": {} if file is None else {file: entry.get("sha256")},
            },
        }
    return {**meta, "format_version": 2, "components": out}


#: ``format_version`` -> a function upgrading ``pipeline.json``'s dict to the next version.
PIPELINE_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _pipeline_v1_to_v2,
}


def read_pipeline_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``pipeline.json`` of a saved pipeline directory, upgraded to the current version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory. A saved pipeline is a directory written by "
            "Pipeline.save_pretrained (pipeline.json + one directory per component)."
        )
    file = path / PIPELINE_FILE
    meta = _read_versioned(
        file,
        PIPELINE_FORMAT,
        PIPELINE_FORMAT_VERSION,
        "Save one with Pipeline.save_pretrained(path).",
        PIPELINE_MIGRATIONS,
    )
    components = meta.get("components")
    if not isinstance(components, Mapping):
        raise CheckpointError(
            f"{file}: 'components' must be a mapping of component name to entry, got "
            f"{type(components).__name__}; the file is damaged. Save the pipeline again."
        )
    for name, entry in components.items():
        if not isinstance(entry, Mapping):
            raise CheckpointError(
                f"{file}: component '{name}' must be a mapping, got {type(entry).__name__}; "
                "the file is damaged. Save the pipeline again."
            )
    return meta


def pipeline_component(
    path: str | os.PathLike[str], name: str, meta: Mapping[str, Any] | None = None
) -> ComponentRef:
    """The component ``name`` ('tokenizer', 'prior', 'conditioners.label') of a pipeline dir."""
    path = Path(path)
    meta = meta if meta is not None else read_pipeline_manifest(path)
    file = path / PIPELINE_FILE
    entry = meta["components"].get(name)
    if entry is None:
        raise CheckpointError(
            f"{file} lists no entry for component '{name}'; the file was edited by hand or is "
            "damaged. Save the pipeline again."
        )
    root = _inside(path, entry.get("path"), str(file), f"component '{name}' path")
    if "manifest" in entry:  # upgraded from an older format: the manifest is inline
        where = f"{file} (component '{name}')"
        return ComponentRef(root, _check_manifest(entry["manifest"], where), where, legacy=True)
    return read_component(root)


def _legacy_tokenizer(path: Path) -> ComponentRef:
    """0.1.0's trained-tokenizer directory (``tokenizer.json`` + ``tokenizer.safetensors``)."""
    file = path / _LEGACY_TOKENIZER_FILE
    meta = read_json(file, "tokenizer file")
    if not isinstance(meta, Mapping) or meta.get("format") != "latentgen.tokenizer":
        raise CheckpointError(f"{file} is not a latentgen tokenizer file.")
    config = meta.get("config")
    weights = meta.get("file", "tokenizer.safetensors")
    if not isinstance(weights, str):
        raise CheckpointError(
            f"{file}: 'file' must be a file name (a string), got {type(weights).__name__} "
            f"{weights!r}; the file is damaged."
        )
    manifest = {
        "kind": "tokenizer",
        "type": config.get("type") if isinstance(config, Mapping) else None,
        "config": config,
        "provided_by": None,
        "files": {weights: meta.get("sha256")},
    }
    return ComponentRef(path, _check_manifest(manifest, str(file)), str(file), legacy=True)


def find_component(path: str | os.PathLike[str], kind: str) -> ComponentRef:
    """The ``kind`` component at ``path``: a component dir, a pipeline dir (its ``kind``
    component), an older release's tokenizer dir, or a training run dir (its ``final/``)."""
    path = Path(path)
    if (path / COMPONENT_FILE).is_file():
        ref = read_component(path)
    elif (path / PIPELINE_FILE).is_file():
        if kind not in ("tokenizer", "prior"):
            raise CheckpointError(
                f"{path} is a pipeline; name the {kind} inside it by its directory, e.g. "
                f"{path / 'conditioners' / 'NAME'}."
            )
        ref = pipeline_component(path, kind)
    elif kind == "tokenizer" and (path / _LEGACY_TOKENIZER_FILE).is_file():
        ref = _legacy_tokenizer(path)
    elif (path / "final").is_dir():
        return find_component(path / "final", kind)
    else:
        raise CheckpointError(
            f"{path} holds no trained {kind}: expected {COMPONENT_FILE}, {PIPELINE_FILE}, or a "
            "run dir with final/. Train one with "
            f"`latentgen train {kind} --config cfg.yaml`."
        )
    if ref.kind != kind:
        raise CheckpointError(f"{ref.where} holds a {ref.kind}, not a {kind}.")
    return ref


# -- loading --------------------------------------------------------------------------------------
def check_registered(ref: ComponentRef, name: str | None = None) -> None:
    """An ``UnknownComponentError`` saying what to install when no plugin provides the type."""
    from latentgen import registry
    from latentgen.version import __version__

    try:
        registry.get(ref.kind, ref.type)
    except UnknownComponentError as e:
        by = ref.manifest.get("provided_by") or {}
        plugin, version = str(by.get("plugin", "?")), str(by.get("version", "?"))
        what = f"{ref.kind} type '{ref.type}'" + (f" (component '{name}')" if name else "")
        if "plugin" not in by:
            raise UnknownComponentError(
                f"{ref.where} needs {what}, which no installed plugin registers (the file does "
                "not say which plugin provided it). Register its class through a latentgen "
                f"plugin hook, or install the package that does. ({e})"
            ) from None
        if plugin == "latentgen":
            raise UnknownComponentError(
                f"{ref.where} needs {what}, which this latentgen {__version__} does not know "
                f"(it was saved by latentgen {version}). If that release is newer, upgrade "
                f"(pip install -U latentgen); otherwise the type was renamed or the file "
                f"edited. ({e})"
            ) from None
        from latentgen.plugins import missing_plugin_hint

        raise UnknownComponentError(
            f"{ref.where} needs {what} from {plugin} {version}, but "
            f"{missing_plugin_hint(plugin, version)}. ({e})"
        ) from None


def load_weights(ref: ComponentRef, module: nn.Module, name: str | None = None) -> None:
    """Load ``ref``'s files into ``module``, strictly (paths, sha256, config record, keys)."""
    label = f"component '{name}'" if name else f"{ref.kind} '{ref.type}'"
    expected = module.state_dict()
    files = ref.manifest["files"]
    if not files:
        if expected:
            raise CheckpointError(
                f"{label} has weights ({len(expected)} tensors) but {ref.where} records no "
                "file for it. Save it again."
            )
        return
    tensors: dict[str, Tensor] = {}
    for fname, digest in files.items():
        fpath = _inside(ref.root, fname, ref.where, f"{label} file")
        if not fpath.is_file():
            raise CheckpointError(
                f"{label}: weights file {fpath} is missing. Copy the whole directory again, or "
                "save it again."
            )
        actual = sha256_file(fpath)
        if actual != digest:
            raise CheckpointError(
                f"{label}: {fpath} has sha256 {actual[:12]}… but {ref.where} records "
                f"{digest[:12]}…; the file was changed or damaged after saving. Copy it again "
                "from its source, or save it again."
            )
        part, metadata = load_tensors_with_metadata(fpath, label)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise CheckpointError(f"{label}: tensors {_head(twice)} appear in two files.")
        tensors.update(part)
        if not ref.legacy:
            _check_config_record(metadata, module, f"{label} ({fpath})")
    load_module(
        module,
        tensors,
        f"{label} ({', '.join(files)}, type '{ref.type}')",
        hint=f"Was it saved with another config? Compare the weights with the config in "
        f"{ref.where}.",
    )


def _check_config_record(metadata: Mapping[str, str], module: nn.Module, what: str) -> None:
    config: ComponentConfig = getattr(module, "config")  # noqa: B009 -- typed for mypy
    try:
        record = json.loads(metadata[_RECORD_KEY])
        saved, digest = record["config"], record["config_sha256"]
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(
            f"{what}: the weights carry no record of the config they were saved with "
            f"('{_RECORD_KEY}' in the safetensors header), so latentgen cannot tell whether "
            "they fit. Save the component again with latentgen.artifact.save_component."
        ) from None
    if digest == config_digest(config):
        return
    diffs = _config_differences(saved, config) if isinstance(saved, Mapping) else ["config"]
    if diffs:
        raise CheckpointError(
            f"{what}: the config differs from the one these weights were saved with ("
            + "; ".join(diffs)
            + f", saved -> now). {_CONFIG_HINT}"
        )


def load_component(
    source: str | os.PathLike[str] | ComponentRef,
    kind: str | None = None,
    config: ComponentConfig | Mapping[str, Any] | None = None,
    name: str | None = None,
    config_source: str = "the config given",
) -> Any:
    """Build and strictly load a component: ``load_component("runs/vqgan", "tokenizer")``.

    ``source`` is anything ``find_component`` finds a ``kind`` component in (without ``kind``:
    a component directory). ``config`` builds the module from the given config instead of the
    saved one, which it must equal (the pipeline passes its spec's, so an edited spec is
    caught); ``config_source`` names it in that error.
    """
    from latentgen import registry

    if isinstance(source, ComponentRef):
        ref = source
    else:
        ref = find_component(source, kind) if kind else read_component(source)
    if kind is not None and ref.kind != kind:
        raise CheckpointError(f"{ref.where} holds a {ref.kind}, not a {kind}.")
    check_registered(ref, name)
    module = registry.build(ref.kind, ref.config if config is None else config)
    if config is not None and not ref.legacy:
        diffs = _config_differences(ref.config, module.config)
        if diffs:
            what = f"component '{name}'" if name else f"this {ref.kind}"
            raise CheckpointError(
                f"{ref.where}: {what} was saved with another config than {config_source} ("
                + "; ".join(diffs)
                + f", saved -> given). {_CONFIG_HINT}"
            )
    load_weights(ref, module, name)
    return module
