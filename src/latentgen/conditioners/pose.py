"""Pose conditioning: keypoints ``[K, 3]`` -> Gaussian heatmaps ``[K, H, W]`` -> tokens.

Keypoints are ``(x, y, visibility)`` with x, y fractions of the image width and height in
[0, 1]; an invisible keypoint (visibility 0) draws an empty heatmap. The built-in case is the
shapes data's 5 keypoints (centre and four corners of the main shape). As the other spatial
conditioners, it tokenizes the heatmaps with a trained cond-stage tokenizer, or with the
zero-training stage: each cell's token is 1 + the keypoint whose heatmap peaks there (0: none).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from latentgen.conditioners.spatial import (
    SpatialConditioner,
    SpatialConfig,
    _is_file,
    read_condition_file,
)
from latentgen.errors import InputError

__all__ = ["PoseConditioner", "PoseConfig", "heatmaps"]


class PoseConfig(SpatialConfig):
    """Config of ``pose``: ``num_keypoints`` keypoints drawn as Gaussian heatmaps."""

    type: Literal["pose"] = "pose"
    num_keypoints: int = Field(5, ge=1, le=1024, description="K, keypoints per pose.")
    sigma: float = Field(
        0.05, gt=0, le=1, description="Heatmap Gaussian's std, as a fraction of the image side."
    )
    image_size: int = Field(
        32,
        ge=1,
        le=65536,
        description="Heatmap size when the caller gives no image size (training, direct "
        "calls); the pipeline passes the requested size.",
    )


def heatmaps(keypoints: Tensor, size: tuple[int, int], sigma: float) -> Tensor:
    """Keypoints ``[B, K, 3]`` -> Gaussian heatmaps ``[B, K, H, W]`` in [0, 1], 0 if invisible."""
    h, w = size
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # [H] pixel centres in [0, 1]
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # [W]
    x, y, vis = keypoints[..., 0, None], keypoints[..., 1, None], keypoints[..., 2]  # [B, K, 1]
    gx = torch.exp(-((xs - x) ** 2) / (2 * sigma**2))  # [B, K, W]
    gy = torch.exp(-((ys - y) ** 2) / (2 * sigma**2))  # [B, K, H]
    return gy[..., :, None] * gx[..., None, :] * (vis > 0)[..., None, None].float()


class PoseConditioner(SpatialConditioner):
    """Keypoints ``[K, 3]`` (x, y in [0, 1], visibility) -> heatmaps ``[K, H, W]`` -> tokens.

    Raw forms: a tensor or array ``[K, 3]`` / ``[B, K, 3]``; JSON data (a list of
    ``[x, y, v]`` or ``{"keypoints": [...]}``; a ``.json`` or ``.npy`` path); or a list of
    poses.
    """

    Config = PoseConfig
    input_kind = "keypoints"
    config: PoseConfig

    @property
    def channels(self) -> int:
        return int(self.config.num_keypoints)

    @property
    def zero_vocab_size(self) -> int:
        return int(self.config.num_keypoints) + 1

    def _one(self, item: Any) -> Tensor:
        if _is_file(item):
            item = read_condition_file(item)
        if isinstance(item, Mapping):
            if "keypoints" not in item:
                raise InputError(
                    f"a pose mapping needs a 'keypoints' entry ([[x, y, v], ...]), got keys "
                    f"{sorted(item)}."
                )
            item = item["keypoints"]
        if isinstance(item, Tensor):
            return item.detach().cpu().float()
        try:
            arr = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(
                "a pose must be keypoints [[x, y, visibility], ...] (a list, array, tensor, or "
                f"a .json/.npy file), got {type(item).__name__}."
            ) from None
        return torch.from_numpy(arr)

    def keypoints(self, raw: Any) -> Tensor:
        """Raw poses -> checked keypoints ``[B, K, 3]``."""
        batch = isinstance(raw, (list, tuple)) and bool(raw)
        if batch and isinstance(raw[0], (Mapping, str, os.PathLike, Tensor)):
            kp = torch.stack([self._one(r) for r in raw])  # a list of poses
        else:
            kp = self._one(raw)
        if kp.dim() == 2:
            kp = kp[None]
        k = self.config.num_keypoints
        if kp.dim() != 3 or kp.shape[2] != 3:
            raise InputError(
                f"a pose must be keypoints [K, 3] (x, y, visibility) or a batch [B, K, 3], got "
                f"shape {tuple(kp.shape)}."
            )
        if kp.shape[1] != k:
            raise InputError(
                f"the pose has {kp.shape[1]} keypoints but this conditioner takes {k} "
                f"(num_keypoints={k}): give all {k}, with visibility 0 for keypoints not seen."
            )
        if not bool(torch.isfinite(kp).all()):
            b, j = (~torch.isfinite(kp)).any(2).nonzero()[0].tolist()
            raise InputError(
                f"keypoint {j} of pose {b} is missing (NaN or infinite); give it a position in "
                "[0, 1] with visibility 0 if it is not seen."
            )
        vis = kp[..., 2]
        if bool(((vis < 0) | (vis > 1)).any()):
            raise InputError(
                "keypoint visibility must lie in [0, 1] (0 = not seen, 1 = seen), got "
                f"{float(vis.min()):g}..{float(vis.max()):g}."
            )
        xy = kp[..., :2]
        out = ((xy < 0) | (xy > 1)).any(2) & (vis > 0)  # [B, K]
        if bool(out.any()):
            b, j = out.nonzero()[0].tolist()
            x, y = kp[b, j, 0].item(), kp[b, j, 1].item()
            raise InputError(
                f"keypoint {j} of pose {b} is at ({x:.4g}, {y:.4g}), outside [0, 1]: x and y are "
                "fractions of the image width and height. Divide pixel coordinates by the "
                "image size, or set its visibility to 0."
            )
        return kp

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        kp = self.keypoints(raw)  # [B, K, 3]
        hw = size if size is not None else (self.config.image_size, self.config.image_size)
        maps = heatmaps(kp, (int(hw[0]), int(hw[1])), self.config.sigma)  # [B, K, H, W]
        self._check_map_size(maps, None, "pose heatmap")
        return maps * 2 - 1  # the [-1, 1] range tokenizers take

    def image_size_of(self, raw: Any) -> tuple[int, int] | None:
        return None  # keypoints are fractions: any image size fits

    def default_image_size(self) -> tuple[int, int] | None:
        return (self.config.image_size, self.config.image_size)

    def quantize(self, maps: Tensor) -> Tensor:
        peak = F.max_pool2d((maps + 1) / 2, self.token_downsample)  # [B, K, hc, wc]
        best, idx = peak.max(1)  # [B, hc, wc]
        return torch.where(best > 0.5, idx + 1, torch.zeros_like(idx))
