"""Stage 1's task: train a tokenizer on image batches, alternating generator and discriminator.

The tokenizer must be a ``TrainableTokenizer`` (``latentgen.tokenizers.base``): its
``generator_loss`` / ``discriminator_loss`` are the objective, and any other tokenizer is refused
with a message naming what to implement.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from latentgen.errors import SpecError
from latentgen.tokenizers.base import TrainableTokenizer, training_protocol_error
from latentgen.training.grid import image_grid
from latentgen.training.task import StepContext, Task, mean_over_micro_batches, module_device

if TYPE_CHECKING:
    from PIL.Image import Image

    from latentgen.tokenizers.base import Tokenizer
    from latentgen.training.config import TrainerConfig

__all__ = ["TokenizerTask"]


class TokenizerTask(Task):
    """Trains a tokenizer on image batches (``batch["image"]``, ``[B, C, H, W]`` in [-1, 1]).

    With ``has_discriminator`` each step first updates the generator (encoder, quantizer,
    decoder) on ``generator_loss`` and then the discriminator on ``discriminator_loss`` with the
    step's reconstructions detached, as in Taming Transformers (arXiv 2012.09841).

    Args:
        tokenizer: the tokenizer to train.
        grid_images: ``[n, C, H, W]`` images whose reconstructions ``make_grid`` draws.
        disc_lr: discriminator learning rate (None: the trainer's ``lr``).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        grid_images: Tensor | None = None,
        disc_lr: float | None = None,
    ) -> None:
        problem = training_protocol_error(tokenizer)
        if problem is not None:
            raise SpecError(problem)
        assert isinstance(tokenizer, TrainableTokenizer)  # checked just above
        self.tokenizer = tokenizer
        self.grid_images = grid_images
        self.disc_lr = disc_lr
        self.adversarial = tokenizer.has_discriminator

    def modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        tok = self.tokenizer
        params = {"generator": list(tok.generator_parameters())}
        if self.adversarial:
            params["discriminator"] = list(tok.discriminator_parameters())
        return params

    def learning_rate(self, optimizer: str, config: TrainerConfig) -> float:
        if optimizer == "discriminator" and self.disc_lr is not None:
            return self.disc_lr
        return config.lr

    def describe(self) -> dict[str, Any]:
        return {"task": "tokenizer", "tokenizer": self.tokenizer.config.model_dump(mode="json")}

    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        logs: dict[str, Any] = {}
        n = len(ctx.micro_batches)
        recons = []
        for batch in ctx.micro_batches:
            with ctx.autocast():
                loss, glogs, out = self.tokenizer.generator_loss(batch["image"], ctx.step)
            ctx.backward(loss, "generator")
            recons.append(out.recon.detach())
            mean_over_micro_batches(logs, {"loss": loss.detach(), **glogs}, n)
        logs["grad_norm"] = ctx.update("generator")
        if self.adversarial:
            dlogs: dict[str, Any] = {}
            for batch, recon in zip(ctx.micro_batches, recons):
                with ctx.autocast():
                    dloss, d = self.tokenizer.discriminator_loss(batch["image"], recon, ctx.step)
                ctx.backward(dloss, "discriminator")
                mean_over_micro_batches(dlogs, {"disc_loss": dloss.detach(), **d}, n)
            dlogs["disc_grad_norm"] = ctx.update("discriminator")
            logs.update(dlogs)
        return logs

    @torch.no_grad()
    def make_grid(self, step: int) -> Image | None:
        if self.grid_images is None:
            return None
        tok = self.tokenizer
        was_training = tok.training
        tok.eval()
        try:
            images = self.grid_images.to(module_device(tok))
            recon = tok.decode(tok.encode(images))  # [n, C, H, W]
        finally:
            tok.train(was_training)
        return image_grid([images, recon.clamp(-1, 1)])

    def export(self, path: Path) -> Path:
        from latentgen.artifact import save_component

        return save_component(self.tokenizer, "tokenizer", path)
