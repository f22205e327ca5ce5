"""Files on disk: atomic directory and file writes, safetensors with strict key/shape checks.

Nothing here unpickles: weights are safetensors, everything else is JSON. A failed save leaves
the previous directory (if any) untouched and no partial directory behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latentgen.errors import CheckpointError

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_state_dict",
    "load_module",
    "load_tensors",
    "read_json",
    "save_tensors",
    "sha256_file",
]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; on success it replaces ``target``.

    The temp directory is fsynced and renamed into place; an existing ``target`` is moved aside
    first and deleted only after the rename. On any exception the temp directory is removed and
    ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tag}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into a ``CheckpointError``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{what} {path} is not valid JSON ({e}); the file is damaged."
        ) from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors as safetensors.

    Tensors are copied to contiguous CPU memory first, which also unties shared weights (tied
    embeddings): safetensors refuses tensors that share storage, and loading a state dict
    assigns both names anyway.
    """
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike[str], what: str | None = None) -> dict[str, Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a ``CheckpointError``."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: weights file {path} is missing.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{what}: {path} is not a readable safetensors file ({e}). It is truncated or "
            "corrupt: save it again, or copy it again from its source."
        ) from None


def check_state_dict(
    expected: Mapping[str, Tensor], got: Mapping[str, Tensor], what: str, hint: str = ""
) -> None:
    """Compare keys and shapes; raise one ``CheckpointError`` listing every difference."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def head(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = [f"missing {len(missing)} key(s)" + (f" ({head(missing)})" if missing else "")]
    parts.append(f"unexpected {len(unexpected)}" + (f" ({head(unexpected)})" if unexpected else ""))
    if shapes:
        parts.append(f"shape mismatch {head(shapes)}")
    msg = f"{what} does not match its spec: " + "; ".join(parts) + "."
    if hint:
        msg += " " + hint
    raise CheckpointError(msg)


def load_module(
    module: nn.Module, tensors: Mapping[str, Tensor], what: str, hint: str = ""
) -> None:
    """Strictly load ``tensors`` into ``module`` after checking every key and shape at once."""
    check_state_dict(module.state_dict(), tensors, what, hint)
    with torch.no_grad():
        module.load_state_dict(dict(tensors), strict=True)
