"""Training checkpoints: ``runs/NAME/checkpoints/step-N/``, written atomically, no pickle.

One checkpoint directory holds::

    trainer.json                  step, data position, config, spec + hash, file hashes
    model.<name>.safetensors      weights of each trained module
    ema.<name>.safetensors        their moving averages (when EMA is on)
    optimizer.<name>.safetensors  optimizer state tensors (moments, step counts)
    optimizer.<name>.json         the rest of the optimizer state dict, tensors as references
    scheduler.<name>.json         learning-rate schedule state
    rng.safetensors / rng.json    torch, CUDA, numpy and ``random`` states of every rank, and
                                  the data-order generator

Nested state dicts (``torch.optim`` keys its state by integer, keeps ``betas`` as a tuple) are
split by ``flatten_state`` into JSON plus a flat ``{name: tensor}`` map, and put back together
exactly by ``unflatten_state``; nothing goes through ``torch.save``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentgen.checkpoint import (
    atomic_directory,
    atomic_write_json,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
)
from latentgen.errors import CheckpointError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TRAINER_FILE",
    "capture_rng",
    "checkpoint_dir",
    "flatten_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_state",
    "prune_checkpoints",
    "read_trainer_json",
    "restore_rng",
    "save_state",
    "spec_hash",
    "unflatten_state",
    "verify_files",
    "write_checkpoint",
]

TRAINER_FILE = "trainer.json"
FORMAT = "latentgen.trainer_checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- nested state <-> JSON + tensors ---------------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (dicts, lists, tuples, scalars, tensors) into JSON and tensors.

    Tensors become ``{"__tensor__": key}`` with ``key`` their dotted path; tuples and dicts with
    non-string keys are tagged so ``unflatten_state`` rebuilds the same Python types.
    """
    tensors: dict[str, Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, bool | int | float | str) or x is None:
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in x):
                return {"__int_keys__": {str(k): enc(v, f"{path}.{k}") for k, v in x.items()}}
        raise CheckpointError(
            f"cannot store {type(x).__name__} at '{path}' in a checkpoint: only tensors, numbers, "
            "strings, None, lists, tuples and dicts with str/int keys are supported."
        )

    return enc(obj, prefix.rstrip(".") or "state"), tensors


def unflatten_state(data: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of ``flatten_state``."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                key = x["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint tensor '{key}' is missing; it is damaged.")
                return tensors[key]
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__int_keys__" in x:
                return {int(k): dec(v) for k, v in x["__int_keys__"].items()}
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(data)


def save_state(directory: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``name.json`` + ``name.safetensors`` (only if it holds tensors)."""
    data, tensors = flatten_state(state)
    if tensors:
        save_tensors(directory / f"{name}.safetensors", tensors)
    (directory / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


def load_state(directory: Path, name: str) -> Any:
    """Read back what ``save_state`` wrote."""
    data = read_json(directory / f"{name}.json", what=f"checkpoint file {name}.json")
    path = directory / f"{name}.safetensors"
    tensors = load_tensors(path, what=f"checkpoint {directory}") if path.exists() else {}
    return unflatten_state(data, tensors)


# -- random number generators ----------------------------------------------------------------------
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states as JSON-able data (torch states as lists of bytes)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": None,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Set this process's RNGs from ``capture_rng`` output."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _rng_to_files(ranks: list[dict[str, Any]]) -> tuple[Any, dict[str, Tensor]]:
    # The byte states go to safetensors as uint8 tensors; the rest stays JSON.
    data, tensors = [], {}
    for r, st in enumerate(ranks):
        entry = {k: v for k, v in st.items() if k not in ("torch", "cuda")}
        for key in ("torch", "cuda"):
            if st.get(key) is not None:
                tensors[f"rank{r}.{key}"] = torch.tensor(st[key], dtype=torch.uint8)
                entry[key] = {"__tensor__": f"rank{r}.{key}"}
            else:
                entry[key] = None
        data.append(entry)
    return data, tensors


def _rng_from_files(data: list[dict[str, Any]], tensors: Mapping[str, Tensor]) -> list[dict]:
    out = []
    for entry in data:
        st = dict(entry)
        for key in ("torch", "cuda"):
            ref = entry.get(key)
            st[key] = None if ref is None else tensors[ref["__tensor__"]].tolist()
        out.append(st)
    return out


# -- hashing and comparing specs -------------------------------------------------------------------
def spec_hash(spec: Any) -> str:
    """sha256 of the canonical JSON of ``spec`` (sorted keys, no spaces)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def describe_differences(old: Any, new: Any, limit: int = 6) -> str:
    """``key: old -> new`` for the first differing leaves of two nested mappings."""
    a, b = _flat(old), _flat(new)
    diffs = [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "(absent)") != b.get(k, "(absent)")
    ]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


# -- the run's checkpoint folder -------------------------------------------------------------------
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step-N``."""
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with a ``trainer.json``) of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / TRAINER_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns what was deleted."""
    found = list_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def write_checkpoint(
    path: Path,
    *,
    meta: Mapping[str, Any],
    modules: Mapping[str, Mapping[str, Tensor]],
    ema: Mapping[str, Mapping[str, Tensor]],
    optimizers: Mapping[str, Any],
    schedulers: Mapping[str, Any],
    rng: list[dict[str, Any]],
    sampler_state: Tensor,
) -> Path:
    """Write one checkpoint directory atomically: all of it appears, or none of it.

    ``meta`` goes to ``trainer.json`` together with the sha256 of every other file, which is
    written last, so a directory with a ``trainer.json`` is complete.
    """
    with atomic_directory(path) as tmp:
        for name, sd in modules.items():
            save_tensors(tmp / f"model.{name}.safetensors", sd)
        for name, sd in ema.items():
            save_tensors(tmp / f"ema.{name}.safetensors", sd)
        for name, st in optimizers.items():
            save_state(tmp, f"optimizer.{name}", st)
        for name, st in schedulers.items():
            save_state(tmp, f"scheduler.{name}", st)
        data, tensors = _rng_to_files(rng)
        tensors["sampler"] = sampler_state
        save_tensors(tmp / "rng.safetensors", tensors)
        (tmp / "rng.json").write_text(json.dumps({"ranks": data}) + "\n")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(
            tmp / TRAINER_FILE,
            {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files},
        )
    return path


def read_trainer_json(path: Path) -> dict[str, Any]:
    """``trainer.json`` of a checkpoint, checked for format and version."""
    meta = read_json(path / TRAINER_FILE, what="checkpoint metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / TRAINER_FILE} is not a latentgen training checkpoint (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {meta.get('format_version')!r}; this "
            f"latentgen reads version {FORMAT_VERSION}. Resume it with the latentgen that wrote it."
        )
    return meta


def verify_files(path: Path, meta: Mapping[str, Any]) -> None:
    """Check each file's sha256 against ``trainer.json``; name the damaged ones."""
    bad = []
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(f) != digest:
            bad.append(f"{name} (sha256 differs)")
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {', '.join(bad)}. Resume from an earlier checkpoint "
            "(delete this step dir) or restore the files."
        )


def read_rng(path: Path) -> tuple[list[dict[str, Any]], Tensor]:
    """Per-rank RNG states and the data-order generator state of a checkpoint."""
    data = read_json(path / "rng.json", what="checkpoint RNG state")
    tensors = load_tensors(path / "rng.safetensors", what=f"checkpoint {path}")
    if "sampler" not in tensors:
        raise CheckpointError(f"{path}/rng.safetensors has no 'sampler' state; it is damaged.")
    return _rng_from_files(data["ranks"], tensors), tensors["sampler"]
