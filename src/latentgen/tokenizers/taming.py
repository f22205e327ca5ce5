"""Import taming-transformers VQGAN checkpoints (https://github.com/CompVis/taming-transformers).

Their ``last.ckpt`` files are PyTorch Lightning checkpoints of a ``VQModel`` / ``GumbelVQ``:
a pickle holding the ``state_dict`` next to training state (callbacks, hyper-parameters) whose
classes live in ``pytorch_lightning``. ``read_lightning_checkpoint`` extracts the tensors without
importing or running any of those classes, and ``convert_taming_vqgan`` maps the keys onto a
``vqgan`` tokenizer, checking every key and shape::

    sd = read_lightning_checkpoint("vqgan_imagenet_f16_1024/checkpoints/last.ckpt")
    config, tensors = convert_taming_vqgan(sd, yaml.safe_load(open(".../configs/model.yaml")))
    tok = VQGAN(config); tok.load_state_dict(tensors)

Key mapping (ours <- theirs): ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*`` unchanged; ``quantizer.codebook`` <- ``quantize.embedding.weight`` (VQ);
``quantizer.to_logits.*`` <- ``quantize.proj.*`` and ``quantizer.codebook.weight`` <-
``quantize.embed.weight`` (Gumbel); ``discriminator.*`` <- ``loss.discriminator.*``. Dropped:
``loss.perceptual_loss.*`` (LPIPS, loaded separately) and ``colorize`` (a random projection
their segmentation models keep for logging).

One training difference remains: taming's ``VectorQuantizer2`` (``legacy=True``) weighs the
codebook term by beta instead of the commitment term. The converted config uses the paper's
form (``commitment_beta=0.25`` on the commitment term); inference is identical.
"""

from __future__ import annotations

import builtins
import collections
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from latentgen.artifact import state_dict_problems
from latentgen.errors import CheckpointError
from latentgen.tokenizers.discriminator import NLayerDiscriminator
from latentgen.tokenizers.vqgan import VQGAN, VQGANConfig

__all__ = ["convert_taming_vqgan", "read_lightning_checkpoint", "taming_config"]

_DROPPED = ("loss.perceptual_loss.", "colorize")
# Our bookkeeping buffers that taming has no counterpart for, and the value a trained model
# should carry. The codebook of a trained model is initialised: k-means must not run again.
_FILLED = {
    "quantizer.codebook_initialized": 1,
    "quantizer.step": 0,
}


# -- reading Lightning checkpoints ---------------------------------------------------------------
class _Inert:
    """Stands in for a class or function named in a checkpoint that we refuse to import.

    Calling it, building it, setting its state or filling it like a dict or list runs nothing
    and keeps nothing, so the unpickler can walk past Lightning callbacks, hyper-parameter
    containers, numpy scalars and the like.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _allowed_globals() -> dict[str, Any]:
    """The only globals the fallback unpickler resolves: tensor rebuilding and plain data."""
    allowed: dict[str, Any] = {
        f"torch._utils.{n}": getattr(torch._utils, n)
        for n in (
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        )
        if hasattr(torch._utils, n)
    }
    allowed["torch._tensor._rebuild_from_type_v2"] = torch._tensor._rebuild_from_type_v2
    allowed["torch.Size"] = torch.Size
    allowed["torch.device"] = torch.device
    allowed["torch.nn.parameter.Parameter"] = torch.nn.Parameter
    allowed["collections.OrderedDict"] = collections.OrderedDict
    for name in ("set", "frozenset", "slice", "complex", "bytearray"):
        allowed[f"builtins.{name}"] = getattr(builtins, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves tensor-rebuild functions and plain containers; every other global is inert.

    Nothing named in the file is imported: an unknown ``module.name`` becomes a fresh
    ``_Inert`` subclass. torch's loader handles the storages (``persistent_load``) around it.
    """

    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        full = f"{module}.{name}"
        found = _RestrictedUnpickler._allowed.get(full)
        if found is not None:
            return found
        return type(f"Inert[{full}]", (_Inert,), {"qualified_name": full})


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load takes as `pickle_module`: it subclasses `.Unpickler` (adding storage handling)
# and calls `.load` for the headers of legacy files.
_RESTRICTED_PICKLE = SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="latentgen.restricted"
)


def read_lightning_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The ``state_dict`` tensors of a (PyTorch Lightning) ``.ckpt``, without executing its pickle.

    First ``torch.load(weights_only=True)``, which admits only tensors and plain containers. If
    that refuses the file because it names other globals (``pytorch_lightning`` callbacks,
    ``argparse.Namespace`` hyper-parameters, numpy scalars ...), it is read again with a
    restricted unpickler that resolves only tensor-rebuild functions, ``OrderedDict`` and plain
    containers, and binds every other name to an inert placeholder (never imported, never run).
    Only the ``state_dict`` (or, for a bare state dict, the file itself) is returned.

    Raises:
        CheckpointError: missing or unreadable file, or no tensor state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    # Memory-map zip checkpoints: a Lightning file also holds the optimizer's moments (twice the
    # model), which are then never read from disk.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        try:
            obj = torch.load(
                path,
                map_location="cpu",
                weights_only=False,
                pickle_module=_RESTRICTED_PICKLE,
                mmap=mmap,
            )
        except Exception as e:
            raise CheckpointError(
                f"{path} could not be read with the restricted unpickler "
                f"({type(e).__name__}: {e}). Is it a torch checkpoint, and is it complete?"
            ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({e}). Is the download complete?"
        ) from None
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    sd: Any = None
    if isinstance(obj, Mapping):
        if "state_dict" in obj:
            sd = obj["state_dict"]
        elif obj and all(isinstance(v, Tensor) for v in obj.values()):
            sd = obj  # a bare state_dict
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(
            f"{path} holds no state_dict (top-level: {type(obj).__name__}"
            + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else "")
            + "). Pass a Lightning .ckpt or a saved state_dict."
        )
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: state_dict entries {bad[:8]} are not tensors named by strings; this is not "
            "a model state_dict."
        )
    return dict(sd)


# -- architecture --------------------------------------------------------------------------------
def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def _require(sd: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(
            f"not a taming-transformers VQGAN state_dict: key {key!r} is missing (found "
            f"{len(sd)} keys, e.g. {sorted(sd)[:5]})."
        )
    return sd[key]


def _unwrap(config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(target, params)`` of a model.yaml mapping, its ``model`` section or its ``params``."""
    if "model" in config and isinstance(config["model"], Mapping):
        config = config["model"]
    if "params" in config and isinstance(config["params"], Mapping):
        return str(config.get("target", "")), config["params"]
    return str(config.get("target", "")), config


def _encoder_layout(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Widths, levels, blocks and attention levels of their encoder, read from tensor shapes."""
    conv_in = _require(sd, "encoder.conv_in.weight")  # [ch, in_channels, 3, 3]
    ch = int(conv_in.shape[0])
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    z_channels = int(_require(sd, "decoder.conv_in.weight").shape[1])
    if int(_require(sd, "encoder.conv_out.weight").shape[0]) != z_channels:
        raise CheckpointError(
            "encoder.conv_out has twice the decoder's z channels: this is a KL autoencoder "
            "(double_z=True), not a VQGAN; it cannot be converted to a 'vqgan' tokenizer."
        )
    return {
        "ch": ch,
        "in_channels": int(conv_in.shape[1]),
        "ch_mult": [
            int(_require(sd, f"encoder.down.{i}.block.0.conv1.weight").shape[0]) // ch
            for i in levels
        ],
        "num_res_blocks": len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        "attn_levels": _indices(sd, r"encoder\.down\.(\d+)\.attn\.0\."),
        "z_channels": z_channels,
    }


def _quantizer_config(
    sd: Mapping[str, Tensor], params: Mapping[str, Any], gumbel: bool
) -> dict[str, Any]:
    """Our ``vq`` or ``gumbel`` quantizer config for their ``quantize`` module."""
    if "quantize.used" in sd:
        raise CheckpointError(
            "the checkpoint remaps code indices (quantize.used, taming's `remap` option), which "
            "latentgen does not support; convert a model trained without remap."
        )
    if not gumbel:
        n_embed, embed_dim = (int(s) for s in _require(sd, "quantize.embedding.weight").shape)
        return {"type": "vq", "codebook_size": n_embed, "dim": embed_dim}
    proj = _require(sd, "quantize.proj.weight")  # [K, D, 1, 1]
    n_embed, embed_dim = (int(s) for s in _require(sd, "quantize.embed.weight").shape)
    if int(proj.shape[1]) != embed_dim:
        raise CheckpointError(
            f"Gumbel quantizer projects {int(proj.shape[1])} channels to logits but its codes "
            f"have {embed_dim}; latentgen's gumbel quantizer needs both equal (z_channels == "
            "embed_dim, as in the published models)."
        )
    quantizer: dict[str, Any] = {
        "type": "gumbel",
        "codebook_size": n_embed,
        "dim": embed_dim,
        "kl_weight": float(params.get("kl_weight", 1e-8)),
        "straight_through": True,
    }
    sched = dict(_unwrap(params.get("temperature_scheduler_config", {}))[1])
    if sched and int(sched.get("warm_up_steps", 0)) == 0:
        # Their LambdaWarmUpCosineScheduler without warm-up is our cosine anneal.
        quantizer.update(
            tau_start=float(sched.get("lr_max", 1.0)),
            tau_end=float(sched.get("lr_min", 1.0 / 16)),
            anneal_steps=int(sched.get("max_decay_steps", 150_000)),
            anneal="cosine",
        )
    return quantizer


def _attention(
    dd: Mapping[str, Any], ch_mult: list[int], attn_levels: list[int]
) -> tuple[int, list[int]]:
    """``(resolution, attn_resolutions)``: where attention sits, in their nominal resolution."""
    # Their nominal resolution only places attention; 256 for every published model.
    resolution = int(dd.get("resolution", 256))
    f = 2 ** (len(ch_mult) - 1)
    if resolution % f:
        raise CheckpointError(
            f"ddconfig.resolution={resolution} is not a multiple of the downsample factor {f}; "
            "the encoder and decoder would place attention at different levels."
        )
    if "attn_resolutions" in dd:
        attn = [int(r) for r in dd["attn_resolutions"]]
    else:
        attn = [resolution // 2**i for i in attn_levels]
    # A size the model never reaches places no attention in taming; our config refuses it, so
    # keep only sizes that name a level (the key check later still compares the layouts).
    levels_res = [resolution // 2**i for i in range(len(ch_mult))]
    return resolution, [r for r in attn if r in levels_res]


def _loss_config(
    sd: Mapping[str, Tensor], loss: Mapping[str, Any], in_channels: int
) -> dict[str, Any]:
    """Loss weights and the discriminator's layout (from its weights, else their yaml)."""
    if loss.get("disc_conditional", False):
        raise CheckpointError(
            "lossconfig.disc_conditional=True: conditional discriminators are not supported."
        )
    disc_layers = _indices(sd, r"loss\.discriminator\.main\.(\d+)\.weight")
    convs = [i for i in disc_layers if sd[f"loss.discriminator.main.{i}.weight"].dim() == 4]
    has_bn = any(k.endswith("running_mean") for k in sd if k.startswith("loss.disc"))
    has_actnorm = any(k.endswith(".loc") for k in sd if k.startswith("loss.disc"))
    if has_bn and has_actnorm:
        raise CheckpointError("the discriminator holds both BatchNorm and ActNorm weights.")
    data: dict[str, Any] = {
        "codebook_weight": float(loss.get("codebook_weight", 1.0)),
        "perceptual_weight": (
            float(loss.get("perceptual_weight", 1.0)) if in_channels in (1, 3) else 0.0
        ),
        "disc_loss": str(loss.get("disc_loss", "hinge")),
        "disc_num_layers": len(convs) - 2 if convs else int(loss.get("disc_num_layers", 3)),
        "disc_ndf": (
            int(sd["loss.discriminator.main.0.weight"].shape[0])
            if convs
            else int(loss.get("disc_ndf", 64))
        ),
        "disc_norm": "actnorm" if has_actnorm or loss.get("use_actnorm") else "batch",
    }
    if convs:
        # A trained discriminator: keep the reference's schedule (abrupt start, its weight).
        # Without one (e.g. their Gumbel release, trained with DummyLoss), a fresh
        # discriminator keeps our defaults: a delayed start and a ramp.
        data["disc_weight"] = float(loss.get("disc_weight", 1.0))
        data["disc_start"] = int(loss.get("disc_start", 0))
        data["disc_warmup_steps"] = 0
    return data


def taming_config(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | None = None
) -> VQGANConfig:
    """The ``vqgan`` config of a taming checkpoint, from its model.yaml mapping or its shapes.

    Shapes come first (they are what the weights need); the yaml fills only what shapes cannot
    say (dropout, the nominal resolution, loss weights).
    """
    target, params = _unwrap(config or {})
    dd = dict(params.get("ddconfig", {}))
    loss = dict(_unwrap(params.get("lossconfig", {}))[1])
    gumbel = "quantize.proj.weight" in state_dict or target.endswith("GumbelVQ")
    layout = _encoder_layout(state_dict)
    resolution, attn = _attention(dd, layout["ch_mult"], layout.pop("attn_levels"))
    data = {
        "type": "vqgan",
        **layout,
        "resolution": resolution,
        "attn_resolutions": attn,
        "dropout": float(dd.get("dropout", 0.0)),
        "quantizer": _quantizer_config(state_dict, params, gumbel),
        **_loss_config(state_dict, loss, layout["in_channels"]),
    }
    try:
        return VQGANConfig.model_validate(data)
    except Exception as e:
        raise CheckpointError(
            f"the taming architecture does not form a valid vqgan config: {e}"
        ) from None


# -- conversion ----------------------------------------------------------------------------------
def _map_key(key: str, gumbel: bool) -> str | None:
    """Our name for one of their keys; None drops it; '' marks an unknown key."""
    if key.startswith(_DROPPED):
        return None
    if key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
        return key
    if key.startswith("loss.discriminator."):
        return "discriminator." + key[len("loss.discriminator.") :]
    if gumbel:
        if key.startswith("quantize.proj."):
            return "quantizer.to_logits." + key[len("quantize.proj.") :]
        if key == "quantize.embed.weight":
            return "quantizer.codebook.weight"
    elif key == "quantize.embedding.weight":
        return "quantizer.codebook"
    return ""


def _expected_state(config: VQGANConfig) -> dict[str, Tensor]:
    # The meta device gives names, shapes and dtypes without allocating ~100M parameters.
    with torch.device("meta"):
        return dict(VQGAN(config).state_dict())


def _map_state(
    state_dict: Mapping[str, Tensor], gumbel: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Their tensors under our names, and the keys we do not know."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new = _map_key(key, gumbel)
        if new == "":
            unknown.append(key)
        elif new is not None:
            out[new] = value.detach().clone()
    return out, unknown


def _fresh_discriminator(cfg: VQGANConfig) -> dict[str, Tensor]:
    """A discriminator initialised from a fixed seed, so converting twice gives equal files.

    It is only a starting point for fine-tuning (sampling and reconstruction never use it); the
    global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        disc = NLayerDiscriminator(
            cfg.in_channels, cfg.disc_ndf, cfg.disc_num_layers, cfg.disc_norm
        )
    return {f"discriminator.{k}": v for k, v in disc.state_dict().items()}


def _fill_missing(
    expected: Mapping[str, Tensor],
    out: dict[str, Tensor],
    cfg: VQGANConfig,
    init_missing_discriminator: bool,
) -> None:
    """Our bookkeeping buffers and (if allowed) a seeded discriminator where theirs has none."""
    missing = [k for k in expected if k not in out]
    for k in missing:
        if k in _FILLED or k.endswith("num_batches_tracked"):
            e = expected[k]
            out[k] = torch.full(e.shape, _FILLED.get(k, 0), dtype=e.dtype)
    if init_missing_discriminator and any(k.startswith("discriminator.") for k in missing):
        fresh = _fresh_discriminator(cfg)
        out.update({k: v for k, v in fresh.items() if k in missing})


def convert_taming_vqgan(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    init_missing_discriminator: bool = False,
) -> tuple[VQGANConfig, dict[str, Tensor]]:
    """Map a taming-transformers VQGAN state_dict to a ``vqgan`` config and our tensor names.

    Args:
        state_dict: the checkpoint's ``state_dict`` (see ``read_lightning_checkpoint``).
        config: their ``model.yaml`` as a mapping (whole file, its ``model`` section or its
            ``params``); None infers the architecture from tensor shapes (dropout is then 0,
            the nominal resolution 256 and the loss weights the reference defaults).
        init_missing_discriminator: accept a checkpoint without ``loss.discriminator.*``
            (e.g. stripped for inference) and give it a discriminator initialised from a fixed
            seed (so the conversion is deterministic).

    Returns:
        ``(config, tensors)`` with ``VQGAN(config).load_state_dict(tensors, strict=True)``
        succeeding.

    Raises:
        CheckpointError: listing every unknown, missing and mis-shaped key at once.
    """
    cfg = taming_config(state_dict, config)
    loss_target = _unwrap(_unwrap(config or {})[1].get("lossconfig", {}))[0]
    if loss_target.endswith("DummyLoss"):
        # The yaml says the model was trained without a discriminator: none to expect.
        init_missing_discriminator = True
    expected = _expected_state(cfg)
    out, unknown = _map_state(state_dict, cfg.quantizer.type == "gumbel")
    _fill_missing(expected, out, cfg, init_missing_discriminator)
    problems = (
        [f"{len(unknown)} unknown taming key(s): " + ", ".join(sorted(unknown))] if unknown else []
    )
    problems += state_dict_problems(expected, out, source="checkpoint", limit=None)
    if problems:
        raise CheckpointError(
            f"taming checkpoint does not fit the inferred vqgan architecture "
            f"(ch={cfg.ch}, ch_mult={list(cfg.ch_mult)}, num_res_blocks={cfg.num_res_blocks}, "
            f"attn_resolutions={list(cfg.attn_resolutions)}, quantizer={cfg.quantizer.type} "
            f"K={getattr(cfg.quantizer, 'codebook_size', '?')}):\n  "
            + "\n  ".join(problems)
            + "\nPass the model.yaml that came with the checkpoint, or check it is a VQModel/"
            "GumbelVQ checkpoint"
            + (
                ""
                if init_missing_discriminator
                else " (or set init_missing_discriminator=True "
                "for a checkpoint saved without its discriminator)"
            )
            + "."
        )
    for k, v in out.items():  # dtype of the model (checkpoints are sometimes saved in fp16)
        if v.dtype != expected[k].dtype and v.is_floating_point():
            out[k] = v.to(expected[k].dtype)
    return cfg, out
