"""Spatial conditioners: a map (segmentation, depth, edges, a small image) -> a grid of tokens.

Each is a fixed transform of its raw input into maps ``[B, C, H, W]`` (one-hot classes, depth,
Sobel edges, a k-times smaller image), then a cond-stage tokenizer, as in "Taming Transformers"
(https://arxiv.org/abs/2012.09841, sec. 3.2 and 4.1):

- ``tokenizer: {...}`` -- a trained tokenizer component (train it with ``latentgen train
  tokenizer`` on a ``condition_maps`` dataset, which yields ``prepare``'s maps as images);
- ``tokenizer: null`` -- the zero-training stage: the maps pooled by ``downsample`` and
  quantized to a few levels (segmentation: the class id of each cell's centre pixel).

The ``Conditioning`` carries ``grid=(hc, wc)``. Every spatial conditioner here has
``image_downsample`` (image pixels per condition token, along each side): the pipeline requires
it to equal the image tokenizer's downsample, so the condition grid is the image's code grid and
a sliding window crops both alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from latentgen.conditioners.base import Conditioner, Conditioning
from latentgen.errors import InputError, SpecError
from latentgen.specs import ComponentConfig, TokenizerSpec

__all__ = [
    "DepthConditioner",
    "DepthConfig",
    "EdgesConditioner",
    "EdgesConfig",
    "LowResolutionConditioner",
    "LowResolutionConfig",
    "SegmentationConditioner",
    "SegmentationConfig",
    "SpatialConditioner",
    "SpatialConfig",
    "sobel_edges",
]

if TYPE_CHECKING:  # the validator dispatches through the registry; mypy sees the base class
    TokenizerField = ComponentConfig
else:
    TokenizerField = TokenizerSpec


class SpatialConfig(ComponentConfig):
    """Fields every spatial conditioner's config shares (not registered by itself)."""

    downsample: int = Field(
        4,
        ge=1,
        le=1024,
        description="Zero-training stage only: map pixels per condition token along each side. "
        "Set it so the condition grid is the image's code grid (the image tokenizer's "
        "downsample factor). With a cond-stage tokenizer its own factor is used instead.",
    )
    tokenizer: TokenizerField | None = Field(
        None,
        description="Cond-stage tokenizer config (its weights are this conditioner's); train it "
        "on the maps with `latentgen train tokenizer` and a `condition_maps` dataset. None: "
        "the zero-training stage (pooled and quantized maps).",
    )


def _is_file(raw: Any) -> bool:
    return isinstance(raw, (str, os.PathLike))


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def read_condition_file(path: str | os.PathLike[str]) -> Any:
    """A condition file as a raw condition: ``.npy`` (no pickles), ``.json``, or an image."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"condition file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise InputError(f"cannot read {path} as a numpy array: {e}") from None
    if suffix == ".json":
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
    from latentgen.data.images import read_image

    return read_image(path)  # as decoded: palette indices and 16-bit values kept


def _pil_array(img: Any) -> np.ndarray[Any, Any]:
    """A PIL image's pixels as decoded: ``[H, W]`` (one channel) or ``[H, W, C]``."""
    arr = np.array(img)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[:, :, :3]
        if (rgb == rgb[:, :, :1]).all():  # a grey map saved as RGB
            return rgb[:, :, 0]
    return arr


def _pixel_scale(arr: np.ndarray[Any, Any]) -> float:
    """The value of white for an integer pixel array (255 for 8 bits, 65535 for 16)."""
    return 65535.0 if arr.dtype in (np.uint16, np.int32, np.int64) and arr.max() > 255 else 255.0


def _as_batch(raw: Any, one: Any, what: str) -> Tensor:
    """Raw input for a batch: a tensor/array batch, one item, or a list of items -> ``[B, ...]``.

    ``one(item)`` turns one item (tensor without a batch dim, array, PIL image, file) into a
    tensor; ``raw`` given as a tensor with an extra leading dim is taken as the batch.
    """
    if _is_file(raw):
        raw = read_condition_file(raw)
    if isinstance(raw, (list, tuple)) and raw and not isinstance(raw[0], (int, float)):
        items = [one(read_condition_file(r) if _is_file(r) else r) for r in raw]
        sizes = {tuple(t.shape) for t in items}
        if len(sizes) > 1:
            raise InputError(
                f"the {what} maps of one batch have different sizes {sorted(sizes)}; give maps "
                "of one size per call."
            )
        return torch.stack(items)
    return one(raw)


class SpatialConditioner(Conditioner):
    """Base of the map conditioners: ``prepare`` (fixed transform) -> cond-stage tokens.

    Subclasses implement ``prepare(raw, size)`` -> maps ``[B, channels, H, W]`` (what the
    cond-stage tokenizer is trained on) and the zero-training stage: ``quantize(maps)`` ->
    ``[B, hc, wc]`` long in ``[0, zero_vocab_size)``.
    """

    #: How many times smaller than the image the prepared maps are (low_resolution: k).
    map_ratio: ClassVar[int] = 1

    def __init__(self, config: SpatialConfig) -> None:
        super().__init__(config)
        self.tokenizer: Any = None
        if config.tokenizer is not None:
            from latentgen import registry

            self.tokenizer = registry.build("tokenizer", config.tokenizer).eval()
            if self.tokenizer.in_channels != self.channels:
                raise SpecError(
                    f"{config.type}: the cond-stage tokenizer takes {self.tokenizer.in_channels}"
                    f"-channel images but this conditioner's maps have {self.channels} channels; "
                    f"set the tokenizer's in_channels to {self.channels}."
                )

    def train(self, mode: bool = True) -> SpatialConditioner:
        """Train mode never reaches the cond-stage tokenizer (no codebook updates while a prior
        trains on its tokens)."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    # -- what a subclass provides -----------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Channels C of the prepared maps ``[B, C, H, W]``."""
        raise NotImplementedError

    @property
    def zero_vocab_size(self) -> int:
        """Vocabulary of the zero-training stage."""
        raise NotImplementedError

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        """Raw condition -> maps ``[B, C, H, W]`` (the fixed transform), fitted to ``size``."""
        raise NotImplementedError

    def quantize(self, maps: Tensor) -> Tensor:
        """Zero-training stage: maps ``[B, C, H, W]`` -> tokens ``[B, hc, wc]``."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def token_downsample(self) -> int:
        """Map pixels per condition token (the cond-stage tokenizer's factor, or ``downsample``)."""
        if self.tokenizer is not None:
            return int(self.tokenizer.downsample)
        return int(self.config.downsample)

    @property
    def image_downsample(self) -> int:
        """Image pixels per condition token along each side: the image tokenizer's or a multiple."""
        return self.token_downsample * self.map_ratio

    @property
    def vocab_size(self) -> int:
        if self.tokenizer is not None:
            return int(self.tokenizer.vocab_size)
        return self.zero_vocab_size

    @property
    def num_tokens(self) -> int | None:
        """None: a spatial condition emits one token per code, ``h * w``, so it follows the size."""
        return None

    def image_size_of(self, raw: Any) -> tuple[int, int] | None:
        """The image size a raw condition implies (None when it has no size, e.g. keypoints)."""
        maps = self.prepare(raw)
        return int(maps.shape[2]) * self.map_ratio, int(maps.shape[3]) * self.map_ratio

    def default_image_size(self) -> tuple[int, int] | None:
        """The image size to use when neither the caller, the maps nor the card give one."""
        return None

    def _check_map_size(self, maps: Tensor, size: tuple[int, int] | None, what: str) -> None:
        """Maps ``[B, C, h, w]`` must be ``size / map_ratio`` and divide by the token factor."""
        h, w = int(maps.shape[2]), int(maps.shape[3])
        if size is not None:
            want = (size[0] // self.map_ratio, size[1] // self.map_ratio)
            if (h, w) != want:
                raise InputError(
                    f"the {what} is {h}x{w} pixels but the requested image is "
                    f"{size[0]}x{size[1]}: {self.config.type} needs a {what} of "
                    f"{want[0]}x{want[1]}. Resize the {what}, or ask for size="
                    f"({h * self.map_ratio}, {w * self.map_ratio})."
                )
        f = self.token_downsample
        if h % f or w % f or h < f or w < f:
            raise InputError(
                f"the {what} is {h}x{w} pixels, not a multiple of {f} (pixels per condition "
                f"token of {self.config.type}); crop or pad it to "
                f"{max(f, h // f * f)}x{max(f, w // f * f)}."
            )

    def encode(self, raw: Any, size: tuple[int, int] | None = None) -> Conditioning:
        """Raw condition for a batch -> tokens ``[B, hc*wc]`` with ``grid=(hc, wc)``.

        ``size`` is the image size ``(H, W)`` the condition is for; when given, the map must
        fit it (the pipeline passes it).
        """
        maps = self.prepare(raw, size)  # [B, C, H, W]
        if self.tokenizer is not None:
            device = next(iter(self.tokenizer.parameters())).device
            with torch.no_grad():  # the cond stage is trained on its own, never through a prior
                codes = self.tokenizer.encode(maps.to(device))  # [B, hc, wc]
        else:
            codes = self.quantize(maps)  # [B, hc, wc]
        hc, wc = int(codes.shape[1]), int(codes.shape[2])
        return Conditioning(
            tokens=codes.reshape(codes.shape[0], -1), vocab_size=self.vocab_size, grid=(hc, wc)
        )

    def forward(self, raw: Any, size: tuple[int, int] | None = None) -> Conditioning:
        return self.encode(raw, size)


def _rescale_hint(lo: float, hi: float) -> str:
    unit = "(d - d.min()) / (d.max() - d.min())"
    return unit if (lo, hi) == (0.0, 1.0) else f"{unit} * {hi - lo:g} - {-lo:g}"


def _levels(x: Tensor, lo: float, hi: float, levels: int) -> Tensor:
    """Values in ``[lo, hi]`` -> bin index in ``[0, levels)`` (uniform bins)."""
    t = ((x - lo) / (hi - lo) * levels).floor()
    return t.clamp(0, levels - 1).long()


# ---------------------------------------------------------------------------------------------
# segmentation
class SegmentationConfig(SpatialConfig):
    """Config of ``segmentation``: a label map of class ids ``[H, W]``."""

    type: Literal["segmentation"] = "segmentation"
    num_classes: int = Field(
        ge=2, le=65536, description="Class ids 0 .. num_classes-1 (0 is often background)."
    )


class SegmentationConditioner(SpatialConditioner):
    """Label map ``[H, W]`` of class ids -> one-hot ``[C, H, W]`` -> tokens.

    Raw forms: an integer tensor or array ``[H, W]`` / ``[B, H, W]``, a PNG of class ids
    (greyscale, palette or 16-bit; a PIL image or a path), a ``.npy`` path, or a list of them.
    The zero-training stage's token of a cell is the class id at its centre pixel (a nearest
    downsample), so its vocabulary is ``num_classes``.
    """

    Config = SegmentationConfig
    input_kind = "label_map"
    config: SegmentationConfig

    @property
    def channels(self) -> int:
        return int(self.config.num_classes)

    @property
    def zero_vocab_size(self) -> int:
        return int(self.config.num_classes)

    def _one(self, item: Any) -> Tensor:
        if isinstance(item, Tensor):
            t = item.detach().cpu()
        elif isinstance(item, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(item))
        elif _is_pil(item):  # a PIL image
            arr = _pil_array(item)
            if arr.ndim != 2:
                raise InputError(
                    f"a segmentation image must hold one class id per pixel (greyscale, "
                    f"palette or 16-bit PNG), got a {item.mode} image with {arr.shape[2]} "
                    "different channels; save the class ids as a greyscale or palette PNG."
                )
            t = torch.from_numpy(arr.astype(np.int64))
        else:
            raise InputError(
                "a segmentation map must be an integer tensor/array [H, W], a PNG of class ids "
                f"or a path to one (.png, .npy), got {type(item).__name__}."
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(
                f"a segmentation map holds integer class ids, got dtype {t.dtype}; convert it "
                "with .long() if the values are whole numbers."
            )
        return t.long()

    def labels(self, raw: Any) -> Tensor:
        """Raw condition -> class ids ``[B, H, W]`` long, checked against ``num_classes``."""
        ids = _as_batch(raw, self._one, "segmentation")
        if ids.dim() == 2:
            ids = ids[None]
        if ids.dim() != 3:
            raise InputError(
                f"a segmentation map must be [H, W] or a batch [B, H, W] of class ids, got shape "
                f"{tuple(ids.shape)}."
            )
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            k = self.config.num_classes
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise InputError(
                    f"the segmentation map has class id {bad}, outside [0, {k}) "
                    f"(num_classes={k}); remap the ids to 0..{k - 1}, or use a conditioner "
                    f"with num_classes >= {hi + 1}."
                )
        return ids

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        ids = self.labels(raw)  # [B, H, W]
        maps = F.one_hot(ids, self.config.num_classes).permute(0, 3, 1, 2).float()  # [B, C, H, W]
        self._check_map_size(maps, size, "segmentation map")
        return maps

    def quantize(self, maps: Tensor) -> Tensor:
        f = self.token_downsample
        ids = maps.argmax(1)  # [B, H, W]
        return ids[:, f // 2 :: f, f // 2 :: f].contiguous()  # [B, H/f, W/f]: centre pixels


# ---------------------------------------------------------------------------------------------
# one-channel maps (depth, edges)
def _grey_batch(raw: Any, what: str, lo: float, hi: float) -> Tensor:
    """Raw one-channel maps -> float ``[B, 1, H, W]`` (images scaled from their pixel range)."""

    def one(item: Any) -> Tensor:
        if isinstance(item, Tensor):
            t = item.detach().cpu()
        elif isinstance(item, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(item))
        elif _is_pil(item):
            arr = _pil_array(item)
            if arr.ndim != 2:
                raise InputError(
                    f"a {what} image must be greyscale (one value per pixel), got a {item.mode} "
                    f"image with different channels; save it as a greyscale PNG."
                )
            scaled = arr.astype(np.float32) / _pixel_scale(arr)  # [0, 1]
            t = torch.from_numpy(scaled * (hi - lo) + lo)
        else:
            raise InputError(
                f"a {what} must be a float tensor/array [1, H, W], a greyscale PNG or a path "
                f"to one (.png, .npy), got {type(item).__name__}."
            )
        if not t.is_floating_point():
            raise InputError(
                f"a {what} tensor must be floating point in [{lo:g}, {hi:g}], got {t.dtype}; a "
                f"uint8 map is x / 255 * {hi - lo:g} + {lo:g}."
            )
        return t.float()

    maps = _as_batch(raw, one, what)
    if maps.dim() == 2:
        maps = maps[None, None]
    elif maps.dim() == 3:
        maps = maps[:, None] if maps.shape[0] != 1 else maps[None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise InputError(
            f"a {what} must be [H, W], [1, H, W] or a batch [B, 1, H, W], got shape "
            f"{tuple(maps.shape)}."
        )
    if maps.numel():
        if not bool(torch.isfinite(maps).all()):
            raise InputError(f"the {what} has NaN or infinite values; fill them before passing it.")
        a, b = float(maps.min()), float(maps.max())
        if a < lo - 1e-4 or b > hi + 1e-4:
            raise InputError(
                f"{what} values must lie in [{lo:g}, {hi:g}], got [{a:.4g}, {b:.4g}]; normalise "
                f"it, e.g. {_rescale_hint(lo, hi)}."
            )
    return maps


class DepthConfig(SpatialConfig):
    """Config of ``depth``: a depth map ``[1, H, W]`` in [-1, 1] (-1 near, 1 far)."""

    type: Literal["depth"] = "depth"
    levels: int = Field(
        16, ge=2, le=4096, description="Zero-training stage: depth bins (its vocabulary)."
    )


class DepthConditioner(SpatialConditioner):
    """Depth map ``[1, H, W]`` in [-1, 1] -> tokens (a trained tokenizer, or binned cell means).

    Raw forms: a float tensor/array ``[H, W]``, ``[1, H, W]`` or ``[B, 1, H, W]``; a greyscale
    (8- or 16-bit) PNG, black = near (-1), white = far (1); a path; or a list of them.
    """

    Config = DepthConfig
    input_kind = "image"
    input_channels = 1
    config: DepthConfig

    @property
    def channels(self) -> int:
        return 1

    @property
    def zero_vocab_size(self) -> int:
        return int(self.config.levels)

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        maps = _grey_batch(raw, "depth map", -1.0, 1.0)  # [B, 1, H, W]
        self._check_map_size(maps, size, "depth map")
        return maps

    def quantize(self, maps: Tensor) -> Tensor:
        cells = F.avg_pool2d(maps, self.token_downsample)[:, 0]  # [B, hc, wc]
        return _levels(cells, -1.0, 1.0, self.config.levels)


def sobel_edges(images: Tensor) -> Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] -> edge strength ``[B, 1, H, W]`` in [0, 1] (Sobel)."""
    grey = images.mean(1, keepdim=True)  # [B, 1, H, W]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    k = torch.stack([kx, kx.t()])[:, None]  # [2, 1, 3, 3]
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k)  # [B, 2, H, W]
    # The largest Sobel magnitude of a [-1, 1] image is 8 (a full black/white step): one
    # fixed scale, so an edge map means the same for every image (no per-image normalising).
    return (g.square().sum(1, keepdim=True).sqrt() / 8.0).clamp(0, 1)


class EdgesConfig(SpatialConfig):
    """Config of ``edges``: an edge map (Sobel edges of the image)."""

    type: Literal["edges"] = "edges"
    levels: int = Field(
        8, ge=2, le=4096, description="Zero-training stage: edge-strength bins (its vocabulary)."
    )


class EdgesConditioner(SpatialConditioner):
    """Edge map ``[1, H, W]`` in [0, 1] -> tokens; an RGB image is turned into one first.

    Raw forms: a one-channel map (tensor ``[H, W]``/``[1, H, W]``/``[B, 1, H, W]`` in [0, 1],
    a greyscale PNG with white edges, a path), or an image with 3 channels (a ``[B, 3, H, W]``
    tensor in [-1, 1] or a colour PNG), from which ``sobel_edges`` makes the map -- that is how
    training derives the condition from the dataset's images.
    """

    Config = EdgesConfig
    input_kind = "image"
    config: EdgesConfig

    @property
    def channels(self) -> int:
        return 1

    @property
    def zero_vocab_size(self) -> int:
        return int(self.config.levels)

    def edge_map(self, raw: Any) -> Tensor:
        """Raw edge map or image -> edges ``[B, 1, H, W]`` in [0, 1]."""
        if isinstance(raw, Tensor) and raw.dim() in (3, 4) and raw.shape[-3] == 3:
            return sobel_edges(raw if raw.dim() == 4 else raw[None])
        if _is_file(raw):
            raw = read_condition_file(raw)
        if _is_pil(raw) and _pil_array(raw).ndim == 3:
            from latentgen.data.base import to_tensor

            return sobel_edges(to_tensor(raw.convert("RGB"))[None])
        return _grey_batch(raw, "edge map", 0.0, 1.0)

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        edges = self.edge_map(raw)  # [B, 1, H, W] in [0, 1]
        self._check_map_size(edges, size, "edge map")
        return edges * 2 - 1  # the [-1, 1] range tokenizers take

    def quantize(self, maps: Tensor) -> Tensor:
        cells = F.avg_pool2d((maps + 1) / 2, self.token_downsample)[:, 0]  # [B, hc, wc]
        # sqrt spreads the bins over the weak edges, which most cells hold
        return _levels(cells.sqrt(), 0.0, 1.0, self.config.levels)


# ---------------------------------------------------------------------------------------------
# low resolution (super-resolution)
class LowResolutionConfig(SpatialConfig):
    """Config of ``low_resolution``: a ``factor`` times smaller image (super-resolution)."""

    type: Literal["low_resolution"] = "low_resolution"
    factor: int = Field(
        4, ge=1, le=64, description="How many times smaller than the image the condition is (k)."
    )
    downsample: int = Field(
        1,
        ge=1,
        le=1024,
        description="Zero-training stage only: small-image pixels per token along each side "
        "(the image tokenizer's factor divided by `factor`).",
    )
    levels: int = Field(
        4,
        ge=2,
        le=16,
        description="Zero-training stage: levels per colour channel (levels^3 tokens).",
    )


class LowResolutionConditioner(SpatialConditioner):
    """A small image ``[3, H/k, W/k]`` -> tokens; a full-size image is downsampled first.

    Raw forms: a float tensor ``[3, h, w]``/``[B, 3, h, w]`` in [-1, 1], an RGB PNG, a path, or
    a list. When the pipeline gives the image size, an input of the full size is averaged down
    ``factor`` times (how training derives the condition from the dataset's images); an input
    of ``size / factor`` is used as it is.
    """

    Config = LowResolutionConfig
    input_kind = "image"
    input_channels = 3
    config: LowResolutionConfig

    @property
    def map_ratio(self) -> int:  # type: ignore[override]
        return int(self.config.factor)

    @property
    def channels(self) -> int:
        return 3

    @property
    def zero_vocab_size(self) -> int:
        return int(self.config.levels) ** 3

    def _one(self, item: Any) -> Tensor:
        if isinstance(item, Tensor):
            t = item.detach().cpu()
        elif isinstance(item, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(item))
        elif _is_pil(item):
            from latentgen.data.base import to_tensor

            return to_tensor(item.convert("RGB"))
        else:
            raise InputError(
                "a low-resolution image must be a float tensor [3, h, w] in [-1, 1], an RGB "
                f"image or a path to one, got {type(item).__name__}."
            )
        if not t.is_floating_point():
            raise InputError(
                f"a low-resolution image tensor must be float in [-1, 1], got {t.dtype}; "
                "convert uint8 with x / 127.5 - 1."
            )
        return t.float()

    def small_image(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        """Raw input -> the small image ``[B, 3, H/k, W/k]`` in [-1, 1]."""
        x = _as_batch(raw, self._one, "low-resolution")
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(
                f"a low-resolution image must be [3, h, w] or [B, 3, h, w], got shape "
                f"{tuple(x.shape)}."
            )
        if x.numel() and (float(x.min()) < -1 - 1e-3 or float(x.max()) > 1 + 1e-3):
            raise InputError(
                f"low-resolution image values must lie in [-1, 1], got [{float(x.min()):.3g}, "
                f"{float(x.max()):.3g}]; scale [0, 1] images with x * 2 - 1."
            )
        k = self.config.factor
        if size is not None and tuple(x.shape[2:]) == tuple(size) and k > 1:
            x = F.avg_pool2d(x, k)  # a full-size image: derive the condition
        return x

    def prepare(self, raw: Any, size: tuple[int, int] | None = None) -> Tensor:
        small = self.small_image(raw, size)  # [B, 3, H/k, W/k]
        self._check_map_size(small, size, "low-resolution image")
        return small

    def quantize(self, maps: Tensor) -> Tensor:
        cells = F.avg_pool2d(maps, self.token_downsample)  # [B, 3, hc, wc]
        q = _levels(cells, -1.0, 1.0, self.config.levels)  # [B, 3, hc, wc]
        n = self.config.levels
        return q[:, 0] * n * n + q[:, 1] * n + q[:, 2]  # [B, hc, wc]


def spatial_types() -> Sequence[type[SpatialConditioner]]:
    """The spatial conditioner classes defined here."""
    return (SegmentationConditioner, DepthConditioner, EdgesConditioner, LowResolutionConditioner)
