"""Classifier rejection sampling (Esser et al., sec. 4.4 and Table 4).

For each requested image, draw candidates with the same conditions and keep the ones a
classifier scores highest for the requested class: ``ceil(n / acceptance_rate)`` candidates for
``n`` images that share their conditions, in batches, so memory follows ``batch_size``, not the
number of candidates. The classifier is a trained ``latentgen.classifiers`` component (or its
directory), or any callable ``images [B, C, H, W] in [-1, 1] -> class probabilities [B, K]``.

    from latentgen.rejection import RejectionConfig
    pipe = Pipeline.from_pretrained("runs/shapes-transformer/final",
                                    rejection=RejectionConfig(classifier="runs/classifier",
                                                              acceptance_rate=0.05))
    images = pipe(label=[0, 1, 2])
    print(pipe.last_rejection.realised_rate)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from latentgen.errors import InputError

__all__ = [
    "RejectionConfig",
    "RejectionReport",
    "check_classifier",
    "class_probs",
    "reject",
    "take_rows",
]


@dataclass
class RejectionConfig:
    """What rejection sampling keeps: one in ``1 / acceptance_rate`` candidates, by classifier.

    Args:
        classifier: a classifier module, the path of a saved classifier, or any callable
            ``images -> class probabilities [B, K]``.
        acceptance_rate: fraction of candidates kept, in (0, 1]; 1 keeps every candidate
            (plain sampling), the paper's Table 4 uses 0.05.
        batch_size: candidates drawn and scored at once.
        condition: the pipeline's class-label conditioner whose label is the requested class
            (None: its only one).
    """

    classifier: Any
    acceptance_rate: float = 0.05
    batch_size: int = 64
    condition: str | None = None

    def __post_init__(self) -> None:
        rate = self.acceptance_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise InputError(
                f"acceptance_rate must lie in (0, 1], got {rate!r}: 1 keeps every candidate "
                "(no rejection), 0.05 keeps the best of 20 (the paper's Table 4)."
            )
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise InputError(f"RejectionConfig.batch_size must be >= 1, got {self.batch_size}.")
        if isinstance(self.classifier, (str, os.PathLike)):
            from latentgen.classifiers import load_classifier

            self.classifier = load_classifier(self.classifier)
        elif not callable(getattr(self.classifier, "probs", None)) and not callable(
            self.classifier
        ):
            raise InputError(
                "RejectionConfig.classifier must be a classifier, the path of a saved one, or a "
                f"callable images -> class probabilities; got {type(self.classifier).__name__}."
            )


@dataclass(frozen=True)
class RejectionReport:
    """What one rejection-sampling draw did."""

    requested_rate: float
    candidates: int
    kept: int
    realised_rate: float  # kept / candidates (ceil rounding makes it <= the requested rate)
    mean_prob_kept: float  # classifier probability of the requested class, kept candidates
    mean_prob_all: float  # ... and over every candidate
    notes: tuple[str, ...] = field(default=())


def check_classifier(
    classifier: Any,
    *,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    in_channels: int | None = None,
    what: str = "the pipeline",
) -> None:
    """Raise ``InputError`` when a classifier's declared classes, size or channels do not fit."""
    k = getattr(classifier, "num_classes", None)
    if k is not None and int(k) != num_classes:
        raise InputError(
            f"the classifier was trained on {k} classes but {what} has {num_classes}: use a "
            f"classifier trained on the same {num_classes} classes (latentgen train classifier "
            "on the pipeline's dataset)."
        )
    size = getattr(classifier, "image_size", None)
    if size is not None and image_size is not None:
        hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if hw != tuple(image_size):
            raise InputError(
                f"the classifier takes {hw[0]}x{hw[1]} images but {what} makes "
                f"{image_size[0]}x{image_size[1]}: use a classifier trained at "
                f"{image_size[0]}x{image_size[1]}, or generate at {hw[0]}x{hw[1]} (size=...)."
            )
    c = getattr(classifier, "in_channels", None)
    if c is not None and in_channels is not None and int(c) != in_channels:
        raise InputError(
            f"the classifier takes {c}-channel images but {what} makes {in_channels}-channel "
            f"ones: use a classifier trained on {in_channels}-channel images."
        )


def class_probs(classifier: Any, images: Tensor, num_classes: int) -> Tensor:
    """Class probabilities ``[B, K]`` of ``images`` under a classifier or a callable."""
    check_classifier(
        classifier,
        num_classes=num_classes,
        image_size=(int(images.shape[-2]), int(images.shape[-1])),
        in_channels=int(images.shape[1]),
        what="the generated images",
    )
    probs_fn = getattr(classifier, "probs", None)
    with torch.no_grad():
        p = probs_fn(images) if callable(probs_fn) else classifier(images)
    if not isinstance(p, Tensor) or p.shape != (images.shape[0], num_classes):
        got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
        raise InputError(
            f"the classifier must return class probabilities [B, {num_classes}] for "
            f"{images.shape[0]} images, got {got}."
        )
    return p.float()


def _row_keys(conds: Mapping[str, Any], prefix: Tensor | None, n: int) -> list[bytes]:
    """One key per row: rows with equal conditions (and prefix) share candidates."""
    parts = []
    for name in sorted(conds):
        c = conds[name]
        parts.append(c.tokens.reshape(n, -1).cpu())
        if c.drop is not None:
            parts.append(c.drop.reshape(n, 1).long().cpu())
    if prefix is not None:
        parts.append(prefix.reshape(n, -1).cpu())
    if not parts:
        return [b""] * n
    rows = torch.cat(parts, dim=1).numpy()  # [n, total]
    return [r.tobytes() for r in rows]


def take_rows(conds: Mapping[str, Any], index: Tensor) -> dict[str, Any]:
    """The conditions of rows ``index`` (a long tensor)."""
    out = {}
    for name, c in conds.items():
        idx = index.to(c.tokens.device)
        out[name] = replace(c, tokens=c.tokens[idx], drop=None if c.drop is None else c.drop[idx])
    return out


def reject(
    config: RejectionConfig,
    *,
    labels: Tensor,
    num_classes: int,
    conds: Mapping[str, Any],
    draw: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    prefix: Tensor | None = None,
) -> tuple[Tensor, RejectionReport]:
    """Codes ``[n, h, w]`` of the best candidates for each of the ``n`` rows of ``conds``.

    Args:
        config: rate, classifier and batch size.
        labels: requested class of each row ``[n]``.
        num_classes: classes of the class condition (the classifier must have as many).
        conds: the rows' conditions (rows with equal conditions share their candidates).
        draw: codes ``[b, h, w]`` for the rows ``index`` (a long tensor ``[b]``).
        decode: codes -> images ``[b, C, H, W]`` in [-1, 1] for the classifier.
        prefix: the rows' code prefixes, if any (part of what makes rows equal).
    """
    n = int(labels.shape[0])
    keys = _row_keys(conds, prefix, n)
    groups: dict[bytes, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    # Every group draws ceil(len / rate) candidates from its first row's conditions.
    plan: list[tuple[list[int], int]] = [
        (rows, math.ceil(len(rows) / config.acceptance_rate - 1e-9)) for rows in groups.values()
    ]
    flat = torch.tensor([rows[0] for rows, m in plan for _ in range(m)], dtype=torch.long)
    codes_all, scores = [], []
    for start in range(0, len(flat), config.batch_size):
        index = flat[start : start + config.batch_size]
        codes = draw(index)  # [b, h, w]
        probs = class_probs(config.classifier, decode(codes), num_classes)  # [b, K]
        want = labels[index].to(probs.device)
        scores.append(probs.gather(1, want[:, None])[:, 0].cpu())
        codes_all.append(codes.cpu())
    codes_cat = torch.cat(codes_all)  # [total, h, w]
    score = torch.cat(scores)  # [total]
    out = torch.empty((n, *codes_cat.shape[1:]), dtype=codes_cat.dtype)  # [n, h, w]
    kept_scores = []
    start = 0
    for rows, m in plan:
        best = score[start : start + m].topk(len(rows)).indices + start  # best first
        out[torch.tensor(rows)] = codes_cat[best]
        kept_scores.append(score[best])
        start += m
    kept = torch.cat(kept_scores)
    report = RejectionReport(
        requested_rate=float(config.acceptance_rate),
        candidates=len(flat),
        kept=n,
        realised_rate=n / len(flat),
        mean_prob_kept=float(kept.mean()),
        mean_prob_all=float(score.mean()),
    )
    return out.to(codes_all[0].device), report
