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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from latentgen.errors import DataError, InputError

if TYPE_CHECKING:
    from latentgen.classifiers.base import Classifier
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
    # With a classifier (None: none given): the share of the labelled images whose
    # reconstruction it reads as their label, the same for the originals (what the tokenizer's
    # loss is measured against), and the reconstructions' share by class name.
    class_accuracy: float | None = None
    real_class_accuracy: float | None = None
    labelled_images: int | None = None
    class_accuracy_by_class: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()  # why a metric was skipped

    def as_dict(self) -> dict[str, Any]:
        """The measured metrics by name (what ``latentgen eval tokenizer --json`` prints); the
        per-class accuracies as ``class_accuracy/<class name>``."""
        out = dataclasses.asdict(self)
        del out["notes"]
        by_class = out.pop("class_accuracy_by_class")
        out = {k: v for k, v in out.items() if v is not None}
        out.update({f"class_accuracy/{name}": acc for name, acc in by_class.items()})
        return out


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
    classifier: Classifier | str | Path | None = None,
    device: str | torch.device | None = None,
) -> TokenizerEvaluation:
    """PSNR, SSIM, LPIPS, rFID and codebook usage of ``decode(encode(x))`` over ``dataset``.

    With a ``classifier``, also how often it reads a reconstruction as the item's ``"label"``
    (overall and per class) beside how often it reads the original so: whether the codes keep
    what tells the classes apart, which PSNR does not say. Items labelled -1 (unlabelled, such
    as shapes' scene windows) are left out of those figures.

    Args:
        tokenizer: a tokenizer, or the path of a pipeline, tokenizer export or run directory.
        dataset: map-style dataset of dicts with ``"image"`` ``[C, H, W]`` in [-1, 1].
        batch_size: images per forward pass.
        limit: evaluate on the first ``limit`` images only.
        lpips: ``"auto"`` measures LPIPS when its weights are on disk (else ``notes`` says why
            not), ``True`` requires them, ``False`` skips it; or pass an ``LPIPS`` model.
        inception: Inception-v3 weights (a path or ``InceptionFeatures``) for rFID; None skips.
        classifier: a ``Classifier`` or the path of a saved one (``latentgen train
            classifier``) for the class accuracies; the dataset's items need a ``"label"``.
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
    reader = None if classifier is None else _ClassReadings(classifier, dev)
    real, recon_stats = GaussianStats(), GaussianStats()
    usage = CodebookUsage(tok.vocab_size)
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count = 0
    with _evaluating(tok), (_evaluating(reader.classifier) if reader else nullcontext()):
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
            if reader is not None:
                reader.update(batch, x, recon)
            count += int(x.shape[0])
    stats = usage.compute()
    read = {} if reader is None else reader.compute()
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
        **read,
    )


class _ClassReadings:
    """The labelled images' labels, and whether a classifier reads each original and each
    reconstruction as its label (``evaluate_tokenizer(classifier=...)``)."""

    def __init__(self, classifier: Classifier | str | Path, device: torch.device) -> None:
        if isinstance(classifier, (str, Path)):
            from latentgen.classifiers import load_classifier

            classifier = load_classifier(classifier)
        self.classifier = classifier.to(device)
        self.labels: list[Tensor] = []
        self.hits_real: list[Tensor] = []
        self.hits_recon: list[Tensor] = []

    def update(self, batch: Mapping[str, Any], x: Tensor, recon: Tensor) -> None:
        if "label" not in batch:
            raise DataError(
                f"a classifier was given, but the dataset's items have no 'label' (they have "
                f"{sorted(batch)}); evaluate on labelled data (shapes, Fashion-MNIST, a folder "
                "with one subfolder per class), or leave the classifier out."
            )
        y = torch.as_tensor(batch["label"]).long().flatten().to(x.device)  # [B]
        keep = y >= 0  # -1: unlabelled (a shapes scene window)
        if not bool(keep.any()):
            return
        y, x, recon = y[keep], x[keep], recon[keep]
        k = self.classifier.num_classes
        if int(y.max()) >= k:
            raise InputError(
                f"the dataset has label {int(y.max())}, but the classifier knows {k} classes; "
                "give a classifier trained on this dataset's classes (`latentgen train "
                "classifier`)."
            )
        self.classifier.check_images(x)
        self.labels.append(y.cpu())
        self.hits_real.append((self.classifier.logits(x).argmax(-1) == y).cpu())
        self.hits_recon.append((self.classifier.logits(recon).argmax(-1) == y).cpu())

    def compute(self) -> dict[str, Any]:
        from latentgen.sample_eval import accuracy_by_class

        if not self.labels:
            raise DataError(
                "a classifier was given, but no item has a class label (all are -1, "
                "unlabelled); evaluate on labelled items, e.g. shapes with scene_fraction: 0."
            )
        y, real, recon = (torch.cat(t) for t in (self.labels, self.hits_real, self.hits_recon))
        return {
            "class_accuracy": float(recon.float().mean()),
            "real_class_accuracy": float(real.float().mean()),
            "labelled_images": int(y.numel()),
            "class_accuracy_by_class": accuracy_by_class(recon, y, self.classifier.class_names),
        }


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
