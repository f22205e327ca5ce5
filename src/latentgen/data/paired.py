"""Users' paired data: images with their segmentation maps, depth maps and poses, by file stem.

    root/
      images/        cat1.jpg  dog7.png ...
      segmentation/  cat1.png  dog7.png ...   class ids (greyscale, palette or 16-bit PNG, .npy)
      depth/         cat1.png  dog7.npy ...   greyscale PNG (black near) or .npy in [-1, 1]
      pose/          cat1.json dog7.json ...  [[x, y, v], ...] or {"keypoints": [...]}

Every image needs a partner in each folder named in ``conditions``, and every map the size of
its image; both are checked for the whole folder when the dataset is built, so a missing or
mismatched file is reported by name before training starts. Images and maps are resized
(shorter side to ``image_size``) and centre-cropped alike: maps with nearest (segmentation) or
bilinear (depth) resampling, keypoints moved with the crop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from latentgen.data.base import ImageDataset, to_tensor
from latentgen.data.folder import IMAGE_EXTENSIONS
from latentgen.errors import DataError
from latentgen.specs import ComponentConfig

__all__ = ["PairedFolderConfig", "PairedFolderDataset"]

Condition = Literal["segmentation", "depth", "pose"]
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "segmentation": (".png", ".npy", ".tif", ".tiff", ".bmp"),
    "depth": (".png", ".npy", ".tif", ".tiff"),
    "pose": (".json", ".npy"),
}


class PairedFolderConfig(ComponentConfig):
    """Config of ``paired_folder``: ``root/images`` and a folder per condition, matched by stem."""

    type: Literal["paired_folder"] = "paired_folder"
    root: str = Field(description="Folder holding images/ and one folder per condition.")
    conditions: tuple[Condition, ...] = Field(
        ("segmentation",),
        min_length=1,
        description="Condition folders every image must have a partner in.",
    )
    image_size: int = Field(
        256, ge=8, le=16384, description="Shorter side resized to this, then centre-cropped."
    )


def _map_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of a map file, read from its header (PNG) or array header (.npy)."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return int(arr.shape[-2]), int(arr.shape[-1])
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


class PairedFolderDataset(ImageDataset):
    """Items ``{"image", "segmentation" [H, W] long, "depth" [1, H, W], "pose" [K, 3], "path"}``."""

    Config = PairedFolderConfig

    def __init__(self, config: PairedFolderConfig) -> None:
        super().__init__(config)
        root = Path(config.root).expanduser()
        images_dir = root / "images"
        if not images_dir.is_dir():
            raise DataError(
                f"paired folder {root} has no images/ folder; put the images in {images_dir} "
                f"and each condition in {root}/<condition>/ with the same file stems."
            )
        images = sorted(
            p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(f"{images_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
        self.root = root
        self.images = images
        self.partners: dict[str, list[Path]] = {}
        problems: list[str] = []
        for cond in config.conditions:
            folder = root / cond
            if not folder.is_dir():
                raise DataError(
                    f"paired folder {root} has no {cond}/ folder but conditions names "
                    f"'{cond}'; add {folder} or drop '{cond}' from conditions."
                )
            by_stem: dict[str, Path] = {}
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.suffix.lower() in _SUFFIXES[cond]:
                    if p.stem in by_stem:
                        problems.append(f"{cond}/: both {by_stem[p.stem].name} and {p.name}")
                    by_stem[p.stem] = p
            found = []
            for img in images:
                partner = by_stem.get(img.stem)
                if partner is None:
                    problems.append(
                        f"images/{img.name} has no partner in {cond}/ (expected {img.stem}"
                        f"{' or '.join(_SUFFIXES[cond][:2])})"
                    )
                    continue
                found.append(partner)
                if cond != "pose":
                    hw, mw = self._image_size(img), _map_size(partner)
                    if hw != mw:
                        problems.append(
                            f"{cond}/{partner.name} is {mw[0]}x{mw[1]} but images/{img.name} "
                            f"is {hw[0]}x{hw[1]}"
                        )
            orphans = sorted(set(by_stem) - {i.stem for i in images})
            problems += [f"{cond}/{by_stem[s].name} has no image in images/" for s in orphans]
            self.partners[cond] = found
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(
                f"paired folder {root}: {len(problems)} problem(s) with the pairs:\n  {shown}{more}"
                "\nEvery image needs one partner per condition, with the same stem and size."
            )

    @staticmethod
    def _image_size(path: Path) -> tuple[int, int]:
        from PIL import Image

        with Image.open(path) as im:
            return im.size[1], im.size[0]

    def __len__(self) -> int:
        return len(self.images)

    def _geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(new_h, new_w, top, left)`` of the resize + centre crop to ``image_size``."""
        n = self.config.image_size
        scale = n / min(h, w)
        nh, nw = max(n, round(h * scale)), max(n, round(w * scale))
        return nh, nw, (nh - n) // 2, (nw - n) // 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        from latentgen.conditioners.spatial import read_condition_file
        from latentgen.data.images import read_image

        path = self.images[index]
        im = read_image(path, "RGB")
        w, h = im.size
        nh, nw, top, left = self._geometry(h, w)
        n = self.config.image_size
        box = (left, top, left + n, top + n)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC).crop(box)
        item: dict[str, Any] = {"image": to_tensor(im), "path": os.fspath(path)}
        for cond in self.config.conditions:
            partner = self.partners[cond][index]
            raw = read_condition_file(partner)
            if cond == "pose":
                kp = torch.as_tensor(
                    np.asarray(raw["keypoints"] if isinstance(raw, dict) else raw, np.float32)
                )  # [K, 3]
                kp = kp.clone()
                kp[:, 0] = (kp[:, 0] * nw - left) / n
                kp[:, 1] = (kp[:, 1] * nh - top) / n
                inside = ((kp[:, :2] >= 0) & (kp[:, :2] <= 1)).all(1)
                kp[:, 2] = torch.where(inside, kp[:, 2], torch.zeros_like(kp[:, 2]))
                item["pose"] = kp
                continue
            arr = raw.numpy() if isinstance(raw, torch.Tensor) else np.array(raw)
            if cond == "segmentation":
                if arr.ndim != 2:
                    raise DataError(f"{partner} must hold one class id per pixel, got {arr.shape}.")
                m = Image.fromarray(arr.astype(np.int32), mode="I")
                m = m.resize((nw, nh), Image.Resampling.NEAREST).crop(box)
                item["segmentation"] = torch.from_numpy(np.array(m).astype(np.int64))
            else:  # depth in [-1, 1]
                if partner.suffix.lower() == ".npy":
                    d = arr.astype(np.float32).reshape(arr.shape[-2], arr.shape[-1])
                else:
                    scale = 65535.0 if arr.dtype == np.uint16 or arr.max() > 255 else 255.0
                    d = arr.astype(np.float32) / scale * 2 - 1
                m = Image.fromarray(d, mode="F").resize((nw, nh), Image.Resampling.BILINEAR)
                item["depth"] = torch.from_numpy(np.array(m.crop(box)))[None]  # [1, n, n]
        return item
