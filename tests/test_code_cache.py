"""Stage-2 code cache: round trip, compact mmap'd storage, and refusal of a stale cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from latentgen.data.code_cache import (
    CodeCache,
    build_code_cache,
    open_or_build_code_cache,
    tokenizer_fingerprint,
)
from latentgen.errors import CheckpointError, DataError
from test_training import ImageData, TinyAE, TinyAEConfig


def tiny_tokenizer(seed: int = 0, **cfg) -> TinyAE:
    torch.manual_seed(seed)
    return TinyAE(TinyAEConfig(dropout=0.0, **cfg))


def test_round_trip_matches_encoding_item_by_item(tmp_path: Path) -> None:
    tok, data = tiny_tokenizer(), ImageData(n=10)
    tok.train()
    cache = build_code_cache(tok, data, tmp_path / "cache", batch_size=4, condition_keys=["label"])
    assert tok.training  # mode restored
    assert len(cache) == 10 and cache.grid == (4, 4) and cache.vocab_size == 16
    tok.eval()
    with torch.no_grad():
        want = tok.encode(data.images)  # [10, 4, 4]
    for i in range(10):
        item = cache[i]
        assert item["codes"].dtype == torch.long and torch.equal(item["codes"], want[i])
        assert item["label"].dtype == torch.int64 and int(item["label"]) == int(data.labels[i])
    assert cache.keys == ("codes", "label")
    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=3)))
    assert batch["codes"].shape == (3, 4, 4) and batch["label"].shape == (3,)


def test_storage_is_compact_little_endian_and_memory_mapped(tmp_path: Path) -> None:
    build_code_cache(tiny_tokenizer(), ImageData(n=6), tmp_path / "c", 4, ["label"])
    codes = np.load(tmp_path / "c" / "codes.npy", mmap_mode="r", allow_pickle=False)
    assert isinstance(codes, np.memmap) and codes.dtype == np.dtype("<u2")
    assert codes.shape == (6, 4, 4)
    labels = np.load(tmp_path / "c" / "cond.label.npy", mmap_mode="r", allow_pickle=False)
    assert labels.dtype == np.dtype("<i8")
    meta = json.loads((tmp_path / "c" / "cache.json").read_text())
    assert meta["count"] == 6 and meta["grid"] == [4, 4] and meta["codes"]["dtype"] == "<u2"
    assert meta["fingerprint"] == tokenizer_fingerprint(tiny_tokenizer())
    # 2 bytes per code plus the .npy header: nothing else in the file.
    assert (tmp_path / "c" / "codes.npy").stat().st_size - codes.offset == 6 * 16 * 2


class BigVocab(torch.nn.Module):
    """A fake tokenizer with more codes than uint16 holds."""

    vocab_size = 70_000

    def encode(self, images: Tensor) -> Tensor:
        return torch.full((images.shape[0], 2, 2), 69_999)


def test_large_vocabularies_use_int32(tmp_path: Path) -> None:
    cache = build_code_cache(BigVocab(), ImageData(n=3), tmp_path / "c", 2)
    assert np.load(tmp_path / "c" / "codes.npy", mmap_mode="r").dtype == np.dtype("<i4")
    assert int(cache[2]["codes"].max()) == 69_999


def test_cache_of_another_tokenizer_is_refused_with_the_fix(tmp_path: Path) -> None:
    old = tiny_tokenizer(seed=0)
    build_code_cache(old, ImageData(n=4), tmp_path / "c", 2, ["label"])
    new = tiny_tokenizer(seed=1)
    have, want = tokenizer_fingerprint(old), tokenizer_fingerprint(new)
    assert have != want
    with pytest.raises(CheckpointError) as err:
        CodeCache(tmp_path / "c", expect_fingerprint=want)
    msg = str(err.value)
    assert (
        have in msg and want in msg and "latentgen train prior" in msg and "--rebuild-cache" in msg
    )
    with pytest.raises(CheckpointError, match=have):
        open_or_build_code_cache(new, ImageData(n=4), tmp_path / "c", 2, ["label"])
    rebuilt = open_or_build_code_cache(
        new, ImageData(n=4), tmp_path / "c", 2, ["label"], rebuild=True
    )
    assert rebuilt.fingerprint == want
    assert (
        open_or_build_code_cache(new, ImageData(n=4), tmp_path / "c", 2, ["label"]).fingerprint
        == want
    )


def test_fingerprint_tracks_weights_and_config_only() -> None:
    a, b = tiny_tokenizer(seed=0), tiny_tokenizer(seed=0)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    with torch.no_grad():
        b.codebook.weight[0, 0] += 1e-3
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    c = tiny_tokenizer(seed=0, adversarial=False)  # same weights, other config
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(c)


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    class Broken(ImageData):
        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("corrupt image 5")
            return super().__getitem__(i)

    with pytest.raises(RuntimeError, match="corrupt image 5"):
        build_code_cache(tiny_tokenizer(), Broken(n=8), tmp_path / "c", 2)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="condition key 'depth' was asked for"):
        build_code_cache(tiny_tokenizer(), ImageData(n=2), tmp_path / "c", 2, ["depth"])
    with pytest.raises(DataError, match="cannot name a cache file"):
        build_code_cache(tiny_tokenizer(), ImageData(n=2), tmp_path / "c", 2, ["../x"])
    with pytest.raises(CheckpointError, match="not a code cache"):
        CodeCache(tmp_path / "nowhere")


def test_damaged_cache_file_is_named(tmp_path: Path) -> None:
    build_code_cache(tiny_tokenizer(), ImageData(n=4), tmp_path / "c", 2, ["label"])
    np.save(tmp_path / "c" / "cond.label.npy", np.zeros(3, dtype="<i8"))  # wrong length
    with pytest.raises(CheckpointError, match=r"cond\.label\.npy holds <i8 \(3,\)"):
        CodeCache(tmp_path / "c")
    np.save(tmp_path / "c" / "codes.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="cannot be read"):
        CodeCache(tmp_path / "c")
