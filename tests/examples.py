"""One small, valid config per registered component type.

Spec round-trip and contract tests run over every registered type and fail for a type that has
no example here, so a new component cannot slip in untested.
"""

from __future__ import annotations

from typing import Any

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
        "fashion_mnist": {"type": "fashion_mnist"},
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
