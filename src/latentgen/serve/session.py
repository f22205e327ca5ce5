"""What the page does, without the page: generate into a run folder, inspect the tokenizer.

``Studio`` owns one loaded pipeline and one output folder. Every generation writes a fresh
``run-NNNN/`` there atomically (the PNGs, ``samples.png``, ``codes.npy``, the conditions as
files and ``settings.json``) and returns the ``latentgen sample`` line that draws the same
images; the tokenizer tab writes ``tokenize-NNNN/``. Nothing is written anywhere else.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentgen.conditioners.base import RawInput
from latentgen.errors import DataError, InputError, LatentgenError
from latentgen.files import atomic_directory
from latentgen.pipeline import Pipeline
from latentgen.serve.inputs import (
    label_map_from_colours,
    label_map_from_painting,
    save_condition,
)
from latentgen.specs import SamplerConfig

__all__ = [
    "Cancelled",
    "ConditionValue",
    "GenerateRequest",
    "GenerateResult",
    "InspectResult",
    "Studio",
]

# Pixels one request may ask for (images x H x W) unless `latentgen serve --max-pixels` says.
DEFAULT_MAX_PIXELS = 4 * 1024 * 1024


class Cancelled(LatentgenError):
    """The user pressed Cancel while the codes were being drawn."""


@dataclass
class ConditionValue:
    """What the page holds for one conditioner; the first that is set wins, in field order.

    Attributes:
        file: path of an uploaded file (an image, a class-id map, keypoints JSON, ...).
        painting: a painted canvas ``[h, w, 3|4]`` uint8 ("label_map").
        choice: a class index ("class").
        text: JSON text ("keypoints", "value").
    """

    file: str | None = None
    painting: np.ndarray[Any, Any] | None = None
    choice: int | None = None
    text: str | None = None


@dataclass
class GenerateRequest:
    """One press of Generate: conditions by conditioner name and the sampler settings."""

    conditions: dict[str, ConditionValue] = field(default_factory=dict)
    size: tuple[int, int] | None = None
    num_images: int = 4
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance: float = 1.0
    window: str = "cached"


@dataclass
class GenerateResult:
    """A finished run: where its files are and how to draw it again from the command line."""

    folder: Path
    images: list[Path]
    grid: Path
    codes: Path
    command: str
    size: tuple[int, int]


@dataclass
class InspectResult:
    """The tokenizer tab's answer for one uploaded image."""

    folder: Path
    original: Path
    reconstruction: Path
    code_grid: Path
    codes: Path
    metrics: dict[str, Any]


def _whole(value: Any, what: str, low: int) -> int:
    """A page number (float from a number box) -> int >= ``low``, or a clear error."""
    if value is None or (isinstance(value, float) and not value.is_integer()):
        raise InputError(f"{what} must be a whole number, got {value!r}.")
    if int(value) < low:
        raise InputError(f"{what} must be at least {low}, got {int(value)}.")
    return int(value)


class Studio:
    """A loaded pipeline and the output folder the page writes into."""

    def __init__(
        self,
        pipeline: Pipeline | str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        *,
        pipeline_dir: str | os.PathLike[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if isinstance(pipeline, Pipeline):
            self.pipe = pipeline
            self.pipeline_dir = Path(pipeline_dir) if pipeline_dir is not None else None
        else:
            self.pipe = Pipeline.from_pretrained(pipeline)
            self.pipeline_dir = Path(pipeline)
        self.out_dir = Path(out_dir).resolve()
        self.max_pixels = int(max_pixels)
        self._lock = threading.Lock()  # one draw at a time: the model is not re-entrant
        self._lpips: Any = None

    # -- what the page shows ------------------------------------------------------------------
    def inputs(self) -> dict[str, RawInput]:
        """The raw input each conditioner declares, by conditioner name (page order)."""
        return {name: cond.raw_input for name, cond in self.pipe.conditioners.items()}

    def default_size(self) -> tuple[int, int]:
        """The card's image size, else the smallest the tokenizer takes times 8."""
        size = self.pipe.card.get("image_size")
        if size is None:
            f = self.pipe.tokenizer.downsample
            return (8 * f, 8 * f)
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def trained_grid(self) -> tuple[int, int] | None:
        """The prior's trained code window; larger grids are drawn with the sliding window."""
        return self.pipe.prior.window_size

    # -- generating ---------------------------------------------------------------------------
    def sampler(self, req: GenerateRequest) -> SamplerConfig:
        """The pipeline's sampler with the request's settings (pydantic checks the values)."""
        fields = {
            "temperature": float(req.temperature),
            "top_k": int(req.top_k) if req.top_k else None,
            "top_p": float(req.top_p) if req.top_p is not None and req.top_p < 1.0 else None,
            "guidance_scale": float(req.guidance),
            "window": req.window,
        }
        return SamplerConfig(**{**self.pipe.sampler.model_dump(), **fields})

    def _next_folder(self, prefix: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        taken = [
            int(p.name.split("-")[-1])
            for p in self.out_dir.glob(f"{prefix}-*")
            if p.name.split("-")[-1].isdigit()
        ]
        return self.out_dir / f"{prefix}-{max(taken, default=0) + 1:04d}"

    def _condition_arg(
        self, name: str, spec: RawInput, value: ConditionValue, size: tuple[int, int], tmp: Path
    ) -> str:
        """One condition, written into the run folder as ``-c NAME=VALUE`` reads it."""
        count = spec.count or 0
        if value.file:
            if spec.kind in ("label_map", "image"):
                from latentgen.data.images import read_image

                image = read_image(value.file)  # DataError names an unreadable upload
                if spec.kind == "label_map" and image.mode in ("RGB", "RGBA"):
                    ids = label_map_from_colours(image, count)  # a colour-coded map
                    return save_condition(spec.kind, ids, tmp, name, count)
            return save_condition(spec.kind, value.file, tmp, name, count)
        if spec.kind == "label_map":
            # An untouched canvas is all class 0, as its label says (usually background).
            blank = np.zeros((*size, 4), np.uint8)
            painting = blank if value.painting is None else value.painting
            ids = label_map_from_painting(painting, count, size)
            return save_condition(spec.kind, ids, tmp, name, count)
        if spec.kind == "class" and value.choice is not None:
            return save_condition(spec.kind, value.choice, tmp, name)
        if value.text and value.text.strip():
            return save_condition(spec.kind, value.text, tmp, name)
        what = {
            "class": "choose a class",
            "image": "upload an image",
            "keypoints": "upload a keypoints JSON file or type the keypoints",
        }.get(spec.kind, "type a value (JSON)")
        raise InputError(f"condition '{name}' is empty: {what}.")

    def command_line(
        self, req: GenerateRequest, size: tuple[int, int], conds: Mapping[str, str]
    ) -> str:
        """The ``latentgen sample`` line that draws the same images as ``req``."""
        where = str(self.pipeline_dir) if self.pipeline_dir is not None else "PIPELINE_DIR"
        s = self.sampler(req)
        parts = ["latentgen", "sample", where, "-n", str(req.num_images), "--seed", str(req.seed)]
        parts += ["--size", f"{size[0]}x{size[1]}"]
        for name, value in conds.items():
            parts += ["-c", f"{name}={value}"]
        parts += ["--temperature", f"{s.temperature:g}"]
        if s.top_k is not None:
            parts += ["--top-k", str(s.top_k)]
        if s.top_p is not None:
            parts += ["--top-p", f"{s.top_p:g}"]
        parts += ["--guidance", f"{s.guidance_scale:g}", "--window", s.window, "-o", "samples.png"]
        return shlex.join(parts)

    def generate(
        self,
        req: GenerateRequest,
        on_code: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult:
        """Draw ``req`` into a new ``run-NNNN`` folder (atomically); raise ``LatentgenError``
        for bad input (the folder is then not written) and ``Cancelled`` on ``cancel``."""
        from latentgen.data.base import to_pil
        from latentgen.utils import image_grid

        n = _whole(req.num_images, "the number of images", 1)
        seed = _whole(req.seed, "the seed", 0)
        size = req.size or self.default_size()
        size = (_whole(size[0], "the height", 1), _whole(size[1], "the width", 1))
        pixels = n * size[0] * size[1]
        if pixels > self.max_pixels:
            raise InputError(
                f"{n} image(s) of {size[0]}x{size[1]} are {pixels:,} pixels, above this server's "
                f"limit of {self.max_pixels:,} (`latentgen serve --max-pixels`); ask for fewer "
                "or smaller images."
            )
        self.pipe.tokenizer.code_grid(size)  # the size error names the fix, before any work
        sampler = self.sampler(req)
        specs = self.inputs()
        missing = sorted(set(specs) - set(req.conditions))
        if missing:
            raise InputError(f"no value for condition(s) {missing}.")

        def report(done: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled: no images were written.")
            if on_code is not None:
                on_code(done, total)

        with self._lock:
            folder = self._next_folder("run")
            with atomic_directory(folder) as tmp:
                args = {
                    name: self._condition_arg(name, spec, req.conditions[name], size, tmp)
                    for name, spec in specs.items()
                }
                final = {k: v.replace(str(tmp), str(folder)) for k, v in args.items()}
                raw = {k: _read_arg(k, v) for k, v in args.items()}  # as `sample -c` reads them
                # What Pipeline.__call__ does, in two steps so that the codes are kept too.
                codes = self.pipe.sample_codes(
                    n,
                    size=size,
                    sampler=sampler,
                    generator=torch.Generator().manual_seed(seed),
                    on_code=report,
                    **raw,
                )
                images = to_pil(self.pipe.decode(codes))
                paths = []
                for i, im in enumerate(images):
                    im.save(tmp / f"sample-{i:03d}.png")
                    paths.append(folder / f"sample-{i:03d}.png")
                image_grid(images).save(tmp / "samples.png")
                np.save(tmp / "codes.npy", codes.cpu().numpy(), allow_pickle=False)
                command = self.command_line(req, size, final)
                settings = {**asdict(req), "conditions": final, "size": list(size)}
                settings["command"] = command
                (tmp / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
                (tmp / "command.txt").write_text(command + "\n")
        return GenerateResult(
            folder, paths, folder / "samples.png", folder / "codes.npy", command, size
        )

    # -- the tokenizer tab --------------------------------------------------------------------
    def inspect(self, path: str | os.PathLike[str]) -> InspectResult:
        """Encode and decode an uploaded image; write it, its reconstruction and its codes."""
        from latentgen.data.base import to_pil, to_tensor
        from latentgen.data.images import read_image
        from latentgen.metrics.codebook import code_counts, usage_stats
        from latentgen.metrics.image import psnr

        tok = self.pipe.tokenizer
        image = read_image(path, mode="RGB" if tok.in_channels == 3 else "L")
        f = tok.downsample
        w, h = image.size
        ch, cw = h // f * f, w // f * f
        if ch == 0 or cw == 0:
            raise InputError(
                f"the image is {w}x{h} pixels, smaller than one code ({f}x{f}); upload a larger "
                "image."
            )
        if ch * cw > self.max_pixels:
            raise InputError(
                f"the image is {cw}x{ch} = {cw * ch:,} pixels, above this server's limit of "
                f"{self.max_pixels:,} (`latentgen serve --max-pixels`); upload a smaller image."
            )
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))  # a whole number of codes
        x = to_tensor(image)[None]  # [1, C, H, W] in [-1, 1]
        with self._lock:
            codes = self.pipe.encode(x)  # [1, h, w]
            recon = self.pipe.decode(codes).cpu().clamp(-1, 1)  # [1, C, H, W]
        counts = code_counts(codes, tok.vocab_size)
        stats = usage_stats(counts)
        metrics: dict[str, Any] = {
            "size": [ch, cw],
            "code_grid": [int(codes.shape[1]), int(codes.shape[2])],
            "psnr_db": _finite(float(psnr(recon, x)[0]), 3),
            "lpips": self._lpips_of(recon, x),
            "distinct_codes": int((counts > 0).sum()),
            "codebook_size": int(tok.vocab_size),
            "codebook_usage": round(stats["usage"], 6),
            "code_perplexity": round(stats["perplexity"], 3),
        }
        with self._lock:
            folder = self._next_folder("tokenize")
            with atomic_directory(folder) as tmp:
                image.save(tmp / "original.png")
                to_pil(recon)[0].save(tmp / "reconstruction.png")
                code_picture(codes[0].cpu().numpy(), f).save(tmp / "code-grid.png")
                np.save(tmp / "codes.npy", codes.cpu().numpy(), allow_pickle=False)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return InspectResult(
            folder,
            folder / "original.png",
            folder / "reconstruction.png",
            folder / "code-grid.png",
            folder / "codes.npy",
            metrics,
        )

    def _lpips_of(self, x: torch.Tensor, y: torch.Tensor) -> float | str:
        """LPIPS of the pair, or why it is not shown (no weights here, or too small an image)."""
        from latentgen.errors import WeightsNotFoundError
        from latentgen.metrics.lpips import LPIPS

        if min(x.shape[-2:]) < 16:
            return "n/a: LPIPS needs images of at least 16x16"
        try:
            if self._lpips is None:
                self._lpips = LPIPS.from_pretrained()
            with torch.no_grad():
                return round(float(self._lpips(x.float(), y.float())[0]), 4)
        except (WeightsNotFoundError, DataError) as e:
            return f"n/a: {e}"


def _finite(value: float, digits: int) -> float | str:
    """A rounded float, or "inf" (JSON has no infinity; a perfect reconstruction has it)."""
    return round(value, digits) if math.isfinite(value) else "inf"


def _read_arg(name: str, value: str) -> Any:
    """``-c NAME=VALUE``'s VALUE as the command line reads it (files included)."""
    from latentgen.condition_args import parse_condition

    try:
        return parse_condition(value)
    except InputError as e:
        raise InputError(f"condition '{name}': {e}") from None


def code_picture(codes: np.ndarray[Any, Any], scale: int) -> Any:
    """Codes ``[h, w]`` -> an RGB picture, one colour per code index, each code ``scale`` px."""
    from PIL import Image

    uniq, inverse = np.unique(codes, return_inverse=True)
    colours = np.asarray([_code_colour(int(c)) for c in uniq], dtype=np.uint8)  # [U, 3]
    rgb = colours[inverse.reshape(codes.shape)]  # [h, w, 3]
    return Image.fromarray(rgb).resize(
        (codes.shape[1] * scale, codes.shape[0] * scale), Image.Resampling.NEAREST
    )


def _code_colour(index: int) -> tuple[int, int, int]:
    """A colour for a code index: golden-ratio hues, so neighbouring indices differ."""
    import colorsys

    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.35 + 0.15 * (index % 3), 0.85)
    return (round(r * 255), round(g * 255), round(b * 255))
