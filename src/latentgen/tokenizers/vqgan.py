"""VQGAN tokenizer: the VQ autoencoder trained with LPIPS and a PatchGAN discriminator.

"Taming Transformers for High-Resolution Image Synthesis" (Esser, Rombach, Ommer 2021,
https://arxiv.org/abs/2012.09841). Compared with a VQ-VAE, the decoder is also trained to fool
a patch discriminator, with the adversarial term scaled by an adaptive weight (the ratio of
reconstruction and GAN gradient norms at the decoder's last layer), and pixel loss is joined by
a perceptual (LPIPS) loss. That lets the codes stay few (f=16) while reconstructions stay sharp.

Published architectures as configs (taming-transformers' model.yaml files)::

    # ImageNet f16, 1024 codes (also 16384: codebook_size=16384)
    {"type": "vqgan", "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
     "attn_resolutions": [16], "z_channels": 256, "resolution": 256,
     "quantizer": {"type": "vq", "codebook_size": 1024, "dim": 256}}
    # Gumbel f8, 8192 codes
    {"type": "vqgan", "ch": 128, "ch_mult": [1, 1, 2, 4], "num_res_blocks": 2,
     "attn_resolutions": [32], "z_channels": 256, "resolution": 256,
     "quantizer": {"type": "gumbel", "codebook_size": 8192, "dim": 256}}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentgen.tokenizers.base import TokenizerOutput
from latentgen.tokenizers.discriminator import NLayerDiscriminator
from latentgen.tokenizers.losses import (
    PerceptualLoss,
    adaptive_weight_from_grads,
    d_loss,
    g_loss,
    gan_weight_ramp,
)
from latentgen.tokenizers.vqvae import AutoencoderConfig, VQAutoencoder

__all__ = ["VQGAN", "VQGANConfig"]


class VQGANConfig(AutoencoderConfig):
    """Config of the ``vqgan`` tokenizer (https://arxiv.org/abs/2012.09841).

    Architecture fields are shared with ``vqvae``; the ones below shape the training loss.
    """

    type: Literal["vqgan"] = "vqgan"

    perceptual_weight: float = Field(
        1.0,
        ge=0.0,
        description="Weight of the LPIPS perceptual loss (https://arxiv.org/abs/1801.03924); "
        "0 turns it off and LPIPS weights are then never loaded.",
    )
    lpips_trunk_path: str | None = Field(
        None,
        description="VGG16 trunk weights for LPIPS (see latentgen.metrics.lpips); None searches "
        "the cache and installed packages.",
    )
    lpips_heads_path: str | None = Field(
        None,
        description="LPIPS linear-head weights; None searches the cache and installed packages.",
    )
    disc_weight: float = Field(
        0.8,
        ge=0.0,
        description="Scale of the adaptive adversarial weight lambda (0.8 in the published "
        "ImageNet configs); 0 trains without the GAN term.",
    )
    disc_start: int = Field(
        10_000,
        ge=0,
        description="Training step at which the discriminator and GAN loss switch on "
        "(taming: 250001 for ImageNet). Before it the discriminator is not even run.",
    )
    disc_warmup_steps: int = Field(
        1_000,
        ge=0,
        description="Steps over which the GAN terms ramp linearly from 0 to full weight after "
        "disc_start; 0 switches them on at once, as in the reference code.",
    )
    disc_loss: Literal["hinge", "vanilla"] = Field(
        "hinge", description="Adversarial loss: 'hinge' (taming default) or 'vanilla' (softplus)."
    )
    disc_num_layers: int = Field(
        3, ge=1, le=8, description="Stride-2 layers of the PatchGAN (3 gives 70x70 patches)."
    )
    disc_ndf: int = Field(64, ge=1, description="Filters of the discriminator's first layer.")
    disc_in_channels: int | None = Field(
        None,
        ge=1,
        description="Channels the discriminator takes; None means in_channels (the only value "
        "an unconditional discriminator accepts, kept for taming configs).",
    )
    disc_norm: Literal["batch", "actnorm"] = Field(
        "batch", description="Normalization in the discriminator (taming's use_actnorm)."
    )

    @model_validator(mode="after")
    def _check_channels(self) -> VQGANConfig:
        if self.perceptual_weight > 0 and self.in_channels not in (1, 3):
            raise ValueError(
                f"perceptual_weight={self.perceptual_weight} needs RGB or grayscale images, but "
                f"in_channels={self.in_channels}: LPIPS runs a VGG16 trained on RGB. Set "
                "perceptual_weight to 0 for other inputs (e.g. one-hot segmentation maps)."
            )
        if self.disc_in_channels is not None and self.disc_in_channels != self.in_channels:
            raise ValueError(
                f"disc_in_channels={self.disc_in_channels} differs from in_channels="
                f"{self.in_channels}; the discriminator judges images and reconstructions, so "
                "set disc_in_channels to in_channels or leave it out."
            )
        return self


class VQGAN(VQAutoencoder):
    """VQGAN tokenizer: VQ autoencoder + LPIPS + PatchGAN with adaptive weight and ramp.

    Generator objective (eq. 4-7 of https://arxiv.org/abs/2012.09841)::

        L = L1 + w_p * LPIPS + w_cb * L_quant + disc_weight * lambda * ramp(step) * L_G

    ``lambda`` is ``adaptive_weight`` at ``decoder.conv_out.weight``; ``ramp`` is 0 before
    ``disc_start`` and rises linearly over ``disc_warmup_steps``. The discriminator is part of
    the module (its weights are saved with the tokenizer) but ``encode``/``decode``/``forward``
    never run it.

    Args:
        config: a ``VQGANConfig``.
    """

    Config = VQGANConfig
    config: VQGANConfig

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__(config)
        self.discriminator = NLayerDiscriminator(
            in_channels=config.in_channels,
            ndf=config.disc_ndf,
            n_layers=config.disc_num_layers,
            norm=config.disc_norm,
        )
        if config.channels_last:
            self.discriminator.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # Built on first use only, and kept out of the state dict (see PerceptualLoss).
        self._perceptual = PerceptualLoss(config.lpips_trunk_path, config.lpips_heads_path)

    has_discriminator = True

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters of the PatchGAN discriminator."""
        return list(self.discriminator.parameters())

    def gan_weight(self, step: int) -> float:
        """The ramp factor on both GAN losses at ``step``."""
        return gan_weight_ramp(step, self.config.disc_start, self.config.disc_warmup_steps)

    def _nll_loss(self, images: Tensor, recon: Tensor, logs: dict[str, float]) -> Tensor:
        nll = super()._nll_loss(images, recon, logs)
        if self.config.perceptual_weight > 0:
            p = self._perceptual(images, recon)
            logs["p_loss"] = float(p.detach())
            nll = nll + self.config.perceptual_weight * p
        return nll

    def _scored(self, recon: Tensor) -> Tensor:
        """Generator GAN loss of ``recon``; the discriminator is frozen for this pass.

        Freezing keeps its weights out of the graph, so the generator's backward neither
        computes nor leaves gradients on them.
        """
        frozen = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            return g_loss(self.config.disc_loss, self.discriminator(recon))
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _generator_terms(
        self, images: Tensor, out: TokenizerOutput, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        ramp = self.gan_weight(step)
        recon = out.recon
        if ramp == 0.0 or self.config.disc_weight == 0.0:
            # Before disc_start the GAN term is multiplied by 0 anyway: skip the discriminator.
            loss, terms = super()._generator_terms(images, out, step)
            terms["gan_weight"] = ramp
            return loss, terms
        if not recon.requires_grad:
            # No graph (evaluation under no_grad): the adaptive weight cannot be measured; log
            # the GAN loss but leave it out of the total, as the reference does.
            loss, terms = super()._generator_terms(images, out, step)
            terms.update(gan_weight=ramp, g_loss=float(self._scored(recon).detach()), d_weight=0.0)
            return loss, terms

        # The reconstruction and GAN terms depend on the parameters only through `recon`. So
        # their gradients w.r.t. `recon` are taken once, on a detached copy, and everything
        # else follows from them: the adaptive weight needs only the decoder's last layer
        # (two cheap vector-Jacobian products through conv_out), and the total backward enters
        # the decoder with g_nll + lambda * g_gan. Differentiating the losses at the last layer
        # directly, as the reference does, would run LPIPS's and the discriminator's backward
        # twice. The gradients are the same (test_vqgan checks it).
        logs: dict[str, float] = {"gan_weight": ramp}
        # An fp32 leaf keeps the per-pixel gradients (about 1/numel each) out of fp16's
        # subnormal range under autocast; the loss scaler only scales the final backward.
        leaf = recon.detach().float().requires_grad_(True)
        nll = self._nll_loss(images, leaf, logs)
        gen = self._scored(leaf)
        (g_nll,) = torch.autograd.grad(nll, leaf)  # [B, C, H, W]
        (g_gan,) = torch.autograd.grad(gen, leaf)
        last = self.decoder.last_layer
        # Vector-Jacobian products through conv_out only, in recon's dtype like any backward.
        (w_nll,) = torch.autograd.grad(recon, last, g_nll.to(recon.dtype), retain_graph=True)
        (w_gan,) = torch.autograd.grad(recon, last, g_gan.to(recon.dtype), retain_graph=True)
        lam = adaptive_weight_from_grads(w_nll, w_gan) * self.config.disc_weight
        scale = lam * ramp
        quant = out.quant_loss.mean()
        # Value: the true loss. Gradient: exactly that of nll + scale * gen through `recon`.
        through_recon = (recon.float() * (g_nll + scale * g_gan)).sum()
        value = nll.detach() + scale * gen.detach()
        loss = (
            value + (through_recon - through_recon.detach()) + self.config.codebook_weight * quant
        )
        logs["quant_loss"] = float(quant.detach())
        logs["g_loss"] = float(gen.detach())
        logs["d_weight"] = float(lam)
        return loss, logs

    def discriminator_loss(
        self, images: Tensor, recon: Tensor, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """PatchGAN loss on real ``images`` vs detached ``recon``, scaled by the GAN ramp."""
        ramp = self.gan_weight(step)
        if ramp == 0.0:
            # Nothing to learn yet; a zero leaf that requires grad lets the trainer call
            # backward() and step as usual (the optimizer skips parameters without gradients).
            zero = images.new_zeros((), requires_grad=True)
            return zero, {"disc_loss": 0.0, "gan_weight": 0.0}
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(recon.detach())
        loss = ramp * d_loss(self.config.disc_loss, logits_real, logits_fake)
        logs = {
            "disc_loss": float(loss.detach()),
            "logits_real": float(logits_real.detach().mean()),
            "logits_fake": float(logits_fake.detach().mean()),
            "gan_weight": ramp,
        }
        return loss, logs
