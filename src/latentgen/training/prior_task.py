"""Stage 2's task: train a prior on cached code grids and their conditions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from latentgen.errors import SpecError
from latentgen.priors.base import Prior
from latentgen.training.grid import image_grid
from latentgen.training.task import StepContext, Task, mean_over_micro_batches, module_device

if TYPE_CHECKING:
    from PIL.Image import Image

    from latentgen.conditioners.base import Conditioner, Conditioning
    from latentgen.specs import SamplerConfig
    from latentgen.tokenizers.base import Tokenizer

__all__ = ["PriorTask"]


class _PriorLoss(nn.Module):
    """``prior.loss`` as a ``forward``, so that DistributedDataParallel can hook into it."""

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, codes: Tensor, conds: Mapping[str, Conditioning]) -> Tensor:
        return self.prior.loss(codes, conds)


class PriorTask(Task):
    """Trains a prior on cached code grids (``batch["codes"]``, ``[B, h, w]``) and conditions.

    Each conditioner ``name`` reads its raw data from ``batch[condition_keys[name]]`` (default
    ``batch[name]``), as stored by ``build_code_cache``.

    Args:
        prior: the prior to train.
        conditioners: the pipeline's conditioners by name (not trained here).
        tokenizer: decodes samples for ``make_grid`` and goes into the exported pipeline.
        condition_keys: dataset key of each condition (default: its name).
        grid_batch: a batch from the code cache; ``make_grid`` decodes its codes in one row and
            samples with its conditions in the next.
        data_fingerprint: the code cache's tokenizer fingerprint, checked on resume.
        sampler: default sampler of the exported pipeline (and of the sample grids).
    """

    def __init__(
        self,
        prior: Prior,
        conditioners: Mapping[str, Conditioner] | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        condition_keys: Mapping[str, str] | None = None,
        grid_batch: Mapping[str, Any] | None = None,
        data_fingerprint: str | None = None,
        sampler: SamplerConfig | None = None,
    ) -> None:
        self.prior = prior
        self._loss = _PriorLoss(prior)
        self.conditioners = dict(conditioners or {})
        self.tokenizer = tokenizer
        keys = dict(condition_keys or {})
        self.condition_keys = {n: keys.get(n, n) for n in self.conditioners}
        self.grid_batch = grid_batch
        self.data_fingerprint = data_fingerprint
        self.sampler = sampler

    def modules(self) -> dict[str, nn.Module]:
        return {"prior": self.prior}

    def optimizer_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {"prior": list(self.prior.parameters())}

    def ddp_modules(self) -> dict[str, nn.Module]:
        return {"prior": self._loss}

    def describe(self) -> dict[str, Any]:
        return {
            "task": "prior",
            "prior": self.prior.config.model_dump(mode="json"),
            "conditioners": {
                n: c.config.model_dump(mode="json") for n, c in self.conditioners.items()
            },
            "condition_keys": self.condition_keys,
            "data_fingerprint": self.data_fingerprint,
        }

    def to(self, device: torch.device) -> PriorTask:
        super().to(device)
        for c in self.conditioners.values():
            c.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        return self

    def conditions(self, batch: Mapping[str, Any]) -> dict[str, Conditioning]:
        """Encode the batch's raw conditions (``Prior.loss`` applies the prior's
        ``cond_dropout``, so condition dropout has one knob)."""
        device = module_device(self.prior)
        conds = {}
        for name, cond in self.conditioners.items():
            key = self.condition_keys[name]
            if key not in batch:
                raise SpecError(
                    f"conditioner '{name}' reads batch key '{key}', but the batch has "
                    f"{sorted(batch)}. Rebuild the code cache with that key, or map it with "
                    f"condition_keys: {{{name}: <key>}}."
                )
            conds[name] = self._encode(cond, batch[key], batch.get("codes")).to(device)
        return conds

    def _encode(self, cond: Conditioner, raw: Any, codes: Tensor | None) -> Conditioning:
        """A spatial conditioner is told the image size of the code grids it conditions."""
        from latentgen.conditioners.spatial import SpatialConditioner

        if isinstance(cond, SpatialConditioner) and codes is not None and self.tokenizer:
            f = int(self.tokenizer.downsample)
            return cond.encode(raw, size=(int(codes.shape[-2]) * f, int(codes.shape[-1]) * f))
        return cond.encode(raw)

    def train_step(self, ctx: StepContext) -> dict[str, float | Tensor]:
        logs: dict[str, Any] = {}
        n = len(ctx.micro_batches)
        for batch in ctx.micro_batches:
            conds = self.conditions(batch)
            with ctx.autocast():
                loss = ctx.module("prior")(batch["codes"], conds)  # [] mean NLL per code
            ctx.backward(loss, "prior")
            mean_over_micro_batches(logs, {"loss": loss.detach()}, n)
        logs["grad_norm"] = ctx.update("prior")
        logs["bits_per_code"] = Prior.bits_per_code(float(logs["loss"]))
        return logs

    @torch.no_grad()
    def make_grid(self, step: int) -> Image | None:
        if self.tokenizer is None or self.grid_batch is None:
            return None
        device = module_device(self.prior)
        batch = {
            k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.grid_batch.items()
        }
        codes = batch["codes"]  # [n, h, w]
        was_training = self.prior.training
        self.prior.eval()
        try:
            conds = self.conditions(batch)
            kwargs: dict[str, Any] = {
                "grid": (int(codes.shape[1]), int(codes.shape[2])),
                "sampler": self.sampler,
            }
            if not conds:
                kwargs["num_samples"] = int(codes.shape[0])
            samples = self.prior.sample(conds or None, **kwargs)  # [n, h, w]
        finally:
            self.prior.train(was_training)
        return image_grid([self.tokenizer.decode(codes), self.tokenizer.decode(samples)])

    def export(self, path: Path) -> Path | None:
        if self.tokenizer is None:
            return None
        from latentgen.pipeline import Pipeline

        card: dict[str, Any] = {}
        codes = (self.grid_batch or {}).get("codes")  # [B, h, w] from the code cache
        if isinstance(codes, Tensor):  # the image size it was trained at: sampling's default
            f = int(self.tokenizer.downsample)
            card["image_size"] = [int(codes.shape[-2]) * f, int(codes.shape[-1]) * f]
        pipe = Pipeline(self.tokenizer, self.prior, self.conditioners, self.sampler, card=card)
        return pipe.save_pretrained(path)
