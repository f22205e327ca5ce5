"""Gumbel-softmax quantizer, as in DALL-E's dVAE (https://arxiv.org/abs/2102.12092).

A 1x1 convolution turns the encoder output into logits over K codes. Training samples a relaxed
one-hot with the Gumbel-softmax (https://arxiv.org/abs/1611.01144) at a temperature τ annealed
from ``tau_start`` to ``tau_end``, and mixes the codebook with it; the loss is the KL divergence
from the code posterior to a uniform prior. Evaluation takes the argmax code.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from latentgen.specs import ComponentConfig
from latentgen.tokenizers.quantizers.base import Quantizer, QuantizerOutput
from latentgen.tokenizers.quantizers.common import (
    UsageCounter,
    check_indices,
    check_latents,
    fp32_region,
    perplexity,
)

__all__ = ["GumbelQuantizer", "GumbelQuantizerConfig"]


class GumbelQuantizerConfig(ComponentConfig):
    """Config of ``GumbelQuantizer`` (type ``gumbel``)."""

    type: Literal["gumbel"] = "gumbel"
    codebook_size: int = Field(
        8192, ge=2, description="Number of codes K (DALL-E's dVAE uses 8192)."
    )
    dim: int = Field(
        256, ge=1, description="Channels D of the encoder output taken and of the codes returned."
    )
    tau_start: float = Field(
        1.0, gt=0, description="Gumbel-softmax temperature at step 0 (DALL-E, arXiv 2102.12092)."
    )
    tau_end: float = Field(
        1.0 / 16,
        gt=0,
        description="Temperature reached after `anneal_steps` training steps and kept after "
        "(DALL-E anneals 1 -> 1/16).",
    )
    anneal_steps: int = Field(
        150_000,
        ge=0,
        description="Training steps over which the temperature goes from tau_start to tau_end "
        "(DALL-E: 150k). 0 uses tau_end from the start.",
    )
    anneal: Literal["cosine", "linear", "exponential"] = Field(
        "cosine",
        description="Shape of the temperature schedule: cosine (DALL-E), linear, or exponential "
        "(geometric interpolation, as in arXiv 1611.01144).",
    )
    straight_through: bool = Field(
        False,
        description="Use a hard one-hot in the forward pass with the relaxed sample's gradient "
        "(straight-through Gumbel-softmax) instead of the soft mixture.",
    )
    kl_weight: float = Field(
        5e-4,
        ge=0,
        description="Weight of KL(q(code | z) || uniform), averaged over positions (the "
        "taming-transformers default for its Gumbel quantizer).",
    )


class GumbelQuantizer(Quantizer):
    """DALL-E dVAE-style quantizer: Gumbel-softmax relaxation in training, argmax in eval.

    The temperature follows ``anneal`` from ``tau_start`` to ``tau_end`` over ``anneal_steps``,
    driven by the ``step`` buffer (saved in the state_dict, so a resumed run continues the
    schedule), which each training forward increments (staged: a step the trainer skips does
    not advance it). The loss is ``kl_weight`` times
    KL(softmax(logits) || uniform(K)), summed over codes and averaged over positions.
    See arXiv 2102.12092 (DALL-E) and arXiv 1611.01144 (Gumbel-softmax).

    Args:
        config: a ``GumbelQuantizerConfig``.
    """

    Config: ClassVar[type[ComponentConfig]] = GumbelQuantizerConfig
    step: Tensor

    def __init__(self, config: GumbelQuantizerConfig) -> None:
        super().__init__(config)
        self.config: GumbelQuantizerConfig = config
        self.to_logits = nn.Conv2d(config.dim, config.codebook_size, kernel_size=1)
        self.codebook = nn.Embedding(config.codebook_size, config.dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.usage_counter = UsageCounter(config.codebook_size)

    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.codebook_size

    @property
    def dim(self) -> int:
        """Channels D of the latents."""
        return self.config.dim

    def temperature(self, step: int | None = None) -> float:
        """The Gumbel-softmax temperature at ``step`` (default: the current training step)."""
        cfg = self.config
        s = int(self.staged("step")) if step is None else step
        t = 1.0 if cfg.anneal_steps == 0 else min(max(s, 0) / cfg.anneal_steps, 1.0)
        if cfg.anneal == "linear":
            return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * t
        if cfg.anneal == "exponential":
            return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** t
        return cfg.tau_end + 0.5 * (cfg.tau_start - cfg.tau_end) * (1 + math.cos(math.pi * t))

    def embed(self, indices: Tensor) -> Tensor:
        """codes ``[B, h, w]`` -> latents ``[B, D, h, w]`` (equal to ``forward``'s z_q in eval)."""
        check_indices(indices, self.codebook_size, type(self).__name__)
        with fp32_region(self.codebook.weight):
            q = F.embedding(indices.long(), self.codebook.weight.float())  # [B, h, w, D]
            return q.permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``[B, D, h, w]`` -> codes; relaxed sample in training, argmax in eval (fp32 inside)."""
        check_latents(z, self.dim, type(self).__name__)
        with fp32_region(z):
            logits = self.to_logits(z.float())  # [B, K, h, w]
            log_q = F.log_softmax(logits, dim=1)
            # KL(q || uniform) = sum_k q_k (log q_k + log K), then mean over positions.
            kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(dim=1).mean()
            loss = self.config.kl_weight * kl
            stats: dict[str, float] = {}
            if self.training:
                tau = self.temperature()
                soft = F.gumbel_softmax(
                    logits, tau=tau, hard=self.config.straight_through, dim=1
                )  # [B, K, h, w]
                indices = soft.argmax(dim=1)  # [B, h, w]
                z_q = torch.einsum("bkhw,kd->bdhw", soft, self.codebook.weight.float())
                self.stage("step", self.staged("step") + 1)
                stats["temperature"] = tau
            else:
                indices = logits.argmax(dim=1)  # [B, h, w]
                z_q = self.embed(indices)
            counts = self.usage_counter.update(indices, reduce=self.training)
            stats["perplexity"] = perplexity(counts)
        return QuantizerOutput(z_q=z_q, indices=indices, loss=loss, stats=stats)
