"""Measure generated samples: ``latentgen eval samples`` calls ``evaluate_samples``.

    from latentgen.sample_eval import evaluate_samples

    rows = evaluate_samples("runs/shapes-transformer/final", "runs/shapes-classifier",
                            held_out, num_samples=50, rejection=0.05)
    for row in rows:                       # without rejection, then with it
        print(row.name, row.class_accuracy, row.kid, row.kid_std_error)

Every measure that needs no downloaded weights works in the classifier's feature space: class
accuracy (is it the requested class), KID (unbiased, with its standard error) and FID between
the samples and held-out real images. Inception-v3 FID and IS are added when the user gives the
Inception weights file. Spatial conditions are checked against the sample where the condition
can be derived from an image again (edges, low resolution: PSNR of the re-derived map) or
read by the classifier (segmentation: the class of the map's main region).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.errors import DataError, InputError
from latentgen.rejection import RejectionConfig, check_classifier

if TYPE_CHECKING:
    from latentgen.metrics.fid import InceptionFeatures

__all__ = ["SampleEvaluation", "evaluate_samples", "format_table"]

METRICS = ("accuracy", "kid", "fid", "agreement")


@dataclass(frozen=True)
class SampleEvaluation:
    """Quality figures of one set of generated samples (one row of the table)."""

    name: str  # "plain", or "rejection@RATE"
    samples: int
    samples_per_s: float  # generation (and rejection) throughput, decoding included
    class_accuracy: float | None = None  # classifier's class == requested class
    kid: float | None = None  # in the classifier's feature space
    kid_std_error: float | None = None
    fid: float | None = None  # in the classifier's feature space
    inception_fid: float | None = None  # with user-supplied Inception-v3 weights
    inception_score: float | None = None
    inception_score_std: float | None = None
    acceptance_rate: float | None = None  # requested rejection rate
    realised_rate: float | None = None  # kept / candidates
    ranked_by_scorer: bool | None = None  # rejection: the scoring classifier chose the samples
    agreement: dict[str, float] = dataclasses.field(default_factory=dict)  # per condition
    # class accuracy of each requested class, by its name (the label conditioner's
    # class_names, else the classifier's)
    class_accuracy_by_class: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The measured figures by name (a JSON line of ``latentgen eval samples``); the
        per-class accuracies as ``class_accuracy/<class name>``."""
        out = dataclasses.asdict(self)
        agreement = out.pop("agreement")
        by_class = out.pop("class_accuracy_by_class")
        out.pop("notes")
        out = {k: v for k, v in out.items() if v is not None}
        out.update(agreement)
        out.update({f"class_accuracy/{name}": acc for name, acc in by_class.items()})
        return out


def _load_classifier(classifier: Any) -> Any:
    if isinstance(classifier, (str, Path)):
        from latentgen.classifiers import load_classifier

        return load_classifier(classifier)
    return classifier


def _class_names(clf: Any) -> tuple[str, ...]:
    """A classifier's class names; () for a plain callable (``images -> probabilities``)."""
    return tuple(getattr(clf, "class_names", ()) or ())


def accuracy_by_class(hits: Tensor, want: Tensor, names: Sequence[str]) -> dict[str, float]:
    """The share of ``hits`` (``[N]`` bool or 0/1) among the items of each class in ``want``
    (``[N]`` class ids), by class name (``class_<id>`` past the end of ``names``), in class
    order. The demo, ``eval samples`` and ``eval tokenizer`` report per-class figures with it."""
    return {
        (names[c] if c < len(names) else f"class_{c}"): float(hits[want == c].float().mean())
        for c in want.unique().tolist()
    }


def _class_conditions(pipe: Any) -> list[str]:
    from latentgen.conditioners.label import ClassLabelConditioner

    return [n for n, c in pipe.conditioners.items() if isinstance(c, ClassLabelConditioner)]


def _image_size(pipe: Any, dataset: Any, size: tuple[int, int] | int | None) -> tuple[int, int]:
    if size is not None:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    card = pipe.card.get("image_size")
    if card is not None:
        return (card, card) if isinstance(card, int) else (int(card[0]), int(card[1]))
    x = dataset[0]["image"]
    return int(x.shape[-2]), int(x.shape[-1])


def _features(classifier: Any, images: Tensor) -> Tensor:
    feats = getattr(classifier, "features", None)
    if not callable(feats):
        raise InputError(
            "KID and FID in the classifier's feature space need a classifier with "
            ".features(images) -> [B, D] (a latentgen classifier has it); pass one, or leave "
            "kid and fid out of `metrics`."
        )
    with torch.no_grad():
        return feats(images).float().flatten(1).cpu()


def _main_class(ids: Tensor) -> Tensor:
    """Most frequent non-background id of each map ``[B, H, W]`` (0 where all background)."""
    b = ids.shape[0]
    counts = torch.zeros(b, int(ids.max()) + 1, dtype=torch.long)
    counts.scatter_add_(1, ids.reshape(b, -1).cpu(), torch.ones_like(ids.reshape(b, -1).cpu()))
    counts[:, 0] = 0
    return counts.argmax(1)  # [B]


def _agreement(
    pipe: Any, classifier: Any, num_classes: int | None, raw: Mapping[str, Any], images: Tensor
) -> tuple[dict[str, Tensor], list[str]]:
    """Per-sample agreement of each spatial condition with the images it conditioned."""
    from latentgen.conditioners.spatial import (
        EdgesConditioner,
        LowResolutionConditioner,
        SegmentationConditioner,
        sobel_edges,
    )
    from latentgen.metrics.image import psnr

    size = (int(images.shape[-2]), int(images.shape[-1]))
    out: dict[str, Tensor] = {}
    notes = []
    for name, cond in pipe.conditioners.items():
        if name not in raw:  # left out of the draw
            continue
        if isinstance(cond, EdgesConditioner):
            given = cond.edge_map(raw[name]).to(images.device)  # [B, 1, H, W] in [0, 1]
            again = sobel_edges(images.clamp(-1, 1))
            out[f"{name}_psnr_db"] = psnr(again * 2 - 1, given * 2 - 1).cpu()
        elif isinstance(cond, LowResolutionConditioner):
            given = cond.small_image(raw[name], size).to(images.device)  # [B, 3, h, w]
            again = F.avg_pool2d(images.clamp(-1, 1), cond.config.factor)
            out[f"{name}_psnr_db"] = psnr(again, given).cpu()
        elif isinstance(cond, SegmentationConditioner):
            # Maps of class ids 0 = background, c + 1 = the classifier's class c (the shapes
            # convention): the sample should show the class of the map's main region.
            if num_classes is None or cond.config.num_classes != num_classes + 1:
                notes.append(
                    f"{name}: no agreement measure (it needs a segmentation of num_classes = "
                    "the classifier's classes + 1, with 0 for background)."
                )
                continue
            want = _main_class(cond.labels(raw[name])) - 1  # [B]
            from latentgen.rejection import class_probs

            got = class_probs(classifier, images, num_classes).argmax(1).cpu()
            out[f"{name}_main_class_accuracy"] = (got == want).float()
        elif name not in _class_conditions(pipe):
            notes.append(f"{name}: no agreement measure for a {cond.config.type} condition.")
    return out, notes


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    from torch.utils.data import default_collate

    return dict(default_collate(list(items)))


def evaluate_samples(
    pipeline: Any,
    classifier: Any,
    dataset: Any,
    *,
    num_samples: int = 100,
    rejection: float | RejectionConfig | Sequence[float | RejectionConfig] | None = None,
    rejection_classifier: Any = None,
    conditions: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    kid_subset_size: int = 100,
    kid_subsets: int = 100,
    inception: str | Path | InceptionFeatures | None = None,
    size: tuple[int, int] | int | None = None,
    batch_size: int = 32,
    sampler: Any = None,
    condition_keys: Mapping[str, str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[SampleEvaluation]:
    """Class accuracy, KID/FID (classifier features), condition agreement and speed of samples.

    Args:
        pipeline: a ``Pipeline`` or the path of a saved one.
        classifier: a classifier (``.probs``, ``.features``), or the path of a saved one.
        dataset: held-out labelled images (dicts with ``"image"`` and the conditions' keys): the
            real side of KID/FID, and the source of spatial conditions.
        num_samples: with a class condition only, samples per class; otherwise samples, each
            conditioned on one held-out item's conditions.
        rejection: also evaluate with classifier rejection sampling at this acceptance rate
            (a float in (0, 1]) or this ``RejectionConfig``, or at each of a sequence of them
            (one row each, in the order given).
        rejection_classifier: the classifier (or the path of a saved one) that ranks the
            candidates of a rate given as a float (None: ``classifier``). A classifier that
            both chooses the samples and scores them grades its own choice, so their accuracy
            and KID favour it; ranking with another classifier, as the paper does (a ResNet
            ranks, Inception scores), keeps the measure fair. Each rejection row's
            ``ranked_by_scorer`` says which was used.
        conditions: the pipeline's conditions the samples are drawn from (None: all of them);
            the others are left out, so the prior's null embedding takes their place (a prior
            trained with condition dropout). ``["label"]`` measures a label-and-map pipeline
            from the label alone: ``num_samples`` per class, as for a label-only pipeline.
        metrics: any of ``accuracy``, ``kid``, ``fid``, ``agreement`` (None: every one that
            applies; naming ``accuracy`` for a pipeline without a class condition is an error).
        kid_subset_size: images per KID subset (both sets need at least this many).
        kid_subsets: KID subsets averaged.
        inception: Inception-v3 weights (path or ``InceptionFeatures``) for Inception FID/IS.
        size: image size to generate (default: the card's, else the dataset's).
        batch_size: images drawn at once.
        sampler: a ``SamplerConfig`` (or mapping) overriding the pipeline's.
        condition_keys: dataset key of a conditioner's data, by conditioner name.
        seed: seeds the draws and the KID subsets.
        device: where to run (None: where the pipeline is).

    Returns:
        One ``SampleEvaluation`` without rejection and, if asked, one per rejection rate.
    """
    from latentgen.pipeline import Pipeline

    pipe = pipeline if isinstance(pipeline, Pipeline) else Pipeline.from_pretrained(pipeline)
    if device is not None:
        pipe.to(device)
    clf = _load_classifier(classifier)
    if isinstance(clf, torch.nn.Module):
        clf.to(pipe.device).eval()
    wanted = _check_metrics(metrics)
    if num_samples < 1 or batch_size < 1:
        raise InputError(
            f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}."
        )
    if len(dataset) == 0:
        raise DataError("the held-out dataset is empty; give it labelled images.")
    given = _given_conditions(pipe, conditions)
    classes = [n for n in _class_conditions(pipe) if n in given]
    left_out = [n for n in _class_conditions(pipe) if n not in given]
    fix = (
        f"give {left_out[0]!r} too (--condition {left_out[0]}), or leave {{what}}."
        if left_out
        else "use a class-conditional pipeline, or leave {what}."
    )
    if "accuracy" in (metrics or ()) and not classes:
        raise InputError(
            "class accuracy needs a class condition, but the conditions given are "
            f"{sorted(given) or 'none'}: "
            + fix.format(what="accuracy out (KID and FID need no class)")
        )
    if rejection is not None and not classes:
        raise InputError(
            "rejection sampling ranks candidates by the requested class, but the conditions "
            f"given are {sorted(given) or 'none'}: " + fix.format(what="rejection out")
        )
    if len(classes) > 1:
        raise InputError(
            f"this pipeline has several class conditions {classes}; evaluate_samples measures "
            "one requested class per sample."
        )
    hw = _image_size(pipe, dataset, size)
    in_ch = pipe.tokenizer.in_channels
    num_classes = None
    if classes:
        num_classes = pipe.conditioners[classes[0]].vocab_size
        check_classifier(
            clf,
            num_classes=num_classes,
            image_size=hw,
            in_channels=in_ch,
            what=f"the pipeline (condition '{classes[0]}')",
        )
    else:
        k = getattr(clf, "num_classes", None)
        check_classifier(
            clf, num_classes=int(k or 0), image_size=hw, in_channels=in_ch, what="the pipeline"
        )
        num_classes = int(k) if k is not None else None
    spatial_or_none = set(given) != set(classes) or not given
    per_class = classes and not spatial_or_none and num_classes is not None
    total = num_samples * (num_classes or 1) if per_class else num_samples
    if spatial_or_none and given and total > len(dataset):
        raise InputError(
            f"{total} samples conditioned on held-out items need {total} items, but the dataset "
            f"has {len(dataset)}: lower num_samples (-n) or give more held-out data."
        )
    if "kid" in wanted and total < kid_subset_size:
        per = kid_subset_size / total * num_samples  # -n counts samples per class here
        need = kid_subset_size if spatial_or_none else math.ceil(per)
        raise InputError(
            f"KID draws subsets of {kid_subset_size} samples but only {total} will be generated: "
            f"raise num_samples (-n) to at least {need}{'' if spatial_or_none else ' per class'}, "
            f"or lower the subset size (--kid-subset-size {total})."
        )
    keys = {n: (condition_keys or {}).get(n, n) for n in given}
    incep = _inception(inception, pipe.device)

    real_feats, real_incep = _real_features(
        clf,
        dataset,
        min(len(dataset), max(total, kid_subset_size)),
        batch_size,
        pipe.device,
        wanted,
        incep,
        hw,
    )
    modes: list[tuple[str, RejectionConfig | None]] = [("plain", None)]
    ranker = clf if rejection_classifier is None else _load_classifier(rejection_classifier)
    for cfg in _rejection_configs(rejection, ranker, batch_size, pipe.device):
        modes.append((f"rejection@{cfg.acceptance_rate:g}", cfg))
    rows = []
    for name, mode_cfg in modes:
        run = pipe.replace(rejection=mode_cfg)
        rows.append(
            _evaluate_mode(
                name,
                run,
                mode_cfg,
                clf,
                dataset,
                classes,
                num_classes,
                num_samples,
                total,
                hw,
                batch_size,
                sampler,
                keys,
                seed,
                wanted,
                real_feats,
                real_incep,
                incep,
                kid_subset_size,
                kid_subsets,
                spatial_or_none,
            )
        )
    return rows


def _given_conditions(pipe: Any, conditions: Sequence[str] | None) -> list[str]:
    """The names of ``conditions`` (None: all the pipeline's), checked by the pipeline."""
    if conditions is None:
        return list(pipe.conditioners)
    names = list(dict.fromkeys([conditions] if isinstance(conditions, str) else conditions))
    pipe.check_condition_names(names)
    return names


def _rejection_configs(
    rejection: float | RejectionConfig | Sequence[float | RejectionConfig] | None,
    ranker: Any,
    batch_size: int,
    device: torch.device,
) -> list[RejectionConfig]:
    """``rejection`` as a list of configs; a bare rate ranks with ``ranker``."""
    if rejection is None:
        return []
    items = (
        [rejection]
        if isinstance(rejection, (RejectionConfig, int, float))
        or not isinstance(rejection, Sequence)
        else list(rejection)
    )
    if not items:
        raise InputError("rejection is an empty list; give at least one rate, or None.")
    if isinstance(ranker, torch.nn.Module):
        ranker.to(device).eval()
    return [
        r
        if isinstance(r, RejectionConfig)
        else RejectionConfig(classifier=ranker, acceptance_rate=r, batch_size=batch_size)
        for r in items
    ]


def _check_metrics(metrics: Sequence[str] | None) -> set[str]:
    if metrics is None:
        return set(METRICS)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise InputError(f"unknown sample metric(s) {unknown}; choose from {list(METRICS)}.")
    return set(metrics)


def _inception(inception: Any, device: torch.device) -> Any:
    if inception is None:
        return None
    from latentgen.metrics.fid import InceptionFeatures

    net = inception if isinstance(inception, InceptionFeatures) else InceptionFeatures(inception)
    return net.to(device)


def _real_features(
    clf: Any,
    dataset: Any,
    n: int,
    batch_size: int,
    device: torch.device,
    wanted: set[str],
    incep: Any,
    hw: tuple[int, int],
) -> tuple[Tensor | None, Tensor | None]:
    if not wanted & {"kid", "fid"} and incep is None:
        return None, None
    feats, incep_feats = [], []
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it["image"] for it in items]).to(device)  # [b, C, H, W]
        if tuple(x.shape[-2:]) != tuple(hw):
            raise InputError(
                f"the held-out images are {x.shape[-2]}x{x.shape[-1]} but the samples are "
                f"{hw[0]}x{hw[1]}: give held-out data of that size (e.g. image_size: {hw[0]})."
            )
        if wanted & {"kid", "fid"}:
            feats.append(_features(clf, x))
        if incep is not None:
            incep_feats.append(incep(x).cpu())
    return (
        torch.cat(feats) if feats else None,
        torch.cat(incep_feats) if incep_feats else None,
    )


def _evaluate_mode(
    name: str,
    pipe: Any,
    cfg: RejectionConfig | None,
    clf: Any,
    dataset: Any,
    classes: list[str],
    num_classes: int | None,
    num_samples: int,
    total: int,
    hw: tuple[int, int],
    batch_size: int,
    sampler: Any,
    keys: Mapping[str, str],
    seed: int,
    wanted: set[str],
    real_feats: Tensor | None,
    real_incep: Tensor | None,
    incep: Any,
    kid_subset_size: int,
    kid_subsets: int,
    from_data: bool,
) -> SampleEvaluation:
    from latentgen.metrics.fid import fid_from_features
    from latentgen.metrics.inception_score import inception_score
    from latentgen.metrics.kid import kernel_inception_distance
    from latentgen.rejection import class_probs

    generator = torch.Generator(pipe.device).manual_seed(seed)
    feats, incep_feats, incep_probs, correct, requested = [], [], [], [], []
    agree: dict[str, list[Tensor]] = {}
    notes: list[str] = []
    candidates, seconds = 0, 0.0
    for start in range(0, total, batch_size):
        b = min(batch_size, total - start)
        raw: dict[str, Any] = {}
        if from_data and keys:
            batch = _collate([dataset[i] for i in range(start, start + b)])
            for n, key in keys.items():
                if key not in batch:
                    raise DataError(
                        f"conditioner '{n}' needs dataset key '{key}', but items have "
                        f"{sorted(batch)}; map it with condition_keys={{'{n}': <key>}} "
                        f"(--key {n}=<key>)."
                    )
                raw[n] = batch[key]
        elif classes:
            raw[classes[0]] = [(start + i) // num_samples for i in range(b)]  # N per class
        t0 = time.perf_counter()
        images = pipe(
            b if not raw else None,
            size=hw,
            sampler=sampler,
            generator=generator,
            output_type="tensor",
            **raw,
        ).clamp(-1, 1)  # [b, C, H, W]
        seconds += time.perf_counter() - t0
        report = pipe.last_rejection
        candidates += report.candidates if report is not None else b
        if classes and "accuracy" in wanted and num_classes is not None:
            want = pipe.conditioners[classes[0]].encode(raw[classes[0]]).tokens[:, 0]
            got = class_probs(clf, images, num_classes).argmax(1).cpu()
            correct.append((got == want.cpu()).float())
            requested.append(want.cpu())
        if wanted & {"kid", "fid"}:
            feats.append(_features(clf, images))
        if incep is not None:
            incep_feats.append(incep(images).cpu())
            incep_probs.append(incep.class_probs(images).cpu())
        if "agreement" in wanted and raw:
            per, why = _agreement(pipe, clf, num_classes, raw, images)
            for k, v in per.items():
                agree.setdefault(k, []).append(v)
            notes.extend(n for n in why if n not in notes)
    if cfg is not None and cfg.classifier is clf and cfg.acceptance_rate < 1:
        notes.append(
            "the classifier that scored the rejection rows also ranked their candidates, so "
            "their accuracy and KID favour it; rank with another classifier "
            "(--reject-classifier, rejection_classifier=) for a fair measure."
        )
    row: dict[str, Any] = {
        "name": name,
        "samples": total,
        "samples_per_s": total / max(seconds, 1e-9),
        "notes": tuple(notes),
    }
    if cfg is not None:
        row["acceptance_rate"] = float(cfg.acceptance_rate)
        row["realised_rate"] = total / candidates
        row["ranked_by_scorer"] = cfg.classifier is clf
    if correct:
        hits, want = torch.cat(correct), torch.cat(requested)  # [N], [N]
        row["class_accuracy"] = float(hits.mean())
        names = pipe.conditioners[classes[0]].config.class_names or _class_names(clf)
        row["class_accuracy_by_class"] = accuracy_by_class(hits, want, names)
    if feats and real_feats is not None:
        fake = torch.cat(feats)
        if "kid" in wanted:
            kid = kernel_inception_distance(
                real_feats, fake, subset_size=kid_subset_size, num_subsets=kid_subsets, seed=seed
            )
            row["kid"], row["kid_std_error"] = kid.value, kid.std_error
        if "fid" in wanted:
            row["fid"] = fid_from_features(real_feats, fake)
    if incep_feats and real_incep is not None:
        row["inception_fid"] = fid_from_features(real_incep, torch.cat(incep_feats))
        probs = torch.cat(incep_probs)
        row["inception_score"], row["inception_score_std"] = inception_score(
            probs, splits=min(10, probs.shape[0])
        )
    row["agreement"] = {k: float(torch.cat(v).mean()) for k, v in agree.items()}
    return SampleEvaluation(**row)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of figures as an aligned text table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
