"""``latentgen convert``: bring Taming Transformers checkpoints over, reading tensors only.

Their files are PyTorch Lightning pickles. ``read_lightning_checkpoint`` opens them with
``torch.load(weights_only=True)`` or an allow-list unpickler that never imports what the file
names, so converting a checkpoint cannot run code from it. Every key and shape is checked.

- ``taming-vqgan CKPT OUT_DIR``: a first-stage VQGAN -> a tokenizer component directory (what
  ``latentgen train tokenizer`` exports), usable by ``train prior``, ``eval tokenizer`` and
  ``reconstruct``. A pipeline needs a prior, which a VQGAN checkpoint does not have.
- ``taming-transformer CKPT OUT_DIR``: a Net2NetTransformer (GPT + its first-stage VQGAN, and a
  class-label condition stage where it has one) -> a complete pipeline directory.

Conversion is deterministic: converting one file twice writes identical weights. A checkpoint
without discriminator weights (stripped for inference, or trained with their DummyLoss) gets a
discriminator initialised from a fixed seed, which only fine-tuning uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from latentgen.errors import CheckpointError

__all__ = ["convert", "convert_taming_transformer", "load_taming_vqgan"]

_FIRST_STAGE = "first_stage_model."
_COND_STAGE = "cond_stage_model."


def _read_yaml(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import yaml

    from latentgen.utils import read_config_text

    try:
        data = yaml.safe_load(read_config_text(path, "model config"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read their model config {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a model.yaml mapping.")
    return data


def _params(node: Any) -> dict[str, Any]:
    """``{target, params}`` nodes of their yaml -> params (or the mapping itself)."""
    if isinstance(node, Mapping):
        if "model" in node:
            node = node["model"]
        if isinstance(node, Mapping) and "params" in node:
            return dict(node["params"])
        return dict(node)
    return {}


def _target(node: Any) -> str:
    if isinstance(node, str):
        return node
    return str(node.get("target", "")) if isinstance(node, Mapping) else ""


def _read_state(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from latentgen.files import load_tensors

        return load_tensors(path)
    from latentgen.tokenizers.taming import read_lightning_checkpoint

    return read_lightning_checkpoint(path)


def load_taming_vqgan(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None) -> Any:
    """A built ``vqgan`` tokenizer holding a taming VQGAN's weights."""
    from latentgen import registry
    from latentgen.artifact import load_module
    from latentgen.tokenizers.taming import convert_taming_vqgan

    cfg, tensors = convert_taming_vqgan(state_dict, config, init_missing_discriminator=True)
    tok = registry.build("tokenizer", cfg)
    missing_disc = {k: v for k, v in tok.state_dict().items() if k not in tensors}
    load_module(tok, {**missing_disc, **tensors}, "converted VQGAN")
    return tok


def convert_taming_transformer(
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    n_head: int | None = None,
    num_classes: int | None = None,
    sos_token: int | None = None,
) -> Any:
    """A ``Pipeline`` from a Net2NetTransformer state dict (and its model.yaml, if given).

    Conditioning: unconditional models (their ``SOSProvider``) get no conditioner and start
    from ``sos_token`` (the argument, else the yaml's, else 0); class-label models
    (``cond_stage_key: class_label``, e.g. their ImageNet ``cin`` model) get a ``class_label``
    conditioner of ``num_classes`` (from the yaml or the argument).
    """
    from latentgen import registry
    from latentgen.artifact import load_module
    from latentgen.pipeline import Pipeline
    from latentgen.priors.taming_gpt import convert_taming_gpt

    params = _params(config or {})
    first = {k[len(_FIRST_STAGE) :]: v for k, v in state_dict.items() if k.startswith(_FIRST_STAGE)}
    if not first:
        raise CheckpointError(
            "no first_stage_model.* keys: this is not a Net2NetTransformer checkpoint. Use "
            "`latentgen convert taming-vqgan` for a first-stage VQGAN."
        )
    tokenizer = load_taming_vqgan(first, params.get("first_stage_config"))

    gpt_params = _params(params.get("transformer_config", {}))
    heads = n_head or gpt_params.get("n_head")
    if heads is None:
        raise CheckpointError(
            "the number of attention heads is not stored in the weights: pass --n-head (16 for "
            "their released models) or their model.yaml with --config."
        )
    cond_key = params.get("cond_stage_key")
    cond_cfg = params.get("cond_stage_config")
    cond_target = _target(cond_cfg)
    if num_classes is None and (cond_key == "class_label" or cond_target.endswith("Labelator")):
        num_classes = _params(cond_cfg).get("n_classes")
        if num_classes is None:
            raise CheckpointError("a class-conditional model: pass --num-classes.")
    if any(k.startswith(_COND_STAGE) for k in state_dict) and num_classes is None:
        raise CheckpointError(
            f"the checkpoint has a learned condition stage ({cond_target or 'cond_stage_model'}), "
            "e.g. a segmentation or depth VQGAN; latentgen converts unconditional and "
            "class-label Net2NetTransformers so far."
        )
    hints: dict[str, Any] = {"n_head": int(heads)}
    conditioners: dict[str, Any] = {}
    if num_classes is not None:
        if sos_token is not None:
            raise CheckpointError(
                "--sos-token applies to unconditional models only; a class-conditional model "
                "starts from its class token."
            )
        hints["conditions"] = {"label": {"vocab_size": int(num_classes)}}
        conditioners["label"] = registry.build(
            "conditioner", {"type": "class_label", "num_classes": int(num_classes)}
        )
    else:
        default = _params(cond_cfg).get("sos_token", params.get("sos_token", 0))
        hints["sos_token"] = int(default if sos_token is None else sos_token)
    prior_cfg, tensors = convert_taming_gpt(state_dict, hints)
    prior = registry.build("prior", prior_cfg)
    load_module(prior, tensors, "converted transformer")
    return Pipeline(tokenizer, prior, conditioners)


@click.group("convert")
def convert() -> None:
    """Convert checkpoints from other projects (tensors only: nothing in them is executed)."""


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@convert.command("taming-vqgan")
@click.argument("ckpt", type=_FILE)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "model_yaml",
    type=_FILE,
    default=None,
    help="Their model.yaml; without it the architecture is read from tensor shapes.",
)
def taming_vqgan(ckpt: Path, out_dir: Path, model_yaml: Path | None) -> None:
    """Convert a taming-transformers VQGAN (.ckpt) into a latentgen tokenizer directory."""
    from latentgen.artifact import save_component

    tok = load_taming_vqgan(_read_state(ckpt), _params(_read_yaml(model_yaml) or {}) or None)
    save_component(tok, "tokenizer", out_dir)
    click.echo(f"wrote tokenizer ({tok.vocab_size} codes, f={tok.downsample}) to {out_dir}")


@convert.command("taming-transformer")
@click.argument("ckpt", type=_FILE)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "model_yaml",
    type=_FILE,
    default=None,
    help="Their Net2NetTransformer model.yaml (heads, condition stage).",
)
@click.option(
    "--n-head",
    type=click.IntRange(1),
    default=None,
    help="Attention heads, when no --config is given (16 in their released models).",
)
@click.option(
    "--num-classes",
    type=click.IntRange(1),
    default=None,
    help="Class-conditional models: number of classes, when no --config is given.",
)
@click.option(
    "--sos-token",
    type=click.IntRange(0),
    default=None,
    help="Unconditional models: the start token their SOSProvider prepends, when no --config "
    "is given (default 0).",
)
@click.option(
    "--image-size",
    type=click.IntRange(1),
    default=None,
    help="Recorded in the pipeline card as the default sampling size.",
)
def taming_transformer(
    ckpt: Path,
    out_dir: Path,
    model_yaml: Path | None,
    n_head: int | None,
    num_classes: int | None,
    sos_token: int | None,
    image_size: int | None,
) -> None:
    """Convert a taming-transformers Net2NetTransformer (.ckpt) into a latentgen pipeline."""
    pipe = convert_taming_transformer(
        _read_state(ckpt), _read_yaml(model_yaml), n_head, num_classes, sos_token
    )
    card: dict[str, Any] = {"source": f"taming-transformers checkpoint {ckpt.name}"}
    if image_size:
        card["image_size"] = image_size
    pipe.save_pretrained(out_dir, card=card)
    click.echo(f"wrote {pipe!r} to {out_dir}")
