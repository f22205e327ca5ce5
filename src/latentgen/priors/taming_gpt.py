"""Convert a Taming Transformers GPT (``Net2NetTransformer.transformer``) to a ``TransformerPrior``.

Their model (Esser et al., arXiv 2012.09841; a minGPT) reads ``[condition codes] + codes[:-1]``
with one token table shared by conditions and codes, one learned position table over the whole
sequence, and predicts code ``i`` at the position before it. ``TransformerPriorConfig`` with
``layout="taming"`` expresses exactly that, so a converted model gives the same logits.

Their state dict layout (all under ``transformer.`` in a Net2NetTransformer checkpoint)::

    tok_emb.weight                      [V, C]
    pos_emb                             [1, T, C]
    blocks.N.ln1 / ln2.{weight,bias}    [C]
    blocks.N.attn.{key,query,value}.{weight [C, C], bias [C]}   (fused into our attn.qkv)
    blocks.N.attn.proj.{weight,bias}
    blocks.N.attn.mask                  [1, 1, T, T] causal mask buffer (must be lower triangular)
    blocks.N.mlp.0.{weight [4C, C], bias}   blocks.N.mlp.2.{weight [C, 4C], bias}
    ln_f.{weight,bias}                  head.weight [V, C] (no bias)

The number of heads is not in the weights and must be given, as must the conditions (name,
vocab and tokens per sample) the checkpoint was trained with. Checkpoints are read by the caller
(safetensors, or a trusted ``.ckpt`` converted offline); this module only maps tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from latentgen.artifact import state_dict_problems
from latentgen.errors import CheckpointError
from latentgen.priors.base import ConditionSlot
from latentgen.priors.transformer import TransformerPriorConfig

__all__ = ["TamingGPTHints", "convert_taming_gpt"]


class TamingGPTHints(BaseModel):
    """What a Taming GPT state dict does not say about itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_head: int = Field(ge=1, description="Attention heads (theirs: 16 for the released models).")
    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="Conditions in prefix order, e.g. {'label': {'vocab_size': 1000}} for "
        "class-conditional ImageNet or a segmentation map's codes; empty: unconditional.",
    )
    cond_offsets: dict[str, int] = Field(
        default_factory=dict,
        description="Row of the shared token table where each condition's token 0 sits (0 in "
        "Taming Transformers).",
    )
    sos_token: int = Field(
        0, ge=0, description="Unconditional models: the token their SOSProvider prepends."
    )
    prefix: str | None = Field(
        None,
        description="Key prefix of the GPT in the state dict; None: 'transformer.' if present, "
        "else none.",
    )
    attention: str = Field("auto", description="Attention backend of the converted model.")


_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _hints(config_hints: TamingGPTHints | Mapping[str, Any]) -> TamingGPTHints:
    if isinstance(config_hints, TamingGPTHints):
        return config_hints
    try:
        return TamingGPTHints.model_validate(dict(config_hints))
    except ValidationError as e:
        raise CheckpointError(f"invalid hints for convert_taming_gpt: {e}") from None


def _gpt_tensors(
    state_dict: Mapping[str, Tensor], hints: TamingGPTHints
) -> tuple[str, dict[str, Tensor]]:
    """``(prefix, the GPT's tensors without it)``; the first/cond stage models are left out."""
    prefix = hints.prefix
    if prefix is None:
        prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    theirs = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "tok_emb.weight" not in theirs or "pos_emb" not in theirs:
        raise CheckpointError(
            f"not a Taming GPT state dict: no '{prefix}tok_emb.weight' / '{prefix}pos_emb' "
            f"(first keys: {sorted(state_dict)[:5]}). Set hints.prefix to the GPT's key prefix."
        )
    if theirs["tok_emb.weight"].dim() != 2:
        raise CheckpointError(
            f"{prefix}tok_emb.weight must be [V, C], got {tuple(theirs['tok_emb.weight'].shape)}."
        )
    return prefix, theirs


def _expected_shapes(vocab: int, c: int, n_pos: int, n_layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of every key of their GPT with this vocabulary, width, context and depth."""
    expect: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (vocab, c),
        "pos_emb": (1, n_pos, c),
        "ln_f.weight": (c,),
        "ln_f.bias": (c,),
        "head.weight": (vocab, c),
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            expect[b + ln + ".weight"] = (c,)
            expect[b + ln + ".bias"] = (c,)
        for lin in ("key", "query", "value", "proj"):
            expect[b + f"attn.{lin}.weight"] = (c, c)
            expect[b + f"attn.{lin}.bias"] = (c,)
        expect[b + "attn.mask"] = (1, 1, n_pos, n_pos)
        expect[b + "mlp.0.weight"] = (4 * c, c)
        expect[b + "mlp.0.bias"] = (4 * c,)
        expect[b + "mlp.2.weight"] = (c, 4 * c)
        expect[b + "mlp.2.bias"] = (c,)
    return expect


def _problems(
    theirs: Mapping[str, Tensor], hints: TamingGPTHints, prefix: str
) -> tuple[list[str], int, int]:
    """Everything wrong with their GPT under these hints, plus its ``(n_pos, n_layer)``."""
    problems: list[str] = []
    vocab, c = theirs["tok_emb.weight"].shape
    pos = theirs["pos_emb"]
    n_pos = int(pos.shape[1]) if pos.dim() == 3 and pos.shape[0] == 1 and pos.shape[2] == c else 0
    if not n_pos:
        problems.append(f"pos_emb: expected [1, T, {c}], got {tuple(pos.shape)}")
    layers = sorted({int(m.group(1)) for k in theirs if (m := _BLOCK.match(k))})
    n_layer = len(layers)
    if layers != list(range(n_layer)):
        problems.append(f"block indices are not 0..{n_layer - 1}: {layers}")
    if c % hints.n_head:
        problems.append(f"n_head={hints.n_head} does not divide the width {c}")
    n_ctx = sum(s.num_tokens for s in hints.conditions.values()) or 1
    if n_pos and n_pos - n_ctx + 1 < 1:
        problems.append(
            f"pos_emb has {n_pos} positions, fewer than the {n_ctx} condition tokens in the hints"
        )
    if not hints.conditions and hints.sos_token >= vocab:
        problems.append(f"sos_token={hints.sos_token} is outside the token table of {vocab} rows")

    # The meta device gives shapes without allocating.
    expect = {
        prefix + k: torch.empty(shape, device="meta")
        for k, shape in _expected_shapes(int(vocab), int(c), n_pos, n_layer).items()
    }
    problems += state_dict_problems(
        expect, {prefix + k: v for k, v in theirs.items()}, source="checkpoint", limit=None
    )
    tril = torch.ones(n_pos, n_pos).tril()
    for i in range(n_layer):
        mask = theirs.get(f"blocks.{i}.attn.mask")
        shape_ok = mask is not None and tuple(mask.shape) == (1, 1, n_pos, n_pos)
        if shape_ok and not torch.equal(mask[0, 0].float(), tril):  # type: ignore[index]
            problems.append(
                f"{prefix}blocks.{i}.attn.mask is not causal (trained with n_unmasked > 0?); "
                "only plain causal minGPT checkpoints can be converted"
            )
    return problems, n_pos, n_layer


def _our_state(
    theirs: Mapping[str, Tensor], hints: TamingGPTHints, n_layer: int
) -> dict[str, Tensor]:
    """Their GPT's tensors under ``TransformerPrior``'s names (q, k, v fused)."""
    tok = theirs["tok_emb.weight"]
    ours: dict[str, Tensor] = {
        "tok_emb.weight": tok,
        "pos_emb": theirs["pos_emb"][0],  # [T, C]
        "ln_f.weight": theirs["ln_f.weight"],
        "ln_f.bias": theirs["ln_f.bias"],
        "head.weight": theirs["head.weight"],
    }
    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            for p in ("weight", "bias"):
                ours[f"{b}{ln}.{p}"] = theirs[f"{b}{ln}.{p}"]
        for p in ("weight", "bias"):
            # Our fused projection splits its output as (q, k, v): stack in that order.
            ours[f"{b}attn.qkv.{p}"] = torch.cat(
                [theirs[f"{b}attn.{n}.{p}"] for n in ("query", "key", "value")], dim=0
            )
            ours[f"{b}attn.proj.{p}"] = theirs[f"{b}attn.proj.{p}"]
            ours[f"{b}mlp.fc.{p}"] = theirs[f"{b}mlp.0.{p}"]
            ours[f"{b}mlp.proj.{p}"] = theirs[f"{b}mlp.2.{p}"]
    if hints.conditions:
        # They never trained a null condition; zeros keep the keys complete. Guidance with a
        # converted model is meaningless until it is fine-tuned with cond_dropout > 0.
        for name in hints.conditions:
            ours[f"cond_null.{name}"] = tok.new_zeros(tok.shape[1])
    else:
        ours["sos"] = tok[hints.sos_token].clone()  # their start token's embedding row
    return {k: v.detach().clone().contiguous() for k, v in ours.items()}


def convert_taming_gpt(
    state_dict: Mapping[str, Tensor], config_hints: TamingGPTHints | Mapping[str, Any]
) -> tuple[TransformerPriorConfig, dict[str, Tensor]]:
    """Map a Taming Transformers GPT state dict to ``(TransformerPriorConfig, our state dict)``.

    Every key and shape is checked; all mismatches are reported together in one
    ``CheckpointError``. Keys outside the GPT's prefix (first/cond stage models) are ignored.
    """
    hints = _hints(config_hints)
    prefix, theirs = _gpt_tensors(state_dict, hints)
    problems, n_pos, n_layer = _problems(theirs, hints, prefix)
    if problems:
        raise CheckpointError(
            f"cannot convert this Taming GPT state dict ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    vocab, c = (int(n) for n in theirs["tok_emb.weight"].shape)
    n_ctx = sum(s.num_tokens for s in hints.conditions.values()) or 1
    try:
        config = TransformerPriorConfig(
            vocab_size=vocab,
            block_size=n_pos - n_ctx + 1,
            n_layer=n_layer,
            n_head=hints.n_head,
            n_embd=c,
            positions="learned",
            bias=True,
            layer_norm_eps=1e-5,  # nn.LayerNorm's default, which minGPT uses
            attention=hints.attention,
            conditions=dict(hints.conditions),
            layout="taming",
            cond_offsets=dict(hints.cond_offsets),
            tie_embeddings=False,
        )
    except ValidationError as e:
        raise CheckpointError(f"the hints do not fit this checkpoint: {e}") from None
    return config, _our_state(theirs, hints, n_layer)
