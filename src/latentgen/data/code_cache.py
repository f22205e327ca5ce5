"""Stage 2's input: a dataset encoded once by a trained tokenizer into a compact on-disk cache.

    cache = build_code_cache(tokenizer, dataset, "runs/prior/code_cache", condition_keys=["label"])
    cache = CodeCache("runs/prior/code_cache", expect_fingerprint=tokenizer_fingerprint(tokenizer))
    cache[0]   # {"codes": LongTensor [h, w], "label": tensor(3)}

A cache directory holds::

    cache.json          tokenizer fingerprint and config, code grid, vocab size, count, files
    codes.npy           [N, h, w] little-endian uint16 (int32 when K > 65536)
    cond.<key>.npy      paired condition data, e.g. labels as int64 [N]

Codes are 2 bytes each (a 256x256 image at f=16 is 512 bytes), so the prior trains from a file
the OS keeps in its page cache instead of re-running the encoder every epoch. Arrays are read
with ``np.load(mmap_mode="r", allow_pickle=False)``; nothing is unpickled. A cache records the
fingerprint of the tokenizer that made it and refuses to serve a run with another tokenizer,
whose codes would mean something else.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from latentgen.errors import CheckpointError, DataError
from latentgen.files import atomic_directory, atomic_write_json, read_json

__all__ = [
    "CACHE_FILE",
    "CodeCache",
    "build_code_cache",
    "open_or_build_code_cache",
    "tokenizer_fingerprint",
]

CACHE_FILE = "cache.json"
FORMAT = "latentgen.code_cache"
FORMAT_VERSION = 1
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_REBUILD_HINT = (
    "Rebuild the cache with `latentgen train prior --config cfg.yaml --rebuild-cache` "
    "(or delete {path} and run again)."
)


def tokenizer_fingerprint(tokenizer: nn.Module) -> str:
    """sha256 of a tokenizer's config JSON and its state dict (what safetensors would store).

    The tensors are hashed one by one in sorted key order (name, dtype, shape, raw bytes), the
    content of a safetensors file without building the whole file in memory.
    """
    h = hashlib.sha256()
    dump = getattr(getattr(tokenizer, "config", None), "model_dump", None)
    data = dump(mode="json") if callable(dump) else {}
    h.update(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    for name, t in sorted(tokenizer.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype!s}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _code_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def _as_numpy(value: Any, key: str) -> np.ndarray[Any, Any]:
    if isinstance(value, Tensor):
        arr = value.detach().cpu().numpy()
    else:
        arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr.astype("<i8")
    if arr.dtype.kind == "f":
        return arr.astype("<f4")
    if arr.dtype.kind == "b":
        return arr.astype(bool)
    raise DataError(
        f"condition '{key}' has values of dtype {arr.dtype}; a code cache stores numbers only "
        "(ints, floats, bools). Convert it in the dataset, or leave it out of condition_keys."
    )


class _CacheWriter:
    """Fills ``codes.npy`` and ``cond.<key>.npy`` in a cache directory, batch by batch.

    The arrays are memory maps written in place as they fill, so a dataset larger than memory
    still fits; each is created when the first batch shows its shape and dtype.
    """

    def __init__(self, root: Path, count: int, vocab_size: int, condition_keys: Sequence[str]):
        self.root, self.count, self.vocab_size = root, count, vocab_size
        self.condition_keys = list(condition_keys)
        self.dtype = _code_dtype(vocab_size)
        self.codes: np.memmap[Any, Any] | None = None
        self.conds: dict[str, np.memmap[Any, Any]] = {}
        self.grid: tuple[int, int] = (0, 0)
        self.image_size: tuple[int, int] = (0, 0)
        self.offset = 0

    def add(self, codes: Tensor, images: Tensor, batch: Mapping[str, Any]) -> None:
        """Store one batch: ``codes [B, h, w]`` of ``images [B, C, H, W]``, and its conditions."""
        b = int(codes.shape[0])
        if self.codes is None:
            self.grid = (int(codes.shape[1]), int(codes.shape[2]))
            self.image_size = (int(images.shape[2]), int(images.shape[3]))
            self.codes = np.lib.format.open_memmap(
                self.root / "codes.npy", mode="w+", dtype=self.dtype, shape=(self.count, *self.grid)
            )
        self.codes[self.offset : self.offset + b] = codes.cpu().numpy().astype(self.dtype)
        for key in self.condition_keys:
            if key not in batch:
                raise DataError(
                    f"dataset items have keys {sorted(batch)}, but the condition key "
                    f"'{key}' was asked for. Map the conditioner to one of those keys."
                )
            value = _as_numpy(batch[key], key)
            if key not in self.conds:
                self.conds[key] = np.lib.format.open_memmap(
                    self.root / f"cond.{key}.npy",
                    mode="w+",
                    dtype=value.dtype,
                    shape=(self.count, *value.shape[1:]),
                )
            self.conds[key][self.offset : self.offset + b] = value
        self.offset += b

    def finish(self) -> dict[str, Any]:
        """Flush and close every array; the ``cache.json`` entries that describe them."""
        assert self.codes is not None and self.offset == self.count
        self.codes.flush()
        self.codes = None
        entries = {}
        for key, arr in self.conds.items():
            arr.flush()
            shape = list(arr.shape[1:])
            entries[key] = {"file": f"cond.{key}.npy", "dtype": arr.dtype.str, "shape": shape}
        self.conds.clear()
        return {
            "vocab_size": self.vocab_size,
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "count": self.count,
            "codes": {"file": "codes.npy", "dtype": self.dtype.str},
            "conditions": entries,
        }


def _check_request(dataset: Dataset[Any], batch_size: int, condition_keys: Sequence[str]) -> int:
    """The dataset's length, after refusing a request that cannot make a cache."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    for key in condition_keys:
        if not _KEY.match(key) or key == "codes":
            raise DataError(
                f"condition key {key!r} cannot name a cache file: use letters, digits and "
                "`_.-`, and not 'codes'."
            )
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("cannot build a code cache from an empty dataset.")
    return n


def _encode(tokenizer: Any, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(images [B, C, H, W], codes [B, h, w])`` of one batch, codes checked against K."""
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise DataError(
            f"dataset items must be dicts with an 'image'; got "
            f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}."
        )
    images = batch["image"].to(device)
    codes = tokenizer.encode(images)  # [B, h, w]
    if codes.dim() != 3 or codes.shape[0] != images.shape[0]:
        raise DataError(f"tokenizer.encode returned shape {tuple(codes.shape)}.")
    vocab = int(tokenizer.vocab_size)
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"codes in [{lo}, {hi}] fall outside [0, {vocab}).")
    return images, codes


@torch.no_grad()
def build_code_cache(
    tokenizer: Any,
    dataset: Dataset[Any],
    path: str | Path,
    batch_size: int = 64,
    condition_keys: Sequence[str] = (),
    *,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> CodeCache:
    """Encode every ``dataset[i]["image"]`` with ``tokenizer`` into a cache at ``path`` (atomic).

    ``condition_keys`` names the dataset keys stored alongside (``"label"`` ...). The tokenizer
    is run in eval mode and put back in the mode it was in.
    """
    from tqdm.auto import tqdm

    from latentgen import __version__

    path = Path(path)
    n = _check_request(dataset, batch_size, condition_keys)
    if device is None:
        device = next((p.device for p in tokenizer.parameters()), torch.device("cpu"))
    device = torch.device(device)
    fingerprint = tokenizer_fingerprint(tokenizer)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with atomic_directory(path) as tmp:
            writer = _CacheWriter(tmp, n, int(tokenizer.vocab_size), condition_keys)
            with tqdm(total=n, desc="encoding", unit="img", disable=not progress) as bar:
                for batch in loader:
                    images, codes = _encode(tokenizer, batch, device)
                    writer.add(codes, images, batch)
                    bar.update(int(codes.shape[0]))
            config = getattr(tokenizer, "config", None)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "latentgen_version": __version__,
                "fingerprint": fingerprint,
                "tokenizer": config.model_dump(mode="json") if config is not None else None,
                **writer.finish(),
            }
            atomic_write_json(tmp / CACHE_FILE, manifest)
    finally:
        tokenizer.train(was_training)
    return CodeCache(path, expect_fingerprint=fingerprint)


class CodeCache(Dataset[dict[str, Tensor]]):
    """A built code cache as a map-style dataset: ``{"codes": [h, w] long, <key>: tensor}``.

    Args:
        path: the cache directory.
        expect_fingerprint: ``tokenizer_fingerprint`` of the tokenizer the run uses; a cache
            made by another tokenizer raises ``CheckpointError``. None skips the check.
    """

    def __init__(self, path: str | Path, expect_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        if not (self.path / CACHE_FILE).is_file():
            raise CheckpointError(
                f"{self.path} is not a code cache ({CACHE_FILE} is missing). "
                + _REBUILD_HINT.format(path=self.path)
            )
        meta = read_json(self.path / CACHE_FILE, what="code cache metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path / CACHE_FILE} is not a latentgen code cache file.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"code cache {self.path} has format_version {meta.get('format_version')!r}; "
                f"this latentgen reads {FORMAT_VERSION}. " + _REBUILD_HINT.format(path=self.path)
            )
        self.meta: dict[str, Any] = meta
        if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
            raise CheckpointError(
                f"code cache {self.path} was made by tokenizer {meta.get('fingerprint')} but this "
                f"run's tokenizer is {expect_fingerprint}: its codes would mean something else. "
                + _REBUILD_HINT.format(path=self.path)
            )
        self.count = int(meta["count"])
        self.grid = (int(meta["grid"][0]), int(meta["grid"][1]))
        self.vocab_size = int(meta["vocab_size"])
        self.fingerprint = str(meta["fingerprint"])
        self._arrays: dict[str, np.ndarray[Any, Any]] | None = None
        self._open()  # fail now, in the caller's process, if a file is missing or damaged

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys of every item: ``codes`` and the stored conditions."""
        return ("codes", *self.meta.get("conditions", {}))

    def _load(self, fname: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        f = self.path / fname
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"code cache file {f} cannot be read ({e}). " + _REBUILD_HINT.format(path=self.path)
            ) from None
        if arr.dtype.str != dtype or tuple(arr.shape) != shape:
            raise CheckpointError(
                f"code cache file {f} holds {arr.dtype.str} {tuple(arr.shape)}, but {CACHE_FILE} "
                f"says {dtype} {shape}; the cache is damaged. "
                + _REBUILD_HINT.format(path=self.path)
            )
        return arr

    def _open(self) -> dict[str, np.ndarray[Any, Any]]:
        if self._arrays is None:
            codes = self.meta["codes"]
            arrays = {"codes": self._load(codes["file"], codes["dtype"], (self.count, *self.grid))}
            for key, entry in self.meta.get("conditions", {}).items():
                shape = (self.count, *entry["shape"])
                arrays[key] = self._load(entry["file"], entry["dtype"], shape)
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes reopen the memory maps themselves instead of receiving copies.
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for a code cache of {self.count}")
        arrays = self._open()
        out = {"codes": torch.from_numpy(arrays["codes"][index].astype(np.int64))}  # [h, w]
        for key, arr in arrays.items():
            if key != "codes":
                out[key] = torch.from_numpy(np.array(arr[index]))  # copy out of the read-only map
        return out


def open_or_build_code_cache(
    tokenizer: Any,
    dataset: Dataset[Any],
    path: str | Path,
    batch_size: int = 64,
    condition_keys: Sequence[str] = (),
    *,
    rebuild: bool = False,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> CodeCache:
    """Open the cache at ``path`` if this tokenizer made it with these keys; build it if absent.

    A cache made by another tokenizer is an error unless ``rebuild`` (it is never silently
    replaced: the old codes may be what another run needs).
    """
    path = Path(path)
    if (path / CACHE_FILE).is_file() and not rebuild:
        cache = CodeCache(path, expect_fingerprint=tokenizer_fingerprint(tokenizer))
        missing = [k for k in condition_keys if k not in cache.keys]
        if missing:
            raise CheckpointError(
                f"code cache {path} stores {list(cache.keys)} but the run needs {missing} too. "
                + _REBUILD_HINT.format(path=path)
            )
        return cache
    return build_code_cache(
        tokenizer,
        dataset,
        path,
        batch_size,
        condition_keys,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
