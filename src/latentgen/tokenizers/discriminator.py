"""PatchGAN discriminator of pix2pix, as used by VQGAN's adversarial loss.

"Image-to-Image Translation with Conditional Adversarial Networks" (Isola et al. 2017,
https://arxiv.org/abs/1611.07004): a stack of stride-2 4x4 convolutions whose output is a map of
logits, one per overlapping patch, so the discriminator judges local texture rather than the
whole image. VQGAN (https://arxiv.org/abs/2012.09841) trains its decoder against it.

The layer list is one ``nn.Sequential`` called ``main`` with the same indices as the reference
implementations, so taming-transformers' ``loss.discriminator.main.*`` weights load unchanged.

Its normalization layers change state in training forwards (BatchNorm's running statistics,
ActNorm's data-dependent init); both are ``StagedState`` modules, so a step that the trainer's
NaN guard skips leaves them as they were.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from latentgen.staged_state import StagedState

__all__ = ["ActNorm", "NLayerDiscriminator", "StagedBatchNorm2d", "weights_init"]


class StagedBatchNorm2d(nn.BatchNorm2d, StagedState):
    """``nn.BatchNorm2d`` whose running statistics roll back when the trainer skips a step.

    The update happens inside ``F.batch_norm``, so the old statistics (three small per-channel
    tensors) are remembered before the first training forward of a step.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.remember("running_mean", "running_var", "num_batches_tracked")
        return super().forward(x)


class ActNorm(nn.Module, StagedState):
    """Per-channel affine layer initialised from the first training batch (Glow's ActNorm).

    "Glow: Generative Flow with Invertible 1x1 Convolutions" (Kingma & Dhariwal 2018,
    https://arxiv.org/abs/1807.03039). On the first forward pass in training mode, ``loc`` and
    ``scale`` are set so that batch's output has zero mean and unit variance per channel; the
    ``initialized`` buffer records that this happened (it is saved with the weights). The init
    is staged (``StagedState``): a batch the trainer skips does not initialise the layer.
    An alternative to BatchNorm whose output does not depend on the rest of the batch.
    """

    initialized: Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not bool(self.staged("initialized")):
            with torch.no_grad():
                flat = x.transpose(0, 1).flatten(1)  # [C, B*H*W]
                self.stage("loc", -flat.mean(1).view_as(self.loc))
                self.stage("scale", 1.0 / (flat.std(1).view_as(self.scale) + 1e-6))
                self.stage("initialized", torch.ones_like(self.initialized))
        return self.current("scale") * (x + self.current("loc"))


def weights_init(module: nn.Module) -> None:
    """pix2pix initialisation: conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``[B, C, H, W]`` images -> ``[B, 1, H', W']`` real/fake logits per patch.

    With ``n_layers=3`` each logit sees a 70x70 patch. Convolutions are 4x4 with LeakyReLU(0.2);
    the first has no normalization, the following ones are followed by BatchNorm (or ActNorm)
    and have no bias, as in pix2pix.

    Args:
        in_channels: channels of the images judged.
        ndf: filters of the first layer; layer ``n`` has ``ndf * min(2**n, 8)``.
        n_layers: number of stride-2 layers.
        norm: "batch" (pix2pix, taming default) or "actnorm" (taming's ``use_actnorm``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: Literal["batch", "actnorm"] = "batch",
    ) -> None:
        super().__init__()

        def norm_layer(c: int) -> nn.Module:
            return StagedBatchNorm2d(c) if norm == "batch" else ActNorm(c)

        # BatchNorm has its own shift, so the conv before it needs no bias; ActNorm's loc is a
        # per-channel shift too, but the reference keeps the conv bias there, and so do we.
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            # The last of these keeps the resolution (stride 1) and only widens the receptive
            # field; the others halve it.
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(
                    ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=bias
                ),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # [B, 1, H', W']
