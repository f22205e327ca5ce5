"""One small, valid config per component type that latentgen ships.

Spec round-trip and contract tests run over every type that latentgen ships (its built-ins and
the plugins under plugins/ in this repository) and fail for one that has no example here, so a
new component cannot slip in untested. A third-party plugin that happens to be installed is
left to its own test suite (latentgen.testing has the contracts), unless an example for its
type is added here.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib

from latentgen import registry

_REPO = Path(__file__).resolve().parents[1]

EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "tokenizer": {
        "toy.palette": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
        "vqvae": {
            "type": "vqvae",
            "ch": 16,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "z_channels": 8,
            "resolution": 16,
            "quantizer": {"type": "vq", "codebook_size": 32, "dim": 8},
        },
        "vqgan": {
            "type": "vqgan",
            "ch": 16,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [8],
            "z_channels": 8,
            "resolution": 16,
            "quantizer": {"type": "vq", "codebook_size": 32, "dim": 8},
            "perceptual_weight": 0.0,
        },
    },
    "prior": {
        "toy.ngram": {"type": "toy.ngram", "vocab_size": 8, "order": 3},
        "transformer": {
            "type": "transformer",
            "vocab_size": 16,
            "block_size": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
        },
        "masked": {
            "type": "masked",
            "vocab_size": 16,
            "block_size": 16,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
            "steps": 4,
            "elbo_samples": 4,
        },
        "pixelsnail": {
            "type": "pixelsnail",
            "vocab_size": 16,
            "channel": 16,
            "n_block": 1,
            "n_res_block": 1,
            "res_channel": 16,
            "max_height": 8,
            "max_width": 8,
        },
    },
    "conditioner": {
        "class_label": {"type": "class_label", "num_classes": 5},
        "segmentation": {"type": "segmentation", "num_classes": 4, "downsample": 4},
        "depth": {"type": "depth", "downsample": 4, "levels": 8},
        "pose": {"type": "pose", "num_keypoints": 3, "image_size": 16, "downsample": 4},
        "edges": {"type": "edges", "downsample": 4},
        "low_resolution": {"type": "low_resolution", "factor": 2, "downsample": 2},
    },
    "quantizer": {
        "vq": {"type": "vq", "codebook_size": 16, "dim": 4},
        "ema": {"type": "ema", "codebook_size": 16, "dim": 4},
        "gumbel": {"type": "gumbel", "codebook_size": 16, "dim": 4},
        "fsq": {"type": "fsq", "levels": [4, 4]},
    },
    "attention_backend": {
        "sdpa": {"type": "sdpa"},
        "math": {"type": "math"},
        "xformers": {"type": "xformers"},
        "flex": {"type": "flex"},
    },
    "dataset": {
        "shapes": {"type": "shapes", "size": 4, "image_size": 16},
        "image_folder": {"type": "image_folder", "root": "/nonexistent", "image_size": 16},
        "paired_folder": {"type": "paired_folder", "root": "/nonexistent", "image_size": 16},
        "condition_maps": {
            "type": "condition_maps",
            "conditioner": {"type": "segmentation", "num_classes": 7},
            "data": {"type": "shapes", "size": 4, "image_size": 16},
        },
        "fashion_mnist": {"type": "fashion_mnist"},
    },
    "classifier": {
        "cnn": {"type": "cnn", "num_classes": 3, "image_size": 16, "widths": [8, 16]},
    },
}


def example(kind: str, type_: str) -> dict[str, Any]:
    """The example config of a registered type; fails loudly for a type without one."""
    try:
        return EXAMPLES[kind][type_]
    except KeyError:
        raise AssertionError(
            f"{kind} type '{type_}' is registered but tests/examples.py has no example config "
            "for it: add one so the spec and contract tests cover it."
        ) from None


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalisation


def shipped_plugins() -> set[str]:
    """Distribution names whose components latentgen ships: itself and plugins/* here."""
    names = {"latentgen"}
    for pyproject in sorted(_REPO.glob("plugins/*/pyproject.toml")):
        names.add(tomllib.loads(pyproject.read_text())["project"]["name"])
    return {_dist_key(n) for n in names}


def swept(kind: str) -> list[str]:
    """Registered types of ``kind`` the suite tests: shipped ones, and others given an example."""
    ours = shipped_plugins()
    return [
        e.type
        for e in registry.entries(kind)
        if _dist_key(e.plugin) in ours or e.type in EXAMPLES.get(kind, {})
    ]


#: A pipeline small enough to build in milliseconds: toy palette tokenizer, one-layer
#: class-conditional transformer (3 classes, 4x4 codes). Shared by tests that need any pipeline.
TINY_LABEL_SPEC: dict[str, Any] = {
    "tokenizer": {"type": "toy.palette", "vocab_size": 8, "downsample": 4},
    "prior": {
        "type": "transformer",
        "vocab_size": 8,
        "block_size": 16,
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "conditions": {"label": {"vocab_size": 3}},
    },
    "conditioners": {"label": {"type": "class_label", "num_classes": 3}},
}

#: A trainable vqvae for 16x16 images (4x4 codes from 16), the smallest the conditioning tests use.
TINY_VQVAE_16: dict[str, Any] = {
    "type": "vqvae",
    "ch": 8,
    "ch_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "z_channels": 8,
    "resolution": 16,
    "norm_groups": 4,
    "quantizer": {"type": "vq", "codebook_size": 16, "dim": 4},
}


def tiny_conditioned_pipe(
    conditioners: dict[str, Any], slots: dict[str, Any], **prior_kw: Any
) -> Any:
    """A pipeline of ``TINY_VQVAE_16`` and a one-layer transformer with these conditioners and
    condition slots (``prior_kw``: more prior fields, e.g. ``window`` or ``cond_dropout``)."""
    from latentgen import Pipeline

    prior = {**EXAMPLES["prior"]["transformer"], "conditions": slots, **prior_kw}
    return Pipeline.from_spec(
        {"tokenizer": TINY_VQVAE_16, "prior": prior, "conditioners": conditioners}
    )


def full_forward_windows(prior: Any, monkeypatch: Any) -> None:
    """Make ``prior`` draw sliding windows with one full forward per window position (the
    teacher-forced reference the KV-cached window decoder is checked against)."""
    from latentgen.priors.window import FullForwardDecoder

    monkeypatch.setattr(
        prior,
        "window_decoder",
        lambda rows, size, slots=1: FullForwardDecoder(prior, rows, size, slots),
    )


def load_benchmark(name: str, monkeypatch: Any) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as module ``name`` (its helpers in benchmarks/ too), so
    the smoke tests call the script's own functions."""
    folder = _REPO / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))  # its helpers, e.g. benchmarks/_photos.py
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module
