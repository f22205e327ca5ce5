"""Fashion-MNIST read straight from its IDX files (no torchvision, no download).

Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", https://arxiv.org/abs/1708.07747: 70,000 grayscale 28x28 images of ten
clothing classes (60,000 train, 10,000 test). On Debian/Ubuntu ``apt-get install
dataset-fashion-mnist`` puts the four files in ``/usr/share/datasets/fashion-mnist/``; the
upstream ``*.gz`` downloads or their unpacked copies in any folder work too (``root=...``).

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0x00 0x00 <dtype>
<ndim>``, then ``ndim`` uint32 sizes, then the data. Images are ``[N, 28, 28]`` uint8, labels
``[N]`` uint8.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from latentgen.data.base import ImageDataset
from latentgen.errors import DataError
from latentgen.specs import ComponentConfig

__all__ = ["CLASSES", "DEFAULT_ROOT", "FashionMNIST", "FashionMNISTConfig", "read_idx"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIDE = 28
# IDX type byte -> numpy dtype (big-endian for multi-byte types).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FIX = (
    "Install the dataset with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEFAULT_ROOT}) or point root=... at a folder holding the four Fashion-MNIST IDX files."
)


class FashionMNISTConfig(ComponentConfig):
    """Where to read Fashion-MNIST and how to shape its images."""

    type: Literal["fashion_mnist"] = "fashion_mnist"
    root: str = Field(
        DEFAULT_ROOT,
        min_length=1,
        description="Folder with train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte, each "
        "raw or .gz. Debian package dataset-fashion-mnist installs them in " + DEFAULT_ROOT + ".",
    )
    split: Literal["train", "test"] = Field(
        "train", description="'train' (60,000 images) or 'test' (10,000 images)."
    )
    image_size: int = Field(
        28,
        ge=8,
        le=1024,
        description="Side of the square output image. 28 keeps the originals; 32 suits models "
        "that halve the size several times.",
    )
    resize: Literal["pad", "bilinear"] = Field(
        "pad",
        description="How to reach image_size: 'pad' centres the 28x28 image on a black canvas "
        "(exact pixels, needs image_size >= 28); 'bilinear' rescales (antialiased when "
        "shrinking).",
    )
    channels: Literal[1, 3] = Field(
        1, description="1 for grayscale, 3 to repeat the gray channel as RGB."
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first `limit` images of the split (None = all)."
    )

    @model_validator(mode="after")
    def _pad_needs_room(self) -> FashionMNISTConfig:
        if self.resize == "pad" and self.image_size < _SIDE:
            raise ValueError(
                f"resize='pad' cannot shrink the 28x28 images to image_size={self.image_size}; "
                f"use image_size >= 28 or resize='bilinear'."
            )
        return self


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] is missing from {root}. {_FIX}")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (raw or gzip) as a numpy array; header and size are checked."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}). {_FIX}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: header bytes {raw[:4].hex() or '(empty)'} should be "
            f"00 00 <type> <ndim>. The file is corrupt or not Fashion-MNIST. {_FIX}"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header ({len(raw)} bytes). {_FIX}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its IDX header {shape} of {dtype} needs "
            f"{expected}; the file is truncated or corrupt. {_FIX}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST (https://arxiv.org/abs/1708.07747) as a torch Dataset of dicts.

    Items are ``{"image": float [C, S, S] in [-1, 1], "label": int}`` with C = ``channels`` and
    S = ``image_size``; ``CLASSES[label]`` names the class. The split is read into memory at
    construction (47 MB for train), so errors surface immediately and items are cheap.
    """

    Config = FashionMNISTConfig
    classes: ClassVar[tuple[str, ...]] = CLASSES

    def __init__(self, config: FashionMNISTConfig) -> None:
        super().__init__(config)
        root = Path(config.root).expanduser()
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST folder {root} does not exist. {_FIX}")
        img_stem, lbl_stem = _FILES[config.split]
        img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE) or images.dtype != np.uint8:
            raise DataError(
                f"{img_path} holds {images.dtype} of shape {images.shape}; Fashion-MNIST images "
                f"are uint8 [N, 28, 28]. {_FIX}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype != np.uint8:
            raise DataError(
                f"{lbl_path} holds {labels.dtype} of shape {labels.shape}; expected uint8 "
                f"[{images.shape[0]}] to match {img_path.name}. {_FIX}"
            )
        if labels.size and int(labels.max()) >= len(CLASSES):
            raise DataError(
                f"{lbl_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9. {_FIX}"
            )
        n = images.shape[0] if config.limit is None else min(config.limit, images.shape[0])
        self.images = torch.from_numpy(images[:n].copy())  # [N, 28, 28] uint8
        self.labels = torch.from_numpy(labels[:n].astype(np.int64))  # [N]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        x = self.images[index].float().div(127.5).sub(1.0)[None]  # [1, 28, 28] in [-1, 1]
        size = self.config.image_size
        if size != _SIDE:
            if self.config.resize == "pad":
                lo = (size - _SIDE) // 2
                # -1 is black, the Fashion-MNIST background.
                x = F.pad(x, (lo, size - _SIDE - lo, lo, size - _SIDE - lo), value=-1.0)
            else:
                x = F.interpolate(
                    x[None], size=(size, size), mode="bilinear", antialias=size < _SIDE
                )[0]  # [1, S, S]
        if self.config.channels == 3:
            x = x.expand(3, -1, -1).clone()  # [3, S, S]
        return {"image": x, "label": int(self.labels[index])}
