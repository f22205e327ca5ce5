"""scikit-image's sample photos (CC0 / public domain, installed with it) as image tensors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def load_photo(name: str, size: int, gray: bool = False) -> Tensor:
    """The photo ``name`` (a file stem in scikit-image's ``skimage/data`` folder, e.g.
    ``astronaut``; read from the installed files, so nothing is downloaded) centre-cropped to a
    square and resized to ``size`` pixels: ``[1, C, size, size]`` in [-1, 1] (C = 1 with
    ``gray``, else 3; a grey photo is repeated into three channels)."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    found = sorted(folder.glob(f"{name}.*"))
    if not found:
        raise SystemExit(f"no photo {name!r} in {folder}; reinstall scikit-image.")
    with Image.open(found[0]) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)  # [H, W, 3] in 0..255
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W]
    h, w = x.shape[1:]
    s = min(h, w)
    x = x[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)
    if gray:  # ITU-R 601 luma, as PIL's convert("L")
        x = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    return x.clamp(-1, 1)


def load_photos(names: Iterable[str], size: int, gray: bool = False) -> Tensor:
    """``load_photo`` of each name, stacked: ``[N, C, size, size]``."""
    return torch.cat([load_photo(n, size, gray) for n in names])
