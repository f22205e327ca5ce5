"""The README's main job: train both stages on the built-in shapes data, measure, write images.

``run_demo`` trains a small VQGAN (stage 1) and one transformer prior (stage 2) with the
shipped configs (``latentgen/configs/shapes-*.yaml``) on a CPU in a few minutes. The prior is
conditioned on a class label and on a segmentation map (the zero-training segmentation stage),
each dropped on its own in training (``cond_dropout_each``), so the one pipeline draws:

- class-conditional samples (label alone): ``samples.png``, one row per class, scored by the
  shipped shapes classifier (class accuracy, KID in its feature space);
- the same with classifier rejection sampling (the paper's sec. 4.4): ``samples-rejection.png``
  keeps the best of 4 candidates per image as ranked by a *second* shipped classifier
  (``shapes_ranker_path()``), scored by the reference one, so the figure is not one classifier
  agreeing with itself;
- held-out originals over their reconstructions (``reconstructions.png``, PSNR);
- a 512x512 image from a 512x512 segmentation map (map alone) with the KV-cached sliding
  window, far beyond the 32x32 images it was trained on (``large-512.png``, the map beside it
  in ``large-512-map.png``).

The figures go to ``metrics.json`` beside the PNGs. ``run_toy_demo`` does a smaller job in
seconds with the outside plugin ``latentgen-toy`` (a k-means palette tokenizer and a counting
n-gram prior).
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from latentgen.data.base import to_pil
from latentgen.data.shapes import CLASSES, ShapesConfig, ShapesDataset
from latentgen.pipeline import Pipeline
from latentgen.utils import image_grid

__all__ = [
    "demo_configs",
    "run_demo",
    "run_toy_demo",
    "shapes_classifier_path",
    "shapes_ranker_path",
]

#: Held-out items are rendered from seeds far from the training data's.
HELD_OUT_SEED = 10**6

#: The demo's rejection sampling keeps one candidate in four.
ACCEPTANCE_RATE = 0.25


def shapes_classifier_path() -> Path:
    """The shipped reference classifier of the shapes data (> 98% held-out accuracy).

    Trained by ``latentgen train classifier --config
    src/latentgen/configs/shapes-classifier.yaml``; shipped so that every run is measured
    with the same instrument, and the demo does not spend minutes training it.
    """
    return Path(str(resources.files("latentgen") / "weights" / "shapes-classifier"))


def shapes_ranker_path() -> Path:
    """A second shapes classifier, which ranks the candidates of the demo's rejection sampling.

    Trained by ``latentgen train classifier --config src/latentgen/configs/shapes-ranker.yaml``:
    the reference classifier's recipe on other items and another seed (99.8% held out). The
    demo keeps the candidates this one prefers and scores them with the reference classifier:
    ranked and scored by the same one, rejection measures its agreement with itself
    (docs/evaluation.md, "Rejection sampling on the demo pipeline").
    """
    return Path(str(resources.files("latentgen") / "weights" / "shapes-ranker"))


def demo_configs(out: Path) -> tuple[Path, Path]:
    """Write the shipped stage-1 and stage-2 configs into ``out``, with runs under ``out/runs``."""
    files = resources.files("latentgen") / "configs"
    tok = yaml.safe_load((files / "shapes-vqgan.yaml").read_text())
    prior = yaml.safe_load((files / "shapes-transformer.yaml").read_text())
    runs = out / "runs"
    tok["trainer"]["runs_dir"] = str(runs)
    prior["trainer"]["runs_dir"] = str(runs)
    prior["tokenizer_path"] = str(runs / tok["trainer"]["run_name"])
    paths = out / "shapes-vqgan.yaml", out / "shapes-transformer.yaml"
    for path, cfg in zip(paths, (tok, prior)):
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def run_demo(
    out: str | Path = "out/demo",
    seed: int = 0,
    classifier: str | Path | None = None,
    samples_per_class: int = 20,
    large_size: int = 512,
    ranker: str | Path | None = None,
    acceptance_rate: float = ACCEPTANCE_RATE,
) -> dict[str, Path]:
    """Train the VQGAN, then the prior on its codes; sample, measure and write the images.

    ``classifier`` (default: the shipped shapes classifier) scores the samples; ``ranker``
    (default: the shipped second one) ranks the candidates of the rejection-sampled ones, of
    which ``acceptance_rate`` are kept (1: no rejection sampling, and no
    ``samples-rejection.png``); ``large_size`` is the side of the image drawn from a
    segmentation map with the sliding window. Returns the paths written.
    """
    from latentgen.classifiers import load_classifier
    from latentgen.files import atomic_write_json
    from latentgen.rejection import RejectionConfig
    from latentgen.training.cli import train_prior, train_tokenizer
    from latentgen.training.loop import FLUSH_DENORMAL_DEFAULT, flush_denormals

    # The demo's trainer configs keep flush_denormal's default; loading the classifiers below
    # starts torch's CPU threads, which take the flag only if it is set before they start.
    flush_denormals(FLUSH_DENORMAL_DEFAULT)
    # Checked before minutes of training: a bad rate or ranker fails now.
    rejection = None
    if acceptance_rate != 1:
        rejection = RejectionConfig(
            classifier=ranker if ranker is not None else shapes_ranker_path(),
            acceptance_rate=acceptance_rate,
        )

    start = time.perf_counter()
    out = Path(out)
    clf = load_classifier(classifier if classifier is not None else shapes_classifier_path())
    shutil.rmtree(out / "runs", ignore_errors=True)  # the demo's own runs start afresh
    out.mkdir(parents=True, exist_ok=True)
    tok_cfg, prior_cfg = demo_configs(out)
    # Through click's own parsing, so every option the commands gain keeps its default here.
    print(f"stage 1: training a VQGAN ({tok_cfg})", flush=True)
    train_tokenizer.main(["--config", str(tok_cfg)], standalone_mode=False)
    trained_1 = time.perf_counter()
    print(f"stage 2: training a transformer prior on its codes ({prior_cfg})", flush=True)
    train_prior.main(["--config", str(prior_cfg)], standalone_mode=False)
    trained_2 = time.perf_counter()
    final = out / "runs" / yaml.safe_load(prior_cfg.read_text())["trainer"]["run_name"] / "final"
    pipe = Pipeline.from_pretrained(final)
    image_size = int(pipe.card.get("image_size", [32])[0])

    paths: dict[str, Path] = {"pipeline": final}
    metrics: dict[str, Any] = {}
    paths |= _class_samples(pipe, clf, out, image_size, seed, samples_per_class, metrics, rejection)
    paths |= _reconstructions(pipe, clf, out, image_size, seed, metrics)
    sampled = time.perf_counter()
    paths |= _large_from_segmentation(pipe, clf, out, image_size, large_size, seed, metrics)
    done = time.perf_counter()
    metrics["seconds"] = {
        "tokenizer_training": round(trained_1 - start, 1),
        "prior_training": round(trained_2 - trained_1, 1),
        "samples_and_measures": round(sampled - trained_2, 1),
        "large_image": round(done - sampled, 1),
        "total": round(done - start, 1),
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    paths["metrics"] = out / "metrics.json"
    acc, kid, rec = metrics["class_accuracy"], metrics["kid"], metrics["reconstruction_psnr_db"]
    own = metrics["classifier_held_out_accuracy"]
    own_text = "not measured" if own is None else f"{own:.1%}"
    rej = metrics.get("rejection")
    rej_text = (
        ""
        if rej is None
        else f"; {rej['class_accuracy']:.1%} keeping the best {metrics['samples']} of "
        f"{rej['candidates']} candidates by a second classifier"
    )
    print(
        f"class accuracy {acc:.1%} of {metrics['samples']} samples{rej_text} (classifier: "
        f"{own_text} on held-out shapes) | KID "
        f"{kid['value']:.4f} +- {kid['std_error']:.4f} | reconstruction PSNR "
        f"{rec:.2f} dB, {metrics['reconstruction_class_accuracy']:.1%} read as their class | "
        f"{done - start:.0f} s -> {paths['metrics']}"
    )
    return paths


def _class_samples(
    pipe: Pipeline,
    clf: Any,
    out: Path,
    image_size: int,
    seed: int,
    per_class: int,
    metrics: dict[str, Any],
    rejection: Any = None,
) -> dict[str, Path]:
    """Samples from the label alone: a grid (one row per class), class accuracy and KID.

    With ``rejection`` (a ``RejectionConfig``), the same draw again with classifier rejection
    sampling: each image is the best of ``1 / acceptance_rate`` candidates under
    ``rejection.classifier``, scored by ``clf`` against the same real images, into
    ``samples-rejection.png`` and ``metrics["rejection"]``.
    """
    k = len(CLASSES)
    labels = [c for c in range(k) for _ in range(per_class)]  # class-major
    with torch.no_grad():  # KID's real side: as many held-out images, shared by both draws
        held = ShapesDataset(
            ShapesConfig(size=len(labels), image_size=image_size, seed=seed + HELD_OUT_SEED)
        )
        real = clf.features(torch.stack([held[i]["image"] for i in range(len(held))]))  # [N, D]

    def draw_and_score(p: Pipeline, path: Path) -> dict[str, Any]:
        images = p(
            label=labels,
            size=image_size,
            generator=torch.Generator().manual_seed(seed),
            output_type="tensor",
        )  # [k * per_class, 3, S, S]
        shown = min(per_class, 8)
        rows = images.view(k, per_class, *images.shape[1:])[:, :shown].flatten(0, 1)
        _save_png(image_grid(to_pil(rows), nrow=shown), path)  # row r holds class r
        return _score(clf, images, torch.tensor(labels), real, seed)

    paths = {"samples": out / "samples.png"}
    metrics.update(
        draw_and_score(pipe, paths["samples"]),
        samples=len(labels),
        classifier_held_out_accuracy=clf.held_out_accuracy,
    )
    print(f"samples   -> {paths['samples']} (one row per class: {', '.join(CLASSES)})")
    if rejection is None:
        return paths
    paths["samples_rejection"] = path = out / "samples-rejection.png"
    ranked = pipe.replace(rejection=rejection)
    scored = draw_and_score(ranked, path)
    report = ranked.last_rejection
    assert report is not None
    metrics["rejection"] = {
        "acceptance_rate": rejection.acceptance_rate,
        "realised_rate": report.realised_rate,
        "candidates": report.candidates,
        "ranker_held_out_accuracy": getattr(rejection.classifier, "held_out_accuracy", None),
        **scored,
    }
    print(
        f"samples, the best {report.kept} of {report.candidates} candidates by a second "
        f"classifier -> {path}"
    )
    return paths


def _score(clf: Any, images: Tensor, want: Tensor, real: Tensor, seed: int) -> dict[str, Any]:
    """Class accuracy (overall and per class) of ``images`` asked for classes ``want``, and
    KID of their features against ``real`` ones."""
    from latentgen.metrics.kid import kernel_inception_distance
    from latentgen.sample_eval import accuracy_by_class

    with torch.no_grad():
        fake = clf.features(images)  # [N, D]
        pred = clf.logits(images).argmax(-1)  # [N]
    per = accuracy_by_class(pred == want, want, CLASSES)
    kid = kernel_inception_distance(real, fake, subset_size=min(100, len(want)), seed=seed)
    return {
        "class_accuracy": float((pred == want).float().mean()),
        "class_accuracy_per_class": per,
        "kid": {"value": kid.value, "std_error": kid.std_error, "subset_size": kid.subset_size},
    }


def _save_png(image: Any, path: Path) -> None:
    """Write a PIL image as PNG atomically (a stopped demo leaves no half-written file)."""
    import io

    from latentgen.files import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _reconstructions(
    pipe: Pipeline, clf: Any, out: Path, image_size: int, seed: int, metrics: dict[str, Any]
) -> dict[str, Path]:
    """Held-out originals over their reconstructions; over 256 held-out images, the PSNR and
    the share of reconstructions ``clf`` reads as their class (whether the codes keep the
    shapes: PSNR is mostly the colours)."""
    from latentgen.evaluation import evaluate_tokenizer

    held = ShapesDataset(ShapesConfig(size=256, image_size=image_size, seed=seed + HELD_OUT_SEED))
    scores = evaluate_tokenizer(pipe.tokenizer, held, batch_size=64, lpips=False, classifier=clf)
    metrics["reconstruction_psnr_db"] = scores.psnr_db
    metrics["reconstruction_class_accuracy"] = scores.class_accuracy
    metrics["reconstruction_images"] = scores.images
    test = torch.stack([held[i]["image"] for i in range(8)])  # [8, 3, S, S]
    pairs = torch.cat([test, pipe.reconstruct(test).clamp(-1, 1)])
    _save_png(image_grid(to_pil(pairs), nrow=8), out / "reconstructions.png")
    print(f"originals over reconstructions -> {out / 'reconstructions.png'}")
    return {"reconstructions": out / "reconstructions.png"}


def _large_from_segmentation(
    pipe: Pipeline,
    clf: Any,
    out: Path,
    image_size: int,
    size: int,
    seed: int,
    metrics: dict[str, Any],
) -> dict[str, Path]:
    """A ``size`` x ``size`` image from a segmentation map alone, with the cached window, and
    how well it follows the map: the share of its ``image_size`` cells that the classifier
    reads as the main shape of the cell's map."""
    from latentgen.conditioners.scene import generate_from_segmentation, shapes_scene

    # a mosaic of held-out shapes maps, one per training-sized cell
    ids = shapes_scene(size, cell=image_size, seed=seed + 2 * HELD_OUT_SEED)  # [size, size]
    began = time.perf_counter()
    image_path, map_path = generate_from_segmentation(
        pipe,
        ids,
        out / f"large-{size}.png",
        window="cached",
        band="middle",  # the prior learned whole 32x32 images: centred windows suit it
        generator=torch.Generator().manual_seed(seed),
    )  # the label is left out: the prior's null takes its place
    seconds = time.perf_counter() - began
    h, w = pipe.tokenizer.code_grid((size, size))
    agreement = _map_agreement(clf, image_path, ids, image_size)
    metrics["large_image"] = {
        "size": [size, size],
        "codes": h * w,
        "window": "cached",
        "window_band": "middle",
        "seconds": round(seconds, 1),
        "codes_per_s": round(h * w / seconds, 1),
        "cells_following_the_map": agreement,
        "cells": (size // image_size) ** 2,
    }
    print(
        f"{size}x{size} from a segmentation map ({h * w} codes, cached sliding window, "
        f"{seconds:.0f} s; {agreement:.1%} of its {image_size}x{image_size} cells show their "
        f"map's shape) -> {image_path} (map: {map_path})"
    )
    return {"large": image_path, "segmentation_map": map_path}


def _map_agreement(clf: Any, image_path: Path, ids: torch.Tensor, cell: int) -> float:
    """Share of the ``cell`` x ``cell`` blocks of the written image that the classifier reads
    as the main shape of the same block of the map ``ids [H, W]`` (class ids, 0 background)."""
    from PIL import Image

    from latentgen.data.base import to_tensor
    from latentgen.sample_eval import _main_class

    image = to_tensor(Image.open(image_path).convert("RGB"))  # [3, H, W] in [-1, 1]
    rows, cols = ids.shape[0] // cell, ids.shape[1] // cell

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [..., H, W] -> [n, ..., cell, cell]
        x = x.unflatten(-2, (rows, cell)).unflatten(-1, (cols, cell))  # [..., r, c, r, c]
        return x.movedim((-4, -2), (0, 1)).flatten(0, 1)

    want = _main_class(blocks(ids)) - 1  # [n]: class c is id c + 1
    with torch.no_grad():
        pred = clf.logits(blocks(image)).argmax(-1)  # [n]
    return float((pred == want).float().mean())


def _write_grids(pipe: Pipeline, out: Path, image_size: int, seed: int) -> dict[str, Path]:
    """One row of samples per class, and held-out originals over their reconstructions."""
    per_class = 6
    samples = pipe(
        label=list(range(len(CLASSES))),
        num_images=per_class * len(CLASSES),
        size=image_size,
        generator=torch.Generator().manual_seed(seed),
    )
    _save_png(image_grid(samples, nrow=per_class), out / "samples.png")  # row r holds class r
    held_out = ShapesDataset(ShapesConfig(size=8, image_size=image_size, seed=seed + 10**6))
    test = torch.stack([held_out[i]["image"] for i in range(8)])  # [8, 3, S, S]
    pairs = torch.cat([test, pipe.reconstruct(test)])
    _save_png(image_grid(to_pil(pairs), nrow=8), out / "reconstructions.png")
    print(f"samples   -> {out / 'samples.png'} (one row per class: {', '.join(CLASSES)})")
    print(f"originals over reconstructions -> {out / 'reconstructions.png'}")
    return {"samples": out / "samples.png", "reconstructions": out / "reconstructions.png"}


def run_toy_demo(
    out: str | Path = "out/demo", num_train: int = 2048, image_size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """The toy plugin's pipeline: fit (by counting), save, reload and sample, in seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(ShapesConfig(size=num_train, image_size=image_size, seed=seed))
    images = torch.stack([data[i]["image"] for i in range(num_train)])  # [N, 3, S, S]
    labels = [data[i]["label"] for i in range(num_train)]
    pipe = Pipeline.from_spec(
        {
            "tokenizer": {"type": "toy.palette", "vocab_size": 32, "downsample": 4},
            "prior": {
                "type": "toy.ngram",
                "vocab_size": 32,
                "order": 4,
                "alpha": 0.01,
                "conditions": {"label": {"vocab_size": len(CLASSES)}},
            },
            "conditioners": {
                "label": {
                    "type": "class_label",
                    "num_classes": len(CLASSES),
                    "class_names": list(CLASSES),
                }
            },
            "sampler": {"temperature": 0.9, "top_k": 8},
        }
    )
    tokenizer: Any = pipe.tokenizer  # the toy classes' own fit() methods
    prior: Any = pipe.prior
    tokenizer.fit(images[:512], generator=torch.Generator().manual_seed(seed))
    codes = pipe.encode(images)
    prior.fit(codes, pipe.condition(label=labels))
    held_out = ShapesDataset(ShapesConfig(size=64, image_size=image_size, seed=seed + 10**6))
    test = torch.stack([held_out[i]["image"] for i in range(64)])
    test_labels = [held_out[i]["label"] for i in range(64)]
    bits = float(
        -pipe.log_likelihood(test, label=test_labels).mean()
        / (pipe.encode(test)[0].numel() * torch.log(torch.tensor(2.0)))
    )

    pipe_dir = pipe.save_pretrained(
        out / "pipeline",
        card={
            "image_size": image_size,
            "dataset": "shapes (built-in, synthetic)",
            "value_range": [-1, 1],
            "downsample": pipe.tokenizer.downsample,
        },
    )
    pipe = Pipeline.from_pretrained(pipe_dir)  # sample from what is on disk
    print(f"held-out NLL: {bits:.3f} bits per code ({pipe.tokenizer.vocab_size} codes)")
    print(f"pipeline  -> {pipe_dir}")
    return _write_grids(pipe, out, image_size, seed) | {"pipeline": pipe_dir}
