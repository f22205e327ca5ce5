"""Users' own images: every image file under a folder, optionally with class sub-folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from latentgen.data.base import ImageDataset, to_tensor
from latentgen.data.images import read_image
from latentgen.errors import DataError
from latentgen.specs import ComponentConfig

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderConfig", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolderConfig(ComponentConfig):
    """Config of the ``image_folder`` dataset."""

    type: Literal["image_folder"] = "image_folder"
    root: str = Field(description="Folder searched recursively for image files.")
    image_size: int = Field(
        256, ge=8, le=16384, description="Images are resized (shorter side) and centre-cropped."
    )
    channels: Literal[1, 3] = Field(3, description="3 for RGB, 1 for greyscale.")
    skip_corrupt: bool = Field(
        False,
        description="Skip files that cannot be decoded (counted in `num_skipped`) instead of "
        "raising. Every file is checked once when the dataset is built.",
    )
    labels_from_subfolders: bool = Field(
        True, description="A file under root/<class>/... gets the index of <class> as 'label'."
    )


class ImageFolderDataset(ImageDataset):
    """Images under ``root``; a corrupt file is an error naming it, or skipped and counted."""

    Config = ImageFolderConfig

    def __init__(self, config: ImageFolderConfig) -> None:
        super().__init__(config)
        root = Path(config.root).expanduser()
        if not root.is_dir():
            raise DataError(
                f"image folder {root} does not exist or is not a directory; set `root` to a "
                "folder of image files."
            )
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not files:
            raise DataError(
                f"image folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); put "
                "your images there or point `root` at another folder."
            )
        self.root = root
        self.num_skipped = 0
        self.skipped: list[Path] = []
        if config.skip_corrupt:
            good = []
            for f in files:
                try:
                    self._load(f)
                    good.append(f)
                except DataError:
                    self.skipped.append(f)
            self.num_skipped = len(self.skipped)
            if not good:
                raise DataError(f"every one of the {len(files)} image files in {root} is corrupt.")
            files = good
        self.files = files
        subdirs = sorted({f.relative_to(root).parts[0] for f in files if f.parent != root})
        self.classes: tuple[str, ...] = tuple(subdirs) if config.labels_from_subfolders else ()

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Any:
        from PIL import Image

        try:
            im = read_image(path, "RGB" if self.config.channels == 3 else "L")
        except DataError as e:
            raise DataError(f"{e} Or set skip_corrupt: true to skip unreadable files.") from None
        n = self.config.image_size
        w, h = im.size
        scale = n / min(w, h)
        nw, nh = max(n, round(w * scale)), max(n, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - n) // 2, (nh - n) // 2
        return im.crop((left, top, left + n, top + n))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        item: dict[str, Any] = {"image": to_tensor(self._load(path)), "path": os.fspath(path)}
        if self.classes:
            rel = path.relative_to(self.root).parts
            item["label"] = self.classes.index(rel[0]) if len(rel) > 1 else -1
        return item
