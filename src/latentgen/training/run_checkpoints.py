"""Run checkpoints: a training run's resumable state in ``runs/NAME/checkpoints/step-N/``.

Everything ``Trainer.fit(resume=True)`` needs to continue bit for bit, written atomically, no
pickle. Trained components for use outside training (``final/``, pipelines, tokenizers) are
written by the component artifact module (``latentgen.artifact``), not here.

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

A write that is killed leaves its temp directory (``.step-N.tmp-PID-XXXX``) behind;
``clean_stale_temps`` removes those of dead processes when a run starts or resumes. A write
that runs out of disk space raises ``DiskFullError`` naming the file, the previous checkpoint
(intact) and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor

from latentgen.errors import CheckpointError, DiskFullError
from latentgen.files import (
    atomic_directory,
    atomic_write_json,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TRAINER_FILE",
    "capture_rng",
    "checkpoint_dir",
    "clean_stale_temps",
    "disk_full_guard",
    "flatten_state",
    "is_disk_full",
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
# What latentgen.files' atomic writes leave when killed: ".NAME.tmp-PID-HEX" (the new
# content) and ".NAME.old-PID-HEX" (the previous NAME, moved aside for the final rename).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


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


def save_state(directory: Path, name: str, state: Any, files: _FileTracker | None = None) -> None:
    """Write ``state`` as ``name.json`` + ``name.safetensors`` (only if it holds tensors)."""
    files = files or _FileTracker()
    data, tensors = flatten_state(state)
    if tensors:
        with files.writing(f"{name}.safetensors"):
            save_tensors(directory / f"{name}.safetensors", tensors)
    with files.writing(f"{name}.json"):
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


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` other than this one runs on this machine."""
    if pid == os.getpid():
        return False  # this process writes nothing while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True  # cannot tell: keep its files
    return True


def clean_stale_temps(run_dir: str | Path) -> list[Path]:
    """Remove what killed atomic writes of this run left behind; returns the paths removed.

    Looks where the trainer writes (``checkpoints/``, the run dir for ``final/`` and
    ``metrics.jsonl``, ``grids/``). A temp whose process (the pid in its name) is still alive on
    this machine is left alone: it may be another process's write in progress. A ``.NAME.old-*``
    directory whose ``NAME`` is gone is the previous ``NAME`` caught between two renames: it is
    put back instead of deleted.
    """
    run_dir = Path(run_dir)
    removed: list[Path] = []
    for folder in (run_dir / "checkpoints", run_dir, run_dir / "grids"):
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            m = _TEMP.match(child.name)
            if m is None or _pid_alive(int(m.group("pid"))):
                continue
            target = folder / m.group("name")
            if m.group("kind") == "old" and not target.exists():
                os.replace(child, target)
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


# -- full disks ------------------------------------------------------------------------------------
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors reports I/O errors as SafetensorError with Rust's io::Error in the text.
_DISK_FULL_TEXT = (
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "QuotaExceeded",
    "code: 28,",
    "code: 122,",
)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or safetensors' SafetensorError) means the disk is full."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    if isinstance(error, SafetensorError | OSError):
        return any(t in str(error) for t in _DISK_FULL_TEXT)
    return False


class _FileTracker:
    """Remembers which file a writer is on, for the disk-full message."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.used = False  # every write of the block went through writing()

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[None]:
        self.current, self.used = name, True
        yield
        self.current = None


@contextlib.contextmanager
def disk_full_guard(what: str, folder: Path, intact: str, then: str) -> Iterator[_FileTracker]:
    """Turn a disk-full error inside the block into a ``DiskFullError`` that says what to do.

    Args:
        what: what was being written, e.g. "checkpoint step-8".
        folder: where (its file system is the full one).
        intact: what is still good, e.g. "the previous checkpoint .../step-6 is intact".
        then: the command that continues once there is space.
    """
    files = _FileTracker()
    try:
        yield files
    except (OSError, SafetensorError) as e:
        if not is_disk_full(e) or isinstance(e, DiskFullError):
            raise
        err = DiskFullError(
            f"cannot write {what}: the disk is full ({_reason(e)}){_where(files, e)} in {folder}. "
            f"Nothing of it was kept; {intact}. Free space on that disk, then continue with: "
            f"{then}"
        )
        err.errno = errno.ENOSPC
        raise err from e


def _where(files: _FileTracker, e: BaseException) -> str:
    if files.current:
        return f" while writing {files.current}"
    name = getattr(e, "filename", None)
    if name:
        return f" while writing {Path(name).name}"
    # All writes were tracked and none failed: the fsync or rename at the end did.
    return " while syncing it to disk" if files.used else ""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return os.strerror(e.errno)
    return "No space left on device"


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
    resume_command: str = "--resume",
) -> Path:
    """Write one checkpoint directory atomically: all of it appears, or none of it.

    ``meta`` goes to ``trainer.json`` together with the sha256 of every other file, which is
    written last, so a directory with a ``trainer.json`` is complete. A full disk raises
    ``DiskFullError`` naming the file, the previous checkpoint and ``resume_command``.
    """
    previous = latest_checkpoint(path.parent.parent)
    intact = (
        f"the previous checkpoint {previous} is intact"
        if previous is not None
        else "no earlier checkpoint exists, so the run has to start again"
    )
    with (
        disk_full_guard(f"checkpoint {path.name}", path.parent, intact, resume_command) as files,
        atomic_directory(path) as tmp,
    ):
        for name, sd in modules.items():
            with files.writing(f"model.{name}.safetensors"):
                save_tensors(tmp / f"model.{name}.safetensors", sd)
        for name, sd in ema.items():
            with files.writing(f"ema.{name}.safetensors"):
                save_tensors(tmp / f"ema.{name}.safetensors", sd)
        for name, st in {
            **{f"optimizer.{n}": st for n, st in optimizers.items()},
            **{f"scheduler.{n}": st for n, st in schedulers.items()},
        }.items():
            save_state(tmp, name, st, files)
        data, tensors = _rng_to_files(rng)
        tensors["sampler"] = sampler_state
        with files.writing("rng.safetensors"):
            save_tensors(tmp / "rng.safetensors", tensors)
        with files.writing("rng.json"):
            (tmp / "rng.json").write_text(json.dumps({"ranks": data}) + "\n")
        files_sha = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        with files.writing(TRAINER_FILE):
            atomic_write_json(
                tmp / TRAINER_FILE,
                {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files_sha},
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
