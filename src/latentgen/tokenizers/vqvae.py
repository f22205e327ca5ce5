"""VQ-VAE tokenizer: CNN encoder, vector quantizer, CNN decoder, pixel reconstruction loss.

"Neural Discrete Representation Learning" (van den Oord et al. 2017,
https://arxiv.org/abs/1711.00937), with the encoder/decoder of "Taming Transformers"
(https://arxiv.org/abs/2012.09841). ``VQAutoencoder`` holds everything VQ-VAE and VQGAN share
(networks, quantizer, encode/decode, reconstruction + codebook loss, the training protocol
of ``TrainableTokenizer``); ``VQGAN`` in ``vqgan.py`` adds the perceptual and adversarial terms
on top.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentgen.errors import SpecError
from latentgen.specs import ComponentConfig, component_field
from latentgen.tokenizers.base import TokenizerOutput, TrainableTokenizer
from latentgen.tokenizers.losses import reconstruction_loss
from latentgen.tokenizers.networks import Decoder, Encoder
from latentgen.tokenizers.quantizers.base import Quantizer

__all__ = ["VQVAE", "AutoencoderConfig", "VQAutoencoder", "VQVAEConfig"]

_TAMING = "https://arxiv.org/abs/2012.09841"


def _default_quantizer() -> dict[str, Any]:
    return {"type": "vq", "codebook_size": 1024, "dim": 256}


class AutoencoderConfig(ComponentConfig):
    """Fields shared by the ``vqvae`` and ``vqgan`` configs (not registered by itself).

    The defaults are taming-transformers' ImageNet f16 model with 1024 codes.
    """

    in_channels: int = Field(
        3, ge=1, description="Image channels (3 for RGB; e.g. the class count for one-hot maps)."
    )
    resolution: int = Field(
        256,
        ge=1,
        description="Nominal training image size; `attn_resolutions` refer to it. Other sizes "
        "that are multiples of the downsample factor also run, with attention at the same "
        "levels.",
    )
    ch: int = Field(128, ge=1, description="Base channel count of encoder and decoder.")
    ch_mult: tuple[int, ...] = Field(
        (1, 1, 2, 2, 4),
        min_length=1,
        description="Channel multiplier per resolution level; the downsample factor is "
        f"f = 2**(len(ch_mult) - 1). See {_TAMING}.",
    )
    num_res_blocks: int = Field(2, ge=1, description="ResNet blocks per level (decoder: +1).")
    attn_resolutions: tuple[int, ...] = Field(
        (16,),
        description="Feature-map sizes (at `resolution`) with self-attention after each ResNet "
        "block; must be among resolution / 2**i. The middle always has one attention block.",
    )
    z_channels: int = Field(256, ge=1, description="Channels of the encoder output.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside ResNet blocks.")
    norm_groups: int = Field(
        32,
        ge=1,
        description="GroupNorm groups; narrow layers use gcd(norm_groups, channels) groups.",
    )
    quantizer: component_field("quantizer") = Field(  # type: ignore[valid-type]
        default_factory=_default_quantizer,
        validate_default=True,
        description="Quantizer config (a registered quantizer type, e.g. 'vq', 'ema', "
        "'gumbel', 'fsq'). quant_conv maps z_channels to its `dim`.",
    )
    recon_loss: Literal["l1", "l2", "cross_entropy"] = Field(
        "l1",
        description="Pixel reconstruction loss: 'l1' (taming) or 'l2' (VQ-VAE paper); "
        "'cross_entropy' for one-hot maps (a segmentation cond-stage tokenizer), where the "
        "decoder's output is the logits over in_channels classes.",
    )
    codebook_weight: float = Field(
        1.0, ge=0.0, description="Weight of the quantizer's loss (codebook + commitment, KL)."
    )
    channels_last: bool = Field(
        False,
        description="Run convolutions in channels-last memory format (faster on some "
        "hardware; results equal up to float rounding).",
    )

    @property
    def downsample(self) -> int:
        """The spatial factor f = 2**(len(ch_mult) - 1)."""
        return int(2 ** (len(self.ch_mult) - 1))

    @model_validator(mode="after")
    def _check_architecture(self) -> AutoencoderConfig:
        f = self.downsample
        if self.resolution % f:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the downsample factor {f} "
                f"(from ch_mult={list(self.ch_mult)}); use e.g. {max(f, self.resolution // f * f)}."
            )
        levels = [self.resolution // 2**i for i in range(len(self.ch_mult))]
        bad = [r for r in self.attn_resolutions if r not in levels]
        if bad:
            raise ValueError(
                f"attn_resolutions {list(bad)} match no level: with resolution {self.resolution} "
                f"and {len(self.ch_mult)} levels the feature maps are {levels}. Pick from those."
            )
        return self


class VQVAEConfig(AutoencoderConfig):
    """Config of the ``vqvae`` tokenizer (https://arxiv.org/abs/1711.00937)."""

    type: Literal["vqvae"] = "vqvae"


class VQAutoencoder(TrainableTokenizer):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder, plus training losses.

    The shared body of ``VQVAE`` and ``VQGAN``; subclasses add loss terms by overriding
    ``_nll_loss`` (terms that enter the adaptive GAN weight) and ``_generator_terms``.

    Attributes (state-dict prefixes, as in taming-transformers): ``encoder``, ``quant_conv``,
    ``quantizer``, ``post_quant_conv``, ``decoder``.
    """

    config: AutoencoderConfig

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        from latentgen import registry  # lazy: the registry loads plugins, which import us

        net: dict[str, Any] = dict(
            ch=config.ch,
            ch_mult=config.ch_mult,
            num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions,
            z_channels=config.z_channels,
            resolution=config.resolution,
            dropout=config.dropout,
            num_groups=config.norm_groups,
        )
        self.encoder = Encoder(in_channels=config.in_channels, **net)
        quantizer = registry.build(config.quantizer)
        if not isinstance(quantizer, Quantizer):
            raise SpecError(
                f"quantizer type {config.quantizer.type!r} built a {type(quantizer).__name__}, "
                "not a latentgen Quantizer; register a Quantizer subclass under that type."
            )
        self.quantizer: Quantizer = quantizer
        self.quant_conv = nn.Conv2d(config.z_channels, quantizer.dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(quantizer.dim, config.z_channels, kernel_size=1)
        self.decoder = Decoder(out_channels=config.in_channels, **net)
        if config.channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    # -- contract ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def in_channels(self) -> int:
        return int(self.config.in_channels)

    def _latents(self, images: Tensor) -> Tensor:
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.quant_conv(self.encoder(images))  # [B, D, h, w]

    def _decode_latents(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))  # [B, C, H, W]

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> codes ``[B, H/f, W/f]`` (no gradient)."""
        self.check_images(images)
        return self.quantizer(self._latents(images)).indices

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, h, w]`` -> images ``[B, C, h*f, w*f]`` in about [-1, 1]."""
        self.check_codes(codes)
        z_q = self.quantizer.embed(codes.long())  # [B, D, h, w]
        if self.config.channels_last:
            z_q = z_q.contiguous(memory_format=torch.channels_last)
        return self._decode_latents(z_q)

    def forward(self, images: Tensor) -> TokenizerOutput:
        """Training pass: reconstruction, codes, the quantizer loss and its statistics."""
        self.check_images(images)
        q = self.quantizer(self._latents(images))
        recon = self._decode_latents(q.z_q)
        return TokenizerOutput(recon=recon, codes=q.indices, quant_loss=q.loss, stats=q.stats)

    # -- training protocol (TrainableTokenizer) ------------------------------------------------
    def generator_loss(
        self, images: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float], TokenizerOutput]:
        """Total autoencoder loss at training ``step``, scalar logs, and the forward output."""
        out = self(images)
        loss, logs = self._generator_terms(images, out, step)
        logs["total_loss"] = float(loss.detach())
        logs.update(out.stats)
        return loss, logs, out

    def _nll_loss(self, images: Tensor, recon: Tensor, logs: dict[str, float]) -> Tensor:
        """Reconstruction terms (the ones the adaptive GAN weight balances against)."""
        rec = reconstruction_loss(images, recon, self.config.recon_loss)
        logs["rec_loss"] = float(rec.detach())
        return rec

    def _generator_terms(
        self, images: Tensor, out: TokenizerOutput, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction + weighted quantizer loss, and their logs."""
        logs: dict[str, float] = {}
        nll = self._nll_loss(images, out.recon, logs)
        quant = out.quant_loss.mean()
        logs["quant_loss"] = float(quant.detach())
        return nll + self.config.codebook_weight * quant, logs


class VQVAE(VQAutoencoder):
    """VQ-VAE tokenizer trained with an L1/L2 reconstruction and the quantizer's loss.

    "Neural Discrete Representation Learning", https://arxiv.org/abs/1711.00937. The
    networks are those of VQGAN (https://arxiv.org/abs/2012.09841), so a VQ-VAE can be
    fine-tuned into a VQGAN by loading its weights into a ``vqgan`` config with the same
    architecture.

    Args:
        config: a ``VQVAEConfig``.
    """

    Config = VQVAEConfig
    config: VQVAEConfig

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__(config)
