"""Files on disk: atomic directory and file writes, JSON, sha256, safetensors.

Nothing here unpickles: weights are safetensors, everything else is JSON. A failed save leaves
the previous directory (if any) untouched and no partial directory behind. Every file is
created with the process umask (0644 under the usual 022), weights included. What a component
directory holds, and how it is checked on load, is ``latentgen.artifact``.
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

from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from latentgen.errors import CheckpointError

__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_tensors",
    "load_tensors_with_metadata",
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
    """Save tensors as safetensors, atomically, with the permissions of any other file.

    Tensors are copied to contiguous CPU memory first, which also unties shared weights (tied
    embeddings): safetensors refuses tensors that share storage, and loading a state dict
    assigns both names anyway. The bytes go through ``atomic_write_bytes`` rather than
    ``safetensors.torch.save_file``, which creates its file with mode 0600 whatever the umask.
    """
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=dict(metadata) if metadata else None))


def load_tensors(path: str | os.PathLike[str], what: str | None = None) -> dict[str, Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is a ``CheckpointError``."""
    return load_tensors_with_metadata(path, what)[0]


def load_tensors_with_metadata(
    path: str | os.PathLike[str], what: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, header metadata)`` of a safetensors file, with the errors of ``load_tensors``."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: weights file {path} is missing.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{what}: {path} is not a readable safetensors file ({e}). It is truncated or "
            "corrupt: save it again, or copy it again from its source."
        ) from None
    return tensors, metadata
