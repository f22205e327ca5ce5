"""Fashion-MNIST IDX reader: exact round-trips of tiny files, clear errors, and the real data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from latentgen.data.fashion_mnist import (
    CLASSES,
    DEFAULT_ROOT,
    FashionMNIST,
    FashionMNISTConfig,
    read_idx,
)
from latentgen.errors import DataError


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_split(root: Path, split: str, n: int, gz: bool, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    for stem, arr in (
        (f"{prefix}-images-idx3-ubyte", images),
        (f"{prefix}-labels-idx1-ubyte", labels),
    ):
        data = _idx_bytes(arr)
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_roundtrip_exact(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_split(tmp_path, "test", 5, gz)
    ds = FashionMNIST(FashionMNISTConfig(root=str(tmp_path), split="test"))
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        img = item["image"]
        assert isinstance(img, torch.Tensor) and img.shape == (1, 28, 28)
        assert img.dtype == torch.float32
        back = ((img[0] + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(back, images[i])
        assert item["label"] == int(labels[i])


def test_read_idx_any_name_and_shape(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x.bin").write_bytes(gzip.compress(_idx_bytes(arr)))  # gzip sniffed by magic
    assert np.array_equal(read_idx(tmp_path / "x.bin"), arr)


def test_options_pad_resize_channels_limit(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 4, gz=True)
    base = FashionMNIST(FashionMNISTConfig(root=str(tmp_path)))
    padded = FashionMNIST(FashionMNISTConfig(root=str(tmp_path), image_size=32, channels=3))
    x, p = base[1]["image"], padded[1]["image"]
    assert p.shape == (3, 32, 32)
    assert torch.equal(p[:, 2:30, 2:30], x.expand(3, -1, -1))  # centred, pixels untouched
    assert bool((p[:, :2] == -1).all() and (p[:, 30:] == -1).all())  # black border
    bil = FashionMNIST(FashionMNISTConfig(root=str(tmp_path), image_size=16, resize="bilinear"))
    y = bil[1]["image"]
    assert y.shape == (1, 16, 16) and bool(y.min() >= -1) and bool(y.max() <= 1)
    assert len(FashionMNIST(FashionMNISTConfig(root=str(tmp_path), limit=3))) == 3
    assert len(FashionMNIST(FashionMNISTConfig(root=str(tmp_path), limit=99))) == 4


def test_config_rules() -> None:
    cfg = FashionMNISTConfig(split="test", image_size=32)
    assert cfg.type == "fashion_mnist" and FashionMNIST.type_name() == "fashion_mnist"
    assert FashionMNIST.kind == "dataset" and FashionMNIST.classes == CLASSES
    assert FashionMNISTConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValidationError, match="bilinear"):
        FashionMNISTConfig(image_size=16)  # pad cannot shrink
    with pytest.raises(ValidationError):
        FashionMNISTConfig(split="val")
    with pytest.raises(ValidationError):
        FashionMNISTConfig(channels=2)


def test_missing_file_names_file_and_fix(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 2, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        FashionMNIST(FashionMNISTConfig(root=str(tmp_path)))
    msg = str(err.value)
    assert "train-labels-idx1-ubyte" in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(DataError, match="does not exist"):
        FashionMNIST(FashionMNISTConfig(root=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    "damage",
    ["bad_magic", "truncated_header", "truncated_data", "bad_gzip", "extra_bytes"],
)
def test_corrupt_file_names_file(tmp_path: Path, damage: str) -> None:
    _write_split(tmp_path, "train", 3, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()
    if damage == "bad_magic":
        data = b"\x01\x02" + data[2:]
    elif damage == "truncated_header":
        data = data[:9]
    elif damage == "truncated_data":
        data = data[:-5]
    elif damage == "extra_bytes":
        data = data + b"\x00"
    else:
        path.unlink()
        path = tmp_path / "train-images-idx3-ubyte.gz"
        data = gzip.compress(data)[:40]
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        FashionMNIST(FashionMNISTConfig(root=str(tmp_path)))
    assert path.name in str(err.value)


def test_mismatched_label_count(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 3, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        FashionMNIST(FashionMNISTConfig(root=str(tmp_path)))


@pytest.mark.skipif(
    not Path(DEFAULT_ROOT).is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)
def test_real_files() -> None:
    train = FashionMNIST(FashionMNISTConfig(split="train", limit=100))
    test = FashionMNIST(FashionMNISTConfig(split="test"))
    assert len(test) == 10_000 and len(train) == 100
    # The test split is balanced: 1,000 images per class.
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    item = train[0]
    assert item["image"].shape == (1, 28, 28)
    assert float(item["image"].min()) == -1.0 and float(item["image"].max()) == 1.0
    assert 0 <= item["label"] < len(CLASSES) == 10
    assert len(FashionMNIST(FashionMNISTConfig(split="train"))) == 60_000
