"""Measure a trained tokenizer or prior on a dataset; ``latentgen eval`` calls these.

    from latentgen.evaluation import evaluate_prior, evaluate_tokenizer

    scores = evaluate_tokenizer("runs/vqgan", dataset, limit=256)   # PSNR, SSIM, LPIPS, codebook
    print(scores.psnr_db, scores.codebook_usage)
    nll = evaluate_prior("runs/prior/final", dataset)               # NLL per code
    print(nll.bits_per_code)

``dataset`` is any map-style dataset of dicts with an ``"image"`` ``[C, H, W]`` in [-1, 1]
(every latentgen dataset), plus the keys that feed the pipeline's conditioners.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from latentgen.errors import DataError, InputError

if TYPE_CHECKING:
    from latentgen.metrics.fid import InceptionFeatures
    from latentgen.metrics.lpips import LPIPS
    from latentgen.pipeline import Pipeline
    from latentgen.tokenizers.base import Tokenizer

__all__ = ["PriorEvaluation", "TokenizerEvaluation", "evaluate_prior", "evaluate_tokenizer"]


@dataclass(frozen=True)
class TokenizerEvaluation:
    """Reconstruction quality and codebook use of a tokenizer, averaged over ``images``."""

    images: int
    psnr_db: float
    ssim: float
    lpips: float | None  # None: not measured (see ``notes``)
    rfid: float | None  # None: no Inception weights given
    codebook_usage: float  # fraction of codes used at least once
    perplexity: float
    dead_codes: int
    codebook_size: int
    notes: tuple[str, ...] = ()  # why a metric was skipped

    def as_dict(self) -> dict[str, Any]:
        """The measured metrics by name (what ``latentgen eval tokenizer --json`` prints)."""
        out = dataclasses.asdict(self)
        del out["notes"]
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class PriorEvaluation:
    """Negative log-likelihood of a dataset's code grids under a pipeline's prior."""

    images: int
    nll_nats_per_code: float
    bits_per_code: float  # NLL in bits per code (per token of the prior)
    bits_per_image_dim: float  # the same total, spread over the image's C*H*W values
    # True when the prior's log_prob is a lower bound (the masked prior's ELBO): the figures
    # above are then upper bounds on the NLL, not the exact NLL an autoregressive prior gives.
    nll_is_upper_bound: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The metrics by name (what ``latentgen eval prior --json`` prints)."""
        return dataclasses.asdict(self)


def _batches(dataset: Any, batch_size: int, limit: int | None) -> Any:
    from torch.utils.data import DataLoader, Subset

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1 (or None for the whole dataset), got {limit}.")
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise DataError("the dataset to evaluate on is empty; give it at least one image.")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _device_of(module: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    # Evaluation must not leave a model the caller is training in eval mode.
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def _load_tokenizer(source: Tokenizer | str | Path) -> Tokenizer:
    if isinstance(source, (str, Path)):
        from latentgen.artifact import load_component

        tokenizer: Tokenizer = load_component(source, "tokenizer")
        return tokenizer
    return source


def _lpips(choice: bool | Literal["auto"] | LPIPS, device: torch.device) -> tuple[Any, str | None]:
    """The LPIPS model to use (or None) and, when "auto" found no weights, why it is skipped."""
    from latentgen.errors import WeightsNotFoundError
    from latentgen.metrics.lpips import LPIPS

    if isinstance(choice, LPIPS):
        return choice.to(device), None
    if choice is False:
        return None, None
    try:
        return LPIPS.from_pretrained().to(device), None
    except WeightsNotFoundError as e:
        if choice is True:
            raise
        return None, f"LPIPS skipped: {e}"


def evaluate_tokenizer(
    tokenizer: Tokenizer | str | Path,
    dataset: Any,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    lpips: bool | Literal["auto"] | LPIPS = "auto",
    inception: str | Path | InceptionFeatures | None = None,
    device: str | torch.device | None = None,
) -> TokenizerEvaluation:
    """PSNR, SSIM, LPIPS, rFID and codebook usage of ``decode(encode(x))`` over ``dataset``.

    Args:
        tokenizer: a tokenizer, or the path of a pipeline, tokenizer export or run directory.
        dataset: map-style dataset of dicts with ``"image"`` ``[C, H, W]`` in [-1, 1].
        batch_size: images per forward pass.
        limit: evaluate on the first ``limit`` images only.
        lpips: ``"auto"`` measures LPIPS when its weights are on disk (else ``notes`` says why
            not), ``True`` requires them, ``False`` skips it; or pass an ``LPIPS`` model.
        inception: Inception-v3 weights (a path or ``InceptionFeatures``) for rFID; None skips.
        device: where to run; None keeps the tokenizer where it is.
    """
    from latentgen.metrics.codebook import CodebookUsage
    from latentgen.metrics.fid import GaussianStats, InceptionFeatures, frechet_distance
    from latentgen.metrics.image import psnr, ssim

    tok = _load_tokenizer(tokenizer)
    dev = _device_of(tok, device)
    tok.to(dev)
    batches = _batches(dataset, batch_size, limit)
    lp, note = _lpips(lpips, dev)
    features = None
    if inception is not None:
        features = (
            inception
            if isinstance(inception, InceptionFeatures)
            else InceptionFeatures.from_pretrained(inception)
        ).to(dev)
    real, recon_stats = GaussianStats(), GaussianStats()
    usage = CodebookUsage(tok.vocab_size)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count = 0
    with _evaluating(tok):
        for batch in batches:
            x = batch["image"].to(dev).float()  # [B, C, H, W]
            codes = tok.encode(x)  # [B, h, w]
            recon = tok.decode(codes).clamp(-1, 1).float()  # [B, C, H, W]
            usage.update(codes)
            sums["psnr"] += float(psnr(recon, x).sum())
            sums["ssim"] += float(ssim(recon, x).sum())
            if lp is not None:
                sums["lpips"] += float(lp(recon, x).sum())
            if features is not None:
                real.update(features(x))
                recon_stats.update(features(recon))
            count += int(x.shape[0])
    stats = usage.compute()
    return TokenizerEvaluation(
        images=count,
        psnr_db=sums["psnr"] / count,
        ssim=sums["ssim"] / count,
        lpips=None if lp is None else sums["lpips"] / count,
        rfid=None
        if features is None
        else frechet_distance(real.mean, real.cov, recon_stats.mean, recon_stats.cov),
        codebook_usage=stats["usage"],
        perplexity=stats["perplexity"],
        dead_codes=int(stats["dead_codes"]),
        codebook_size=tok.vocab_size,
        notes=(note,) if note else (),
    )


def evaluate_prior(
    pipeline: Pipeline | str | Path,
    dataset: Any,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    condition_keys: Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
) -> PriorEvaluation:
    """Negative log-likelihood of ``dataset``'s code grids under the pipeline's prior.

    Args:
        pipeline: a ``Pipeline``, or the path of a saved pipeline directory.
        dataset: map-style dataset of dicts with ``"image"`` and each conditioner's data.
        batch_size: images per forward pass.
        limit: evaluate on the first ``limit`` images only.
        condition_keys: dataset key of a conditioner's data, by conditioner name (default:
            the conditioner's own name).
        device: where to run; None keeps the pipeline where it is.
    """
    from latentgen.pipeline import Pipeline

    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.from_pretrained(pipeline)
    keys = dict(condition_keys or {})
    unknown = sorted(set(keys) - set(pipe.conditioners))
    if unknown:
        raise InputError(
            f"condition_keys names {unknown}, which this pipeline has no conditioner for; its "
            f"conditioners are {sorted(pipe.conditioners) or 'none'}."
        )
    dev = _device_of(pipe.prior, device)
    pipe.to(dev)
    batches = _batches(dataset, batch_size, limit)
    from latentgen.conditioners.spatial import SpatialConditioner

    nats, codes_seen, images, values = 0.0, 0, 0, 0
    with _evaluating(pipe.tokenizer), _evaluating(pipe.prior):
        for batch in batches:
            x = batch["image"].to(dev)  # [B, C, H, W]
            codes = pipe.tokenizer.encode(x)  # [B, h, w]
            conds = {}
            for name, cond in pipe.conditioners.items():
                key = keys.get(name, name)
                if key not in batch:
                    raise DataError(
                        f"conditioner '{name}' needs dataset key '{key}', but items have "
                        f"{sorted(batch)}; map it with condition_keys={{'{name}': <key>}} "
                        f"(--key {name}=<key> on the command line)."
                    )
                if isinstance(cond, SpatialConditioner):  # its map must fit these images
                    size = (int(x.shape[-2]), int(x.shape[-1]))
                    conds[name] = cond.encode(batch[key], size=size).to(dev)
                else:
                    conds[name] = cond.encode(batch[key]).to(dev)
            nats -= float(pipe.prior.log_prob(codes, conds or None).sum())
            codes_seen += codes.numel()
            images += int(x.shape[0])
            values += x[0].numel() * int(x.shape[0])
    per_code = nats / codes_seen
    return PriorEvaluation(
        images=images,
        nll_nats_per_code=per_code,
        bits_per_code=per_code / math.log(2.0),
        bits_per_image_dim=nats / values / math.log(2.0),
        nll_is_upper_bound=bool(getattr(pipe.prior, "log_prob_is_bound", False)),
    )
