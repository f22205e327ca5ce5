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


def convert_taming_gpt(
    state_dict: Mapping[str, Tensor], config_hints: TamingGPTHints | Mapping[str, Any]
) -> tuple[TransformerPriorConfig, dict[str, Tensor]]:
    """Map a Taming Transformers GPT state dict to ``(TransformerPriorConfig, our state dict)``.

    Every key and shape is checked; all mismatches are reported together in one
    ``CheckpointError``. Keys outside the GPT's prefix (first/cond stage models) are ignored.
    """
    try:
        hints = (
            config_hints
            if isinstance(config_hints, TamingGPTHints)
            else TamingGPTHints.model_validate(dict(config_hints))
        )
    except ValidationError as e:
        raise CheckpointError(f"invalid hints for convert_taming_gpt: {e}") from None
    prefix = hints.prefix
    if prefix is None:
        prefix = "transformer." if any(k.startswith("transformer.") for k in state_dict) else ""
    theirs = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "tok_emb.weight" not in theirs or "pos_emb" not in theirs:
        raise CheckpointError(
            f"not a Taming GPT state dict: no '{prefix}tok_emb.weight' / '{prefix}pos_emb' "
            f"(first keys: {sorted(state_dict)[:5]}). Set hints.prefix to the GPT's key prefix."
        )

    problems: list[str] = []
    tok = theirs["tok_emb.weight"]
    pos = theirs["pos_emb"]
    if tok.dim() != 2:
        raise CheckpointError(f"{prefix}tok_emb.weight must be [V, C], got {tuple(tok.shape)}.")
    vocab, c = tok.shape
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != c:
        problems.append(f"pos_emb: expected [1, T, {c}], got {tuple(pos.shape)}")
        n_pos = 0
    else:
        n_pos = int(pos.shape[1])
    layers = sorted({int(m.group(1)) for k in theirs if (m := _BLOCK.match(k))})
    n_layer = len(layers)
    if layers != list(range(n_layer)):
        problems.append(f"block indices are not 0..{n_layer - 1}: {layers}")
    if c % hints.n_head:
        problems.append(f"n_head={hints.n_head} does not divide the width {c}")

    n_cond = sum(s.num_tokens for s in hints.conditions.values())
    n_ctx = n_cond or 1
    block_size = n_pos - n_ctx + 1
    if n_pos and block_size < 1:
        problems.append(
            f"pos_emb has {n_pos} positions, fewer than the {n_ctx} condition tokens in the hints"
        )
    if not hints.conditions and hints.sos_token >= vocab:
        problems.append(f"sos_token={hints.sos_token} is outside the token table of {vocab} rows")

    # Expected shapes of their keys, and how each maps to ours.
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

    missing = sorted(set(expect) - set(theirs))
    unexpected = sorted(set(theirs) - set(expect))
    if missing:
        problems.append("missing keys: " + ", ".join(prefix + k for k in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(prefix + k for k in unexpected))
    for key, shape in expect.items():
        if key in theirs and tuple(theirs[key].shape) != shape:
            problems.append(
                f"{prefix}{key}: expected shape {shape}, got {tuple(theirs[key].shape)}"
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
    if problems:
        raise CheckpointError(
            f"cannot convert this Taming GPT state dict ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )

    try:
        config = TransformerPriorConfig(
            vocab_size=vocab,
            block_size=block_size,
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

    ours: dict[str, Tensor] = {
        "tok_emb.weight": tok,
        "pos_emb": pos[0],  # [T, C]
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
            ours[f"cond_null.{name}"] = tok.new_zeros(c)
    else:
        ours["sos"] = tok[hints.sos_token].clone()  # their start token's embedding row
    return config, {k: v.detach().clone().contiguous() for k, v in ours.items()}
