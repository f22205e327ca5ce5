"""``toy.palette``: patch means quantized to a k-means palette."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from latentgen import ComponentConfig, Tokenizer


class PaletteTokenizerConfig(ComponentConfig):
    type: Literal["toy.palette"] = "toy.palette"
    vocab_size: int = Field(16, ge=2, le=4096, description="Palette size K.")
    downsample: int = Field(4, ge=1, le=64, description="Patch side f (code grid is H/f x W/f).")
    in_channels: int = Field(3, ge=1, le=4, description="Image channels.")
    kmeans_iters: int = Field(20, ge=1, le=1000, description="Lloyd iterations in fit().")


class PaletteTokenizer(Tokenizer):
    """Encodes each patch as the nearest palette colour; the palette is fitted with k-means."""

    Config = PaletteTokenizerConfig

    def __init__(self, config: PaletteTokenizerConfig) -> None:
        super().__init__(config)
        # An evenly spread grey ramp until fit() is called, so an unfitted tokenizer still works.
        ramp = torch.linspace(-1, 1, config.vocab_size)[:, None].repeat(1, config.in_channels)
        self.register_buffer("palette", ramp)  # [K, C]

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def downsample(self) -> int:
        return int(self.config.downsample)

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    def _patch_means(self, images: Tensor) -> Tensor:
        pooled = F.avg_pool2d(images.float(), self.downsample)  # [B, C, h, w]
        return pooled.permute(0, 2, 3, 1)  # [B, h, w, C]

    def encode(self, images: Tensor) -> Tensor:
        self.check_images(images)
        means = self._patch_means(images)
        dist = torch.cdist(means.reshape(-1, self.in_channels), self.palette)  # [B*h*w, K]
        return dist.argmin(-1).view(means.shape[:3])  # [B, h, w]

    def decode(self, codes: Tensor) -> Tensor:
        self.check_codes(codes)
        colours = self.palette[codes.long()].permute(0, 3, 1, 2)  # [B, C, h, w]
        return F.interpolate(colours, scale_factor=self.downsample, mode="nearest")

    @torch.no_grad()
    def fit(self, images: Tensor, generator: torch.Generator | None = None) -> PaletteTokenizer:
        """Fit the palette to the patch means of ``images`` with k-means (k-means++ seeding)."""
        self.check_images(images)
        x = self._patch_means(images).reshape(-1, self.in_channels)  # [N, C]
        k = self.vocab_size
        g = generator or torch.Generator().manual_seed(0)
        centres = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(1, k):  # k-means++: spread the initial centres out
            d2 = torch.cdist(x, centres).min(-1).values.pow(2)
            if float(d2.sum()) == 0:
                d2 = torch.ones_like(d2)
            centres = torch.cat([centres, x[torch.multinomial(d2, 1, generator=g)]])
        for _ in range(self.config.kmeans_iters):
            assign = torch.cdist(x, centres).argmin(-1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).clamp_min(1)[:, None]
            used = torch.bincount(assign, minlength=k)[:, None] > 0
            centres = torch.where(used, sums / counts, centres)
        self.palette.copy_(centres)
        return self
