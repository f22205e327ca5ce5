"""Training losses of stage-1 tokenizers: reconstruction, perceptual, adversarial.

VQGAN's generator objective ("Taming Transformers", https://arxiv.org/abs/2012.09841, eq. 4-7):

    L = L_rec + w_p * LPIPS + w_cb * L_quant + lambda * ramp(step) * L_G

with the adaptive weight ``lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + delta)`` taken at
the decoder's last layer ``G_L``, so the adversarial term never swamps reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.errors import SpecError

__all__ = [
    "PerceptualLoss",
    "adaptive_weight",
    "adaptive_weight_from_grads",
    "d_loss",
    "g_loss",
    "gan_weight_ramp",
    "hinge_d_loss",
    "hinge_g_loss",
    "reconstruction_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]

ReconstructionKind = Literal["l1", "l2", "cross_entropy"]
GanKind = Literal["hinge", "vanilla"]


def reconstruction_loss(images: Tensor, recon: Tensor, kind: ReconstructionKind = "l1") -> Tensor:
    """Mean absolute ("l1") or squared ("l2") error over all pixels and channels.

    "cross_entropy" is the categorical loss of one-hot maps (the paper's segmentation
    cond-stage): ``images`` are one-hot ``[B, C, H, W]``, ``recon`` the logits over the C classes.
    """
    if kind == "cross_entropy":
        return F.cross_entropy(recon, images.argmax(1))  # target [B, H, W] class ids
    if kind == "l1":
        return F.l1_loss(recon, images)
    if kind == "l2":
        return F.mse_loss(recon, images)
    raise SpecError(f"reconstruction loss must be 'l1', 'l2' or 'cross_entropy', got {kind!r}.")


# -- adversarial losses --------------------------------------------------------------------------
def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ``(relu(1 - D(x)) + relu(1 + D(x^)))/2`` (arXiv 1705.02894)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Original GAN discriminator loss, binary cross-entropy on logits via softplus."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Hinge generator loss ``-D(x^)`` (what taming uses for both discriminator losses)."""
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(x^))`` (Goodfellow et al. 2014)."""
    return F.softplus(-logits_fake).mean()


_D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
}
_G_LOSSES: dict[str, Callable[[Tensor], Tensor]] = {
    "hinge": hinge_g_loss,
    "vanilla": vanilla_g_loss,
}


def d_loss(kind: GanKind, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss of ``kind`` ("hinge" or "vanilla")."""
    if kind not in _D_LOSSES:
        raise SpecError(f"disc_loss must be one of {sorted(_D_LOSSES)}, got {kind!r}.")
    return _D_LOSSES[kind](logits_real, logits_fake)


def g_loss(kind: GanKind, logits_fake: Tensor) -> Tensor:
    """Generator loss matching discriminator loss ``kind`` ("hinge" or "vanilla")."""
    if kind not in _G_LOSSES:
        raise SpecError(f"disc_loss must be one of {sorted(_G_LOSSES)}, got {kind!r}.")
    return _G_LOSSES[kind](logits_fake)


def adaptive_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    delta: float = 1e-4,
    max: float = 1e4,
) -> Tensor:
    """VQGAN's ``lambda = ||grad L_rec|| / (||grad L_G|| + delta)`` at ``last_layer``, detached.

    Both gradients are taken with ``retain_graph=True`` so the caller can still backpropagate the
    total loss; the result is clamped to ``[0, max]`` and carries no gradient itself.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return adaptive_weight_from_grads(rec_grad, gan_grad, delta, max)


def adaptive_weight_from_grads(
    rec_grad: Tensor, gan_grad: Tensor, delta: float = 1e-4, max: float = 1e4
) -> Tensor:
    """``adaptive_weight`` from the two gradients at the last layer, already computed."""
    return (rec_grad.norm() / (gan_grad.norm() + delta)).clamp(0.0, max).detach()


def gan_weight_ramp(step: int, disc_start: int, warmup: int) -> float:
    """Factor on the GAN terms: 0 before ``disc_start``, then linear up to 1 over ``warmup`` steps.

    At ``step == disc_start`` it is ``1 / warmup`` and it reaches 1 at ``disc_start + warmup - 1``;
    ``warmup=0`` switches the discriminator on at once, as the reference code does. Users of the
    reference report training breaking at that abrupt switch, hence the ramp.
    """
    if warmup < 0:
        raise SpecError(f"disc_warmup_steps must be >= 0, got {warmup}.")
    if step < disc_start:
        return 0.0
    if warmup == 0:
        return 1.0
    return min(1.0, (step - disc_start + 1) / warmup)


# -- perceptual loss -----------------------------------------------------------------------------
class PerceptualLoss:
    """LPIPS distance built on first use, kept outside the tokenizer's module tree.

    It is not an ``nn.Module`` attribute on purpose: its frozen VGG weights would otherwise end
    up in the tokenizer's state dict (and checkpoints), and it would be built even for inference.
    A missing weights file raises ``WeightsNotFoundError`` from ``latentgen.metrics.lpips`` with
    its message intact; nothing silently falls back to a loss without LPIPS.
    """

    def __init__(self, trunk_path: str | None = None, heads_path: str | None = None) -> None:
        self.trunk_path = trunk_path
        self.heads_path = heads_path
        self._net: Any = None

    def __call__(self, images: Tensor, recon: Tensor) -> Tensor:
        """Mean LPIPS distance between ``images`` and ``recon`` (gradients reach ``recon``)."""
        if self._net is None:
            from latentgen.metrics.lpips import LPIPS  # lazy: only VQGAN training needs it

            # Frozen and in eval mode already; raises WeightsNotFoundError when absent.
            self._net = LPIPS.from_pretrained(self.trunk_path, self.heads_path)
        if self._net.shift.device != recon.device:
            self._net.to(recon.device)
        return self._net(images, recon).mean()
