"""The Tokenizer contract: image [B,C,H,W] in [-1,1] <-> codes [B,h,w] in [0, vocab_size)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from latentgen.components import Component
from latentgen.errors import InputError

__all__ = [
    "Tokenizer",
    "TokenizerOutput",
    "TrainableTokenizer",
    "training_protocol_error",
]


@dataclass
class TokenizerOutput:
    """What ``Tokenizer.forward`` returns during training.

    Attributes:
        recon: reconstruction ``[B, C, H, W]``.
        codes: code indices ``[B, h, w]`` (long).
        quant_loss: scalar quantizer loss (codebook + commitment, KL, ...), 0 when none.
        stats: scalar diagnostics for logging (perplexity, usage, ...).
    """

    recon: Tensor
    codes: Tensor
    quant_loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)


class Tokenizer(Component, nn.Module, ABC):
    """Stage 1: turns images into a grid of discrete codes and back.

    Subclasses set ``Config``, implement ``encode``/``decode`` and the three properties, and call
    ``self.check_images(images)`` first thing in ``encode``/``forward`` so bad input fails with a
    clear message instead of a shape error deep inside a convolution.
    """

    kind: ClassVar[str] = "tokenizer"
    #: Whether images outside [-1, 1] are refused (set False for unbounded inputs, e.g. depth).
    check_value_range: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config

    # -- the contract -------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct codes K; codes lie in ``[0, K)``."""

    @property
    @abstractmethod
    def downsample(self) -> int:
        """Spatial factor f: an ``H x W`` image becomes an ``H/f x W/f`` code grid."""

    @property
    @abstractmethod
    def in_channels(self) -> int:
        """Channels of the images this tokenizer takes (3 for RGB)."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` float in [-1, 1] -> codes ``[B, H/f, W/f]`` long."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, h, w]`` long -> images ``[B, C, h*f, w*f]`` float in about [-1, 1]."""

    def forward(self, images: Tensor) -> TokenizerOutput:
        """Training pass; the default is encode then decode with no quantizer loss."""
        codes = self.encode(images)
        recon = self.decode(codes)
        return TokenizerOutput(recon=recon, codes=codes, quant_loss=recon.new_zeros(()))

    # -- shared helpers ------------------------------------------------------------------------
    def code_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The code grid ``(h, w)`` of an image of ``size=(H, W)``; raises if f does not divide."""
        h, w = size
        f = self.downsample
        if h <= 0 or w <= 0 or h % f or w % f:
            raise InputError(
                f"image size {h}x{w} does not fit {type(self).__name__}: height and width must be "
                f"positive multiples of its downsample factor {f}. Resize or crop to e.g. "
                f"{max(f, h // f * f)}x{max(f, w // f * f)}."
            )
        return h // f, w // f

    def check_images(self, images: Tensor) -> None:
        """Raise an ``InputError`` naming the fix for a batch this tokenizer cannot take."""
        if not isinstance(images, Tensor):
            raise InputError(
                f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}. "
                "Use latentgen.data.to_tensor for PIL images or numpy arrays."
            )
        if images.dim() != 4:
            raise InputError(
                f"images must have 4 dims [B, C, H, W], got shape {tuple(images.shape)}. "
                "Add a batch dim with images.unsqueeze(0)."
            )
        if not images.is_floating_point():
            raise InputError(
                f"images must be floating point in [-1, 1], got dtype {images.dtype}. "
                "Convert uint8 with images.float() / 127.5 - 1."
            )
        if images.shape[1] != self.in_channels:
            raise InputError(
                f"{type(self).__name__} takes {self.in_channels}-channel images, got "
                f"{images.shape[1]} channels (shape {tuple(images.shape)})."
            )
        self.code_grid((int(images.shape[2]), int(images.shape[3])))
        if self.check_value_range and images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise InputError(
                    f"image values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]. Scale [0, 1] "
                    "images with x * 2 - 1 and uint8 images with x / 127.5 - 1."
                )

    def check_codes(self, codes: Tensor) -> None:
        """Raise an ``InputError`` for codes that are not ``[B, h, w]`` long in ``[0, K)``."""
        _check_codes(codes, self.vocab_size, type(self).__name__)


class TrainableTokenizer(Tokenizer):
    """A tokenizer that ``latentgen train tokenizer`` (``TokenizerTask``) can train.

    Each training step calls ``generator_loss`` and steps ``generator_parameters()``; when
    ``has_discriminator`` is True it then calls ``discriminator_loss`` on the step's detached
    reconstructions and steps ``discriminator_parameters()``, as in Taming Transformers
    (https://arxiv.org/abs/2012.09841, sec. 3.2). A tokenizer fitted some other way (k-means,
    no gradients) subclasses ``Tokenizer`` instead and is not trained by ``latentgen train``.

    Implement ``generator_loss``; with a discriminator also set ``has_discriminator`` and
    implement ``discriminator_parameters`` and ``discriminator_loss``.
    """

    #: Whether a discriminator is trained in turn with the generator (VQGAN); False: none.
    has_discriminator: bool = False

    @abstractmethod
    def generator_loss(
        self, images: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float], TokenizerOutput]:
        """Scalar loss of the autoencoder at training ``step``, scalar logs, the forward output.

        ``images`` are ``[B, C, H, W]`` in [-1, 1]; the loss must be differentiable w.r.t.
        ``generator_parameters()``.
        """

    def generator_parameters(self) -> list[nn.Parameter]:
        """Parameters the generator optimizer steps: all but ``discriminator_parameters()``."""
        disc = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in disc]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters the discriminator optimizer steps (none without a discriminator)."""
        return []

    def discriminator_loss(
        self, images: Tensor, recon: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of the discriminator on real ``images`` vs detached ``recon``, and logs."""
        raise NotImplementedError(
            f"{type(self).__name__} has no discriminator; check `has_discriminator` before "
            "calling discriminator_loss, or use a tokenizer that trains one (e.g. 'vqgan')."
        )


def training_protocol_error(tokenizer: Tokenizer) -> str | None:
    """Why ``tokenizer`` cannot be trained by ``latentgen train tokenizer``, or None if it can."""
    name = type(tokenizer).__name__
    kind = getattr(getattr(tokenizer, "config", None), "type", "?")
    if not isinstance(tokenizer, TrainableTokenizer):
        return (
            f"{name} (tokenizer type {kind!r}) cannot be trained by `latentgen train tokenizer`: "
            "it is not a latentgen.tokenizers.base.TrainableTokenizer. Subclass "
            "TrainableTokenizer and implement generator_loss(images, step) -> (loss, logs, "
            "TokenizerOutput), or fit it outside the trainer."
        )
    overridden = type(tokenizer).discriminator_loss is not TrainableTokenizer.discriminator_loss
    if tokenizer.has_discriminator and not overridden:
        return (
            f"{name}.has_discriminator is True but it does not implement "
            "discriminator_loss(images, recon, step) -> (loss, logs); implement it (and "
            "discriminator_parameters()) or set has_discriminator to False."
        )
    if tokenizer.has_discriminator and not tokenizer.discriminator_parameters():
        return (
            f"{name}.has_discriminator is True but discriminator_parameters() is empty; return "
            "the discriminator's parameters or set has_discriminator to False."
        )
    return None


def _check_codes(codes: Tensor, vocab_size: int, owner: str) -> None:
    if not isinstance(codes, Tensor) or codes.dim() != 3:
        shape = tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
        raise InputError(f"codes must be a tensor [B, h, w], got {shape}.")
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"codes must be integers (torch.long), got dtype {codes.dtype}.")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= vocab_size:
            raise InputError(
                f"codes must lie in [0, {vocab_size}) for {owner}, got values in [{lo}, {hi}]. "
                "Were they made by a tokenizer with another codebook size?"
            )
