"""Decoder-only GPT prior over row-major code sequences, with prefix conditioning and a KV cache.

The sequence the model reads is ``[condition prefixes] + [SOS] + codes``: each condition is
embedded with its own table and position embedding, a dropped condition (``Conditioning.drop``)
is replaced by a learned null embedding (classifier-free guidance, arXiv 2207.12598), and the
output at the position before code ``i`` predicts code ``i``. Sampling runs the prefix once into a
preallocated key/value cache and then feeds one code per step.

``layout="taming"`` instead reproduces the minGPT of Taming Transformers (Esser et al., arXiv
2012.09841) exactly: condition tokens share the code embedding table, one position table spans
the whole sequence, and the last condition token (or a start token) predicts the first code.
``latentgen.priors.taming_gpt.convert_taming_gpt`` maps their checkpoints onto this layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Annotated, Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, SerializeAsAny, model_validator
from torch import Tensor, nn

from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.aligned import aligned_embedding, prefix_names, prefix_tokens
from latentgen.priors.attention import AttentionBackend, get_backend
from latentgen.priors.base import ConditionSlot, Conds, Prior, PriorConfig, SampleRequest
from latentgen.priors.packed_linear import Linear, linear_fn, use_prepack
from latentgen.priors.threads import decode_threads
from latentgen.priors.window import WindowDecoder
from latentgen.specs import ComponentConfig, parse_component

__all__ = ["TransformerPrior", "TransformerPriorConfig"]


def _attention_spec(value: Any) -> Any:
    """A backend name stays a name; a mapping becomes that backend's config (its options)."""
    if isinstance(value, ComponentConfig | Mapping):
        return parse_component("attention_backend", value)
    return value


#: ``"auto"``, a backend name, or a backend config with options (``{"type": "flex", "window":
#: 64}``), validated by the config class the backend registered.
AttentionSpec = Annotated[str | SerializeAsAny[ComponentConfig], BeforeValidator(_attention_spec)]


# The shape and dropout of a stack of `_Block`s, one definition for every prior built from them
# (the transformer and masked priors).
NLayer = Annotated[int, Field(ge=1, description="Number of transformer blocks.")]
NHead = Annotated[int, Field(ge=1, description="Attention heads per block; must divide n_embd.")]
NEmbd = Annotated[int, Field(ge=1, description="Width of the residual stream.")]
EmbdDropout = Annotated[float, Field(ge=0, lt=1, description="Dropout on the input embeddings.")]
AttnDropout = Annotated[float, Field(ge=0, lt=1, description="Dropout on attention weights.")]
ResidDropout = Annotated[
    float, Field(ge=0, lt=1, description="Dropout on each block's attention and MLP outputs.")
]


class TransformerPriorConfig(PriorConfig):
    """Config of the GPT prior (Radford et al. 2019; as used in arXiv 2012.09841)."""

    type: Literal["transformer"] = "transformer"
    vocab_size: int = Field(1024, ge=2, description="Number of codes K (the tokenizer's codebook).")
    block_size: int = Field(
        256,
        ge=1,
        description="Most code positions the model has positions for (h*w of the largest grid).",
    )
    window: tuple[int, int] | None = Field(
        None,
        description="The code grid (wh, ww) the prior is trained on, the sliding window that "
        "draws larger grids (wh*ww <= block_size). None: the square of side sqrt(block_size) "
        "when block_size is a square number (16x16 for 256).",
    )
    n_layer: NLayer = 8
    n_head: NHead = 8
    n_embd: NEmbd = 512
    embd_dropout: EmbdDropout = 0.0
    attn_dropout: AttnDropout = 0.0
    resid_dropout: ResidDropout = 0.0
    positions: Literal["learned", "rope"] = Field(
        "learned",
        description="'learned': a learned position table (GPT-2); 'rope': rotary embeddings on "
        "queries and keys (RoFormer, arXiv 2104.09864).",
    )
    rope_base: float = Field(10000.0, gt=1, description="RoPE frequency base (positions='rope').")
    mlp: Literal["gelu"] = Field("gelu", description="Block MLP: Linear(4x) -> GELU -> Linear.")
    bias: bool = Field(True, description="Biases in the linear layers and LayerNorms.")
    layer_norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    attention: AttentionSpec = Field(
        "auto",
        description="Attention backend: a name ('auto', 'sdpa', 'xformers', 'flex', 'math' or a "
        "plugin's; 'auto' picks the fastest that works on the device and dtype), or a backend "
        "config with its options, e.g. {type: sdpa, kernel: flash} or {type: flex, window: 64}.",
    )
    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="Conditions by name (vocab_size, num_tokens each); their prefixes come in "
        "this order. Empty: unconditional.",
    )
    tie_embeddings: bool = Field(
        False,
        description="Use the code embedding table as the output head (Press & Wolf, arXiv "
        "1608.05859). The head then has no weight of its own in the state dict.",
    )
    layout: Literal["prefix", "taming"] = Field(
        "prefix",
        description="'prefix': own embedding table and positions per condition, then a learned "
        "SOS. 'taming': Taming Transformers' minGPT layout (arXiv 2012.09841): condition tokens "
        "share the code table (at cond_offsets), one position table over the whole sequence, no "
        "SOS after a condition.",
    )
    cond_offsets: dict[str, int] = Field(
        default_factory=dict,
        description="layout='taming' only: a condition's token t is looked up at row t + offset "
        "of the shared code table (default 0, as in Taming Transformers).",
    )

    neighbours: tuple[int, int] = Field(
        (0, 0),
        description="(rows, width): the codes of the `rows` rows above each code, within "
        "`width` columns centred on it (odd), are added to the input that predicts it, each "
        "offset through its own embedding table that starts at zero. In raster order the code "
        "above is otherwise reachable only through attention; (2, 5) hands each code its ten "
        "nearest drawn neighbours above. (0, 0): off. docs/priors.md measures it.",
    )

    @model_validator(mode="after")
    def _check(self) -> TransformerPriorConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a width "
                f"that is a multiple of the head count, e.g. {self.n_head * 64}."
            )
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"positions='rope' needs an even head width, got n_embd/n_head = "
                f"{self.n_embd // self.n_head}."
            )
        if self.layout == "taming":
            placed = sorted(n for n, slot in self.conditions.items() if slot.placement != "prefix")
            if placed:
                raise ValueError(
                    f"layout='taming' puts every condition in the prefix, but {placed} ask for "
                    "placement 'aligned' or 'both'; use layout='prefix' or placement 'prefix'."
                )
            if self.positions != "learned":
                raise ValueError(
                    "layout='taming' uses a learned position table: set positions='learned'."
                )
            unknown = sorted(set(self.cond_offsets) - set(self.conditions))
            if unknown:
                raise ValueError(
                    f"cond_offsets names {unknown}, which are not in conditions "
                    f"{sorted(self.conditions)}."
                )
            for name, slot in self.conditions.items():
                off = self.cond_offsets.get(name, 0)
                if off < 0 or off + slot.vocab_size > self.vocab_size:
                    raise ValueError(
                        f"condition {name!r} (vocab {slot.vocab_size}) at offset {off} does not "
                        f"fit the shared table of vocab_size={self.vocab_size}; raise vocab_size "
                        f"to at least {max(off, 0) + slot.vocab_size} or lower the offset."
                    )
        elif self.cond_offsets:
            raise ValueError(
                "cond_offsets only applies to layout='taming' (the prefix layout gives each "
                "condition its own table); remove it or set layout='taming'."
            )
        rows, width = self.neighbours
        if (rows, width) != (0, 0) and (rows < 1 or width < 1 or width % 2 == 0):
            raise ValueError(
                f"neighbours {list(self.neighbours)} must be [rows, width] with rows >= 1 and an "
                "odd width (centred on the code), e.g. [2, 5]; [0, 0] turns it off."
            )
        if rows and self.layout == "taming":
            raise ValueError(
                "neighbours need layout='prefix' (the taming layout is the reference model's, "
                "without them); set neighbours: [0, 0] or layout: prefix."
            )
        if self.window is not None:
            wh, ww = self.window
            if wh < 1 or ww < 1 or wh * ww > self.block_size:
                raise ValueError(
                    f"window {self.window} must be two positive sizes with at most block_size="
                    f"{self.block_size} codes, got {wh * ww}."
                )
        return self


# -- blocks ------------------------------------------------------------------------------------
def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x [B, H, T, Dh]`` with ``cos, sin [T, Dh]`` (rotate-half pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, c: int, bias: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c, bias=bias)  # fused q, k, v projections
        self.proj = nn.Linear(c, c, bias=bias)


class _MLP(nn.Module):
    def __init__(self, c: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(c, 4 * c, bias=bias)
        self.proj = nn.Linear(4 * c, c, bias=bias)


def init_gpt_weights(
    model: nn.Module, n_layer: int, free: Iterable[Tensor | None], std: float = 0.02
) -> None:
    """GPT-2 initialisation of ``model``'s Linear/Embedding weights and free parameters ``free``.

    Residual projections (``attn.proj``, ``mlp.proj``) are scaled by 1/sqrt(2 L) so the residual
    stream's variance does not grow with depth; biases start at zero; the free-standing
    parameters (positions, start and null embeddings) are drawn like the embeddings.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = name.endswith(("attn.proj", "mlp.proj"))
            nn.init.normal_(module.weight, 0.0, std / math.sqrt(2 * n_layer) if scale else std)
            bias = getattr(module, "bias", None)
            if bias is not None:
                nn.init.zeros_(bias)
    for p in free:
        if p is not None:
            nn.init.normal_(p, 0.0, std)


class BlockShape(Protocol):
    """The config fields a block is built from (the GPT and masked priors' configs have them)."""

    @property
    def n_embd(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def bias(self) -> bool: ...
    @property
    def layer_norm_eps(self) -> float: ...


class _Block(nn.Module):
    """Pre-LN transformer block. ``forward`` calls the functional ops directly: in the one-token
    decode step the per-module call overhead is a large share of the time. ``causal=False``
    makes it bidirectional (the masked prior, ``latentgen.priors.masked``, shares it)."""

    def __init__(self, config: BlockShape) -> None:
        super().__init__()
        c = config.n_embd
        self.ln1 = nn.LayerNorm(c, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = _Attention(c, config.bias)
        self.ln2 = nn.LayerNorm(c, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = _MLP(c, config.bias)
        self.n_head = config.n_head
        self.eps = config.layer_norm_eps

    def forward(
        self,
        x: Tensor,
        backend: AttentionBackend,
        rope: tuple[Tensor, Tensor] | None = None,
        kv: Tensor | None = None,
        start: int = 0,
        attn_p: float = 0.0,
        resid_p: float = 0.0,
        causal: bool = True,
    ) -> Tensor:
        """``x [B, T, C]`` at positions ``start..start+T``; ``kv [2, B, H, T_max, Dh]``: this
        layer's key/value cache, written in place; ``causal=False``: every position sees all."""
        b, t, c = x.shape
        h = F.layer_norm(x, (c,), self.ln1.weight, self.ln1.bias, self.eps)
        qkv = F.linear(h, self.attn.qkv.weight, self.attn.qkv.bias)  # [B, T, 3C]
        qkv = qkv.view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, Dh] each
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        if kv is not None:
            if rope is None:
                kv[:, :, :, start : start + t] = qkv[1:]  # k and v in one copy
            else:
                kv[0, :, :, start : start + t] = k
                kv[1, :, :, start : start + t] = v
            # Attend over the filled part only: a shorter key tensor, never a full-length mask.
            k, v = kv[:, :, :, : start + t].unbind(0)
        y = backend.attend(q, k, v, causal=causal, mask=None, dropout_p=attn_p)  # [B, H, T, Dh]
        y = F.linear(y.transpose(1, 2).reshape(b, t, c), self.attn.proj.weight, self.attn.proj.bias)
        if resid_p:
            y = F.dropout(y, resid_p, training=True)
        x = x + y
        h = F.layer_norm(x, (c,), self.ln2.weight, self.ln2.bias, self.eps)
        h = F.gelu(F.linear(h, self.mlp.fc.weight, self.mlp.fc.bias))  # [B, T, 4C]
        h = F.linear(h, self.mlp.proj.weight, self.mlp.proj.bias)
        if resid_p:
            h = F.dropout(h, resid_p, training=True)
        return x + h

    def step(
        self,
        x: Tensor,
        kv: Tensor,
        pos: int,
        backend: AttentionBackend,
        rope: tuple[Tensor, Tensor] | None = None,
        lin: tuple[Linear, Linear, Linear, Linear] | None = None,
    ) -> Tensor:
        """One decode step: ``x [B, C]`` is the token at position ``pos``; its key and value go
        into ``kv [2, B, H, T_max, Dh]`` and it attends to ``kv[..., : pos + 1]``. Inference
        only (no dropout). Same result as ``forward`` on ``[B, 1, C]``, in fewer ops.
        ``lin``: the qkv, attention-out, MLP-in and MLP-out layers as functions (prepacked
        weights, ``priors.packed_linear``); None: ``F.linear`` on this block's weights."""
        fns, qkv = self._step_qkv(x, lin)  # qkv [B, 3, H, Dh]
        b, c = x.shape
        q = qkv[:, 0]  # [B, H, Dh]
        if rope is None:
            kv.select(3, pos).copy_(qkv[:, 1:].transpose(0, 1))  # k and v in one copy
        else:
            q = _rotate(q, *rope)
            kv[0, :, :, pos] = _rotate(qkv[:, 1], *rope)
            kv[1, :, :, pos] = qkv[:, 2]
        # narrow + unbind: the filled part of the cache in two view ops (indexing takes ~6).
        k, v = kv.narrow(3, 0, pos + 1).unbind(0)  # [B, H, pos + 1, Dh] each
        y = backend.attend_one(q, k, v)  # [B, H, Dh]
        return self._step_mlp(x, y.reshape(b, c), fns[1:])

    def _step_qkv(
        self, x: Tensor, lin: tuple[Linear, Linear, Linear, Linear] | None
    ) -> tuple[tuple[Linear, Linear, Linear, Linear], Tensor]:
        """The decode steps' start: their four layers (``lin`` or ``F.linear`` on this
        block's weights) and ``ln1`` + qkv of ``x [B, C]`` as ``[B, 3, H, Dh]``."""
        fns = lin or self.linears()
        b, c = x.shape
        h = F.layer_norm(x, (c,), self.ln1.weight, self.ln1.bias, self.eps)
        return fns, fns[0](h).view(b, 3, self.n_head, c // self.n_head)

    def _step_mlp(self, x: Tensor, y: Tensor, fns: tuple[Linear, Linear, Linear]) -> Tensor:
        """The decode steps' end: attention output ``y [B, C]`` projected into the residual
        ``x [B, C]``, then ``ln2`` and the MLP (via ``[B, 4C]``)."""
        proj_fn, fc_fn, out_fn = fns
        x = x + proj_fn(y)
        h = F.layer_norm(x, (x.shape[-1],), self.ln2.weight, self.ln2.bias, self.eps)
        return x + out_fn(F.gelu(fc_fn(h)))

    def linears(self, rows: int = 1, packed: bool = False) -> tuple[Linear, Linear, Linear, Linear]:
        """The qkv, attention-out, MLP-in and MLP-out layers as functions for ``step``, with
        weights prepacked for ``rows`` rows when ``packed`` (``priors.packed_linear``)."""
        layers = (self.attn.qkv, self.attn.proj, self.mlp.fc, self.mlp.proj)
        a, b, c, d = (linear_fn(m.weight, m.bias, rows, packed) for m in layers)
        return a, b, c, d

    def step_static(
        self,
        x: Tensor,
        kv: Tensor,
        pos: Tensor,
        keep: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``step`` with static shapes, as ``torch.compile`` and CUDA graphs want them: the
        position is a tensor (``pos [1]`` long) and the token attends over the whole cache
        ``kv [2, B, H, T_max, Dh]`` with ``keep [T_max]`` (True up to ``pos``) masking the
        rest. The cache must start zeroed, so masked entries are finite."""
        b, c = x.shape
        nh = self.n_head
        h = F.layer_norm(x, (c,), self.ln1.weight, self.ln1.bias, self.eps)
        qkv = F.linear(h, self.attn.qkv.weight, self.attn.qkv.bias).view(b, 3, nh, c // nh)
        q = qkv[:, 0]  # [B, H, Dh]
        if rope is None:
            new = qkv[:, 1:].transpose(0, 1)  # [2, B, H, Dh]
        else:
            q = _rotate(q, *rope)
            new = torch.stack((_rotate(qkv[:, 1], *rope), qkv[:, 2]))
        kv.index_copy_(3, pos, new.unsqueeze(3))  # tensor index: no recompile per position
        q = q.unsqueeze(2) * (1.0 / math.sqrt(c // nh))  # [B, H, 1, Dh]
        att = (q @ kv[0].transpose(-1, -2)).masked_fill(~keep, float("-inf")).softmax(-1)
        y = att @ kv[1]  # [B, H, 1, Dh]
        x = x + F.linear(y.reshape(b, c), self.attn.proj.weight, self.attn.proj.bias)
        h = F.layer_norm(x, (c,), self.ln2.weight, self.ln2.bias, self.eps)
        h = F.gelu(F.linear(h, self.mlp.fc.weight, self.mlp.fc.bias))  # [B, 4C]
        return x + F.linear(h, self.mlp.proj.weight, self.mlp.proj.bias)

    def step_rows(
        self,
        x: Tensor,
        kv: Tensor,
        pos: Tensor,
        keep: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        lin: tuple[Linear, Linear, Linear, Linear] | None = None,
    ) -> Tensor:
        """``step`` where every row has its own position: ``x [B, C]``, ``pos [B]`` long (the
        rows' key/value go to ``kv [2, B, H, T_max, Dh]`` at ``pos``), ``keep [B, T]`` True for
        the keys a row sees (``T <= T_max``); ``rope`` per row ``[B, 1, Dh]``; ``lin`` as in
        ``step``. Plain attention (inference only); the cache must hold finite values where
        ``keep`` is False."""
        fns, qkv = self._step_qkv(x, lin)  # qkv [B, 3, H, Dh]
        b, c = x.shape
        nh = self.n_head
        q = qkv[:, 0]  # [B, H, Dh]
        if rope is None:
            new = qkv[:, 1:]  # [B, 2, H, Dh]
        else:
            q = _rotate(q, *rope)
            new = torch.stack((_rotate(qkv[:, 1], *rope), qkv[:, 2]), dim=1)
        # Two advanced indices split by a slice: the indexed view is [B, 2, H, Dh].
        kv[:, torch.arange(b, device=x.device), :, pos] = new
        t, dh = keep.shape[1], c // nh
        k, v = kv.narrow(3, 0, t).unbind(0)  # [B, H, T, Dh] each
        # Two bmm and a masked softmax: SDPA with a mask takes its slow path on CPU here.
        q1 = (q * (1.0 / math.sqrt(dh))).reshape(b * nh, 1, dh)
        att = torch.bmm(q1, k.reshape(b * nh, t, dh).transpose(1, 2)).view(b, nh, t)
        att = att.masked_fill(~keep[:, None, :], float("-inf")).softmax(-1)  # [B, H, T]
        y = torch.bmm(att.view(b * nh, 1, t), v.reshape(b * nh, t, dh))  # [B*H, 1, Dh]
        return self._step_mlp(x, y.reshape(b, c), fns[1:])


# -- the prior ---------------------------------------------------------------------------------
class TransformerPrior(Prior):
    """GPT prior: pre-LN decoder-only transformer over row-major codes (arXiv 2012.09841).

    Conditions become prefix tokens, each with its own embedding table, learned position
    embedding and learned null embedding (used where ``Conditioning.drop`` is True, which
    ``Prior.loss`` sets with probability ``cond_dropout`` in training, so that classifier-free
    guidance works). An
    unconditional model starts from one learned SOS token. ``layout="taming"`` reproduces the
    minGPT of Taming Transformers instead (shared token table, one position table, no SOS).

    Args:
        config: a ``TransformerPriorConfig``; nothing else is needed to rebuild the model.

    Sampling (``sample`` -> ``generate``) runs the prefix once into a static KV cache
    ``[L, 2, B, H, T, Dh]`` and then one code per step; ``use_cache=False`` re-runs the whole
    sequence each step (the reference the cache is tested against).
    """

    Config = TransformerPriorConfig
    sample_options = frozenset({"use_cache", "static_cache", "compile", "threads", "prepack"})
    placements = frozenset({"prefix", "aligned", "both"})

    def __init__(self, config: TransformerPriorConfig) -> None:
        super().__init__(config)
        cfg = config
        c = cfg.n_embd
        taming = cfg.layout == "taming"
        in_prefix = prefix_names(cfg.conditions)
        n_cond = sum(cfg.conditions[n].prefix_tokens for n in in_prefix)
        # n_ctx: tokens before the first code's input; the output at n_ctx - 1 predicts code 0.
        self.n_ctx = (n_cond or 1) if taming else n_cond + 1
        # Index in pos_emb of code j's input embedding is _code_pos0 + j.
        self._code_pos0 = self.n_ctx if taming else 1

        self.tok_emb = nn.Embedding(cfg.vocab_size, c)
        if not taming:
            self.cond_emb = nn.ModuleDict(
                {n: nn.Embedding(s.vocab_size, c) for n, s in cfg.conditions.items()}
            )
            # Positions for prefix tokens only: an aligned condition takes its code's place.
            self.cond_pos = nn.ParameterDict(
                {
                    n: nn.Parameter(torch.zeros(cfg.conditions[n].prefix_tokens, c))
                    for n in in_prefix
                }
            )
        self.cond_null = nn.ParameterDict({n: nn.Parameter(torch.zeros(c)) for n in cfg.conditions})
        # Learned start token: the SOS of the prefix layout, or an unconditional taming model's
        # start (their sos token's embedding row).
        self.sos = nn.Parameter(torch.zeros(c)) if not taming or not n_cond else None
        if cfg.positions == "learned":
            n_pos = self.n_ctx + cfg.block_size - 1 if taming else cfg.block_size
            self.pos_emb: nn.Parameter | None = nn.Parameter(torch.zeros(n_pos, c))
        else:
            self.pos_emb = None
            dh = c // cfg.n_head
            inv = 1.0 / cfg.rope_base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
            ang = torch.arange(self.n_ctx + cfg.block_size, dtype=torch.float64)[:, None] * inv
            ang = torch.cat((ang, ang), dim=-1)  # [T_max, Dh], rotate-half pairing
            # Not persistent: derived from the config, so they stay out of the state dict.
            self.register_buffer("rope_cos", ang.cos().float(), persistent=False)
            self.register_buffer("rope_sin", ang.sin().float(), persistent=False)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(c, eps=cfg.layer_norm_eps, bias=cfg.bias)
        # A tied head reads tok_emb.weight directly, so no two state-dict keys share storage
        # (safetensors refuses shared tensors).
        self.head = None if cfg.tie_embeddings else nn.Linear(c, cfg.vocab_size, bias=False)
        # One table per neighbour offset (row above, then column), zero at first: a new model
        # computes what the same model without them computes.
        n_nb = cfg.neighbours[0] * cfg.neighbours[1]
        self.neighbour_emb = nn.Parameter(torch.zeros(n_nb, cfg.vocab_size, c)) if n_nb else None
        # One backend per (device, dtype): "auto" may pick another kernel on another device.
        self._backends: dict[tuple[torch.device, torch.dtype], AttentionBackend] = {}
        # torch.compile'd static decode steps, per (device, dtype); built on first use.
        self._compiled_steps: dict[tuple[torch.device, torch.dtype], Callable[..., Tensor]] = {}
        self._attention: str | AttentionBackend = "auto"
        if cfg.attention != "auto":
            # Built now, so an unknown name fails at build time and caches live with the model.
            self._attention = get_backend(cfg.attention, check=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # Free-standing parameters (positions, SOS, null embeddings); LayerNorms keep 1 / 0.
        free = (
            self.sos,
            self.pos_emb,
            *self.cond_null.values(),
            *(self.cond_pos.values() if hasattr(self, "cond_pos") else ()),
        )
        init_gpt_weights(self, self.config.n_layer, free)

    # -- properties ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    # -- input checks ----------------------------------------------------------------------
    def check_grid(self, h: int, w: int) -> None:
        if h * w > self.config.block_size:
            raise InputError(
                f"code grid {h}x{w} ({h * w} codes) is larger than the positional table "
                f"(block_size={self.config.block_size}): Prior.sample draws a larger grid with "
                "the sliding window and window_log_prob scores it, or train with a larger "
                "block_size."
            )

    @property
    def window_size(self) -> tuple[int, int] | None:
        """The config's ``window``, else a square of ``block_size`` codes when there is one."""
        if self.config.window is not None:
            return (int(self.config.window[0]), int(self.config.window[1]))
        side = math.isqrt(self.config.block_size)
        return (side, side) if side * side == self.config.block_size else None

    def check_window(self, size: tuple[int, int]) -> None:
        wh, ww = size
        if wh < 1 or ww < 1 or wh * ww > self.config.block_size:
            raise InputError(
                f"window {wh}x{ww} ({wh * ww} codes) is larger than the block the prior was "
                f"trained on (block_size={self.config.block_size}); use a window of at most "
                f"{self.config.block_size} codes"
                + (
                    f", e.g. {self.window_size[0]}x{self.window_size[1]}."
                    if self.window_size
                    else "."
                )
            )

    def window_decoder(self, rows: int, size: tuple[int, int], slots: int = 1) -> WindowDecoder:
        """A KV-cached decoder: while a window stands still, each of its codes costs one row
        of a decode step shared by every window that moves at the same time."""
        return _CachedWindowDecoder(self, rows, size, slots)

    def _backend(self, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
        key = (device, dtype)
        backend = self._backends.get(key)
        if backend is None:
            backend = get_backend(self._attention, device, dtype)
            self._backends[key] = backend
        return backend

    # -- forward pieces ---------------------------------------------------------------------
    def _prefix(
        self, conds: dict[str, Conditioning], batch: int, aligned: Tensor | None = None
    ) -> Tensor:
        """Embedded prefix ``[B, n_ctx, C]`` (positions included); ``aligned`` (from
        ``_aligned``) adds code 0's aligned conditions to the SOS, the input that predicts it."""
        cfg = self.config
        device = self.tok_emb.weight.device
        parts = []
        for name in prefix_names(cfg.conditions):
            cond = conds[name]
            tokens = prefix_tokens(name, cfg.conditions[name], cond)  # [B, n]
            tokens = tokens.to(device=device, dtype=torch.long)
            if cfg.layout == "taming":
                e = self.tok_emb(tokens + cfg.cond_offsets.get(name, 0))  # [B, n, C]
            else:
                e = self.cond_emb[name](tokens)  # [B, n, C]
            d = None if cond.drop is None else cond.drop.to(device=device, dtype=torch.bool)
            if d is not None:
                e = torch.where(d[:, None, None], self.cond_null[name].to(e.dtype), e)
            if cfg.layout != "taming":
                e = e + self.cond_pos[name]
            parts.append(e)
        if self.sos is not None:
            sos: Tensor = self.sos
            if self.pos_emb is not None and cfg.layout != "taming":
                sos = sos + self.pos_emb[0]  # the SOS is code position 0 of the prefix layout
            first = sos.expand(batch, 1, -1)  # [B, 1, C]
            parts.append(first if aligned is None else first + aligned[:, :1])
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, n_ctx, C]
        if self.pos_emb is not None and cfg.layout == "taming":
            x = x + self.pos_emb[: self.n_ctx]  # one position table over the whole sequence
        return x

    def _embed_codes(self, codes: Tensor, first: int, aligned: Tensor | None = None) -> Tensor:
        """Input embeddings ``[B, T, C]`` of codes ``[B, T]`` that are codes ``first..first+T``;
        the input of code ``j`` predicts code ``j + 1``, so it gets ``aligned[:, j + 1]``."""
        x = F.embedding(codes, self.tok_emb.weight)  # [B, T, C]
        if self.pos_emb is not None:
            p0 = self._code_pos0 + first
            x = x + self.pos_emb[p0 : p0 + codes.shape[1]]
        if aligned is not None:
            x = x + aligned[:, first + 1 : first + 1 + codes.shape[1]]
        return x

    def _neighbours(
        self,
        codes: Tensor,
        code: Tensor,
        size: tuple[int, int],
        corner: Tensor | None = None,
    ) -> Tensor:
        """``[n, B, C]``: for each of ``n`` codes, its neighbours above (``config.neighbours``)
        looked up in ``codes [B, H, W]`` and summed: code ``code[i]`` (a raster index) of the
        ``size`` window whose top-left corner is ``corner[i]`` (default: the grid's own corner).
        Neighbours outside the window count zero. One gather for every code of a grid, for the
        code a decode step feeds, or for the codes of a whole wave of sliding windows."""
        emb = self.neighbour_emb
        assert emb is not None
        rows, width = self.config.neighbours
        k, c = emb.shape[1], emb.shape[2]
        device = emb.device
        codes, code = codes.to(device, torch.long), code.to(device)
        if corner is None:
            corner = torch.zeros(code.shape[0], 2, dtype=torch.long, device=device)
        r, col = code // size[1], code % size[1]  # [n] each
        up = torch.arange(1, rows + 1, device=device)[None, :, None]  # [1, R, 1]
        side = torch.arange(width, device=device)[None, None, :] - width // 2  # [1, 1, W]
        rr, cc = r[:, None, None] - up, col[:, None, None] + side  # [n, R, 1], [n, 1, W]
        inside = (rr >= 0) & (cc >= 0) & (cc < size[1])  # [n, R, W]
        gr = (corner[:, 0, None, None] + rr).clamp(min=0).expand_as(inside)
        gc = (corner[:, 1, None, None] + cc).clamp(0, codes.shape[2] - 1).expand_as(inside)
        # [B, n, R, W]; clamped: a place outside the window may hold a code not drawn yet
        near = codes[:, gr, gc].clamp(0, k - 1)
        table = torch.arange(rows * width, device=device).view(rows, width) * k  # each offset's
        e = F.embedding(table + near, emb.reshape(-1, c))  # [B, n, R, W, C]
        e = e * inside.unsqueeze(-1).to(e.dtype)
        return e.sum((2, 3)).transpose(0, 1)  # [n, B, C]

    def _with_neighbours(self, aligned: Tensor | None, grid: Tensor) -> Tensor | None:
        """``aligned`` (``[rows, h*w, C]`` or None) plus the neighbours term of every code of
        ``grid [B, h, w]`` when the prior has one (repeated to ``aligned``'s rows)."""
        if self.neighbour_emb is None:
            return aligned
        h, w = grid.shape[1:]
        every = torch.arange(h * w, device=grid.device)
        nb = self._neighbours(grid, every, (h, w)).transpose(0, 1)  # [B, h*w, C]
        if aligned is None:
            return nb
        return aligned + nb.repeat(aligned.shape[0] // nb.shape[0], 1, 1)

    def _step_add(
        self,
        aligned: Tensor | None,
        drawn: Tensor,
        code: int,
        grid: tuple[int, int],
        copies: int,
    ) -> Tensor | None:
        """What the decode step adds to the input that predicts code ``code`` of ``grid``: its
        aligned conditions and its neighbours above, read from ``drawn [h*w, B]`` (the decode
        loop's step-major codes; those from ``code`` on are not read), each repeated for the
        ``copies`` of the batch."""
        add = None if aligned is None else aligned[:, code]  # [rows, C]
        if self.neighbour_emb is None:
            return add
        at = torch.tensor([code], device=drawn.device)
        nb = self._neighbours(drawn.t().reshape(-1, *grid), at, grid)[0]  # [B, C]
        nb = nb.repeat(copies, 1)  # [rows, C]
        return nb if add is None else add + nb

    def _aligned(self, conds: dict[str, Conditioning], grid: tuple[int, int]) -> Tensor | None:
        """``[B, h*w, C]``: the aligned conditions at each code of the grid (None if none)."""
        if self.config.layout == "taming":
            return None
        return aligned_embedding(self.config.conditions, conds, grid, self.cond_emb, self.cond_null)

    def _rope(self, start: int, length: int) -> tuple[Tensor, Tensor] | None:
        if self.pos_emb is not None:
            return None
        cos: Tensor = self.rope_cos[start : start + length]  # type: ignore[index]  # [T, Dh]
        sin: Tensor = self.rope_sin[start : start + length]  # type: ignore[index]
        return cos, sin

    def _run(
        self,
        x: Tensor,
        start: int = 0,
        kv: list[Tensor] | None = None,
        train: bool = False,
    ) -> Tensor:
        """Blocks + final LayerNorm on ``x [B, T, C]`` at positions ``start..start+T``.

        ``kv`` holds each layer's cache ``[2, B, H, T_max, Dh]`` (keys, values), filled in place.
        """
        cfg = self.config
        backend = self._backend(x.device, x.dtype)
        rope = None if self.pos_emb is not None else self._rope(start, x.shape[1])
        attn_p = cfg.attn_dropout if train else 0.0
        resid_p = cfg.resid_dropout if train else 0.0
        for i, block in enumerate(self.blocks):
            x = block(x, backend, rope, None if kv is None else kv[i], start, attn_p, resid_p)
        return F.layer_norm(x, (x.shape[-1],), self.ln_f.weight, self.ln_f.bias, cfg.layer_norm_eps)

    def _head(self, h: Tensor) -> Tensor:
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        return F.linear(h, weight)  # [..., K]

    def code_logits(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Teacher-forced logits ``[B, h*w, K]``: entry ``i`` predicts code ``i``."""
        got = self.check_inputs(codes, conds)
        b, gh, gw = codes.shape
        train = self.training
        flat = codes.reshape(b, gh * gw).to(self.tok_emb.weight.device, torch.long)  # [B, n]
        aligned = self._with_neighbours(self._aligned(got, (gh, gw)), codes)  # [B, n, C] or None
        x = torch.cat(
            (self._prefix(got, b, aligned), self._embed_codes(flat[:, :-1], 0, aligned)), dim=1
        )
        if train and self.config.embd_dropout:
            x = F.dropout(x, self.config.embd_dropout, training=True)
        h = self._run(x, train=train)  # [B, n_ctx + n - 1, C]
        return self._head(h[:, self.n_ctx - 1 :])  # [B, n, K]

    # -- Prior API ---------------------------------------------------------------------------
    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Total log-likelihood ``[B]`` in nats of each code grid ``[B, h, w]``.

        In training mode dropout applies; call ``eval()`` for exact likelihoods. Condition
        dropout (``cond_dropout``) applies in ``loss`` only.
        """
        return self.code_log_probs(codes, conds).sum(-1)

    def loss(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Mean negative log-likelihood per code in nats (fused cross-entropy), with condition
        dropout in training mode."""
        logits = self.code_logits(codes, self.drop_conditions(conds, int(codes.shape[0])))
        target = codes.reshape(-1).to(logits.device, torch.long)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target)

    def generate(self, request: SampleRequest) -> Tensor:
        """Draw codes ``[B, h, w]`` (``Prior.sample`` checks the inputs).

        Options (``Prior.sample(..., option=value)``):

        - ``use_cache`` (default True): False is the slow reference that re-runs the whole
          sequence per code;
        - ``static_cache`` (default False): decode with static shapes (the position as a
          tensor, attention over the whole cache with a mask), the form ``compile`` needs;
        - ``compile`` (default False): ``torch.compile`` the static decode step (inductor on
          CPU, CUDA graphs on CUDA). Compiling costs tens of seconds once per model, batch and
          grid, so it pays off for long sampling runs only (benchmarks/sample_speed.py);
        - ``threads`` (default ``"auto"``): torch threads during the decode loop; ``"auto"``
          uses one thread on CPU where a step is too small to split (``priors.threads``),
          an int sets the count, None leaves torch's setting alone;
        - ``prepack`` (default ``"auto"``): on CPU in float32 the cached loop's linear layers
          and head use weights packed once for its batch (oneDNN, ``priors.packed_linear``),
          equal to ``F.linear`` up to rounding; False keeps ``F.linear``. True is the same as
          ``"auto"`` (there is nothing to pack on other devices or dtypes).
        """
        gh, gw = request.grid
        opts = request.options
        use_cache = bool(opts.get("use_cache", True))
        compiled = bool(opts.get("compile", False))
        static = compiled or bool(opts.get("static_cache", False))
        if static and not use_cache:
            raise InputError(
                "static_cache / compile decode with the KV cache; drop use_cache=False or them."
            )
        if static:
            self._check_static_backend()
        aligned = self._aligned(request.conds, request.grid)  # [rows, n, C] or None
        x0 = self._prefix(request.conds, request.rows, aligned)  # [rows, n_ctx, C]
        copies = 2 if request.guided else 1
        c = self.config.n_embd
        step_flop = request.rows * c * 4 * c * 2  # the MLP's first matmul, a step's largest
        packed = use_prepack(opts.get("prepack", "auto"), x0.device, x0.dtype)
        with decode_threads(opts.get("threads", "auto"), step_flop, x0.device):
            if not use_cache:
                out = self._decode_uncached(x0, (gh, gw), request.pick, copies, aligned)
            elif static:
                out = self._decode_static(x0, (gh, gw), request.pick, copies, compiled, aligned)
            else:
                out = self._decode_cached(x0, (gh, gw), request.pick, copies, packed, aligned)
        return out.view(request.batch, gh, gw)

    # -- sampling internals -----------------------------------------------------------------
    def _decode_cached(
        self,
        x0: Tensor,
        grid: tuple[int, int],
        pick: Callable[[Tensor, int], Tensor],
        copies: int,
        packed: bool = False,
        aligned: Tensor | None = None,
    ) -> Tensor:
        """Prefix once into a static KV cache, then one code per step -> codes ``[B, h*w]``.

        ``x0`` holds ``copies`` stacked batches (2 with guidance: conditional, then null rows);
        each drawn code is fed to every copy. ``packed``: the steps' linear layers and the head
        use prepacked weights (``priors.packed_linear``). ``aligned`` ``[rows, n, C]``: the
        aligned conditions (``_aligned``).
        """
        cfg = self.config
        rows, n_ctx, c = x0.shape
        n = grid[0] * grid[1]
        t_max = n_ctx + n - 1  # the last code is never fed back
        cache = x0.new_empty(cfg.n_layer, 2, rows, cfg.n_head, t_max, c // cfg.n_head)
        kv = list(cache.unbind(0))  # per-layer views [2, rows, H, T_max, Dh], made once
        out = torch.empty(n, rows // copies, dtype=torch.long, device=x0.device)  # step-major
        h = self._run(x0, 0, kv)[:, -1]  # [rows, C]
        step = self._step_fn(x0.device, x0.dtype, rows, packed)
        head: Linear = self._head
        if packed:
            head = linear_fn(
                self.tok_emb.weight if self.head is None else self.head.weight, None, rows, True
            )
        for i in range(n):
            code = pick(head(h), i)  # [B]
            out[i] = code
            if i == n - 1:
                break
            add = self._step_add(aligned, out, i + 1, grid, copies)  # [rows, C] or None
            h = step(code if copies == 1 else code.repeat(copies), i, n_ctx + i, kv, add)
        return out.t()

    def _step_fn(
        self, device: torch.device, dtype: torch.dtype, rows: int = 1, packed: bool = False
    ) -> Callable[[Tensor, int, int, list[Tensor], Tensor | None], Tensor]:
        """The one-token decode step ``(codes [rows], code index, position, kv, add) -> h [rows,
        C]`` with the backend, the position tables and each block's linear layers (prepacked
        for ``rows`` rows when ``packed``) bound once per sampling call; ``add [rows, C]`` (or
        None) is added to the input embedding (the aligned conditions)."""
        backend = self._backend(device, dtype)
        blocks, lins, embed, final = self._step_parts(rows, packed)

        def step(codes: Tensor, j: int, pos: int, kv: list[Tensor], add: Tensor | None) -> Tensor:
            x, rope = embed(codes, j, pos)  # [rows, C], rope tables [Dh] each (or None)
            if add is not None:
                x = x + add
            for block, layer_kv, lin in zip(blocks, kv, lins):
                x = block.step(x, layer_kv, pos, backend, rope, lin)
            return final(x)

        return step

    def _step_parts(
        self, rows: int, packed: bool
    ) -> tuple[
        list[_Block], list[Any], Callable[..., tuple[Tensor, Any]], Callable[[Tensor], Tensor]
    ]:
        """What both decode steps bind once per call: the blocks, their linear layers
        (prepacked for ``rows`` rows when ``packed``), ``embed(codes, code index, position)``
        -> (token + position embedding, rotary tables or None) for an int or a per-row
        tensor of indices, and ``ln_f``."""
        blocks = cast(list[_Block], list(self.blocks))
        lins = [block.linears(rows, packed) for block in blocks]
        emb, pos_emb, pos0 = self.tok_emb.weight, self.pos_emb, self._code_pos0
        ln_w, ln_b, eps = self.ln_f.weight, self.ln_f.bias, self.config.layer_norm_eps
        rope_cos: Tensor | None = getattr(self, "rope_cos", None)
        rope_sin: Tensor | None = getattr(self, "rope_sin", None)

        def embed(codes: Tensor, index: int | Tensor, pos: int | Tensor) -> tuple[Tensor, Any]:
            x = F.embedding(codes, emb)  # [R, C]
            if pos_emb is not None:
                return x + pos_emb[pos0 + index], None
            if rope_cos is None or rope_sin is None:
                return x, None
            if isinstance(pos, Tensor):  # a position per row: [R, 1, Dh] each
                return x, (rope_cos[pos][:, None], rope_sin[pos][:, None])
            return x, (rope_cos[pos], rope_sin[pos])  # [Dh] each

        def final(x: Tensor) -> Tensor:
            return F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)

        return blocks, lins, embed, final

    def _rows_step_fn(
        self, rows: int = 1, packed: bool = False
    ) -> Callable[[Tensor, Tensor, Tensor, list[Tensor], Tensor | None], Tensor]:
        """The decode step with a position per row ``(codes [R], code index [R], sequence
        position [R], kv, add [R, C] or None) -> h [R, C]`` (the sliding window's tiles, each
        at its own place); linear layers prepacked for about ``rows`` rows when ``packed``."""
        blocks, lins, embed, final = self._step_parts(rows, packed)

        def step(
            codes: Tensor, index: Tensor, pos: Tensor, kv: list[Tensor], add: Tensor | None
        ) -> Tensor:
            x, rope = embed(codes, index, pos)  # [R, C], rope tables [R, 1, Dh] each (or None)
            if add is not None:
                x = x + add
            keep = torch.arange(int(pos.max()) + 1, device=pos.device) <= pos[:, None]  # [R, T]
            for block, layer_kv, lin in zip(blocks, kv, lins):
                x = block.step_rows(x, layer_kv, pos, keep, rope, lin)
            return final(x)

        return step

    def _plain_attention(self) -> bool:
        """Whether the attention backend computes plain causal attention (``auto``, ``sdpa``,
        ``math``), which the decode steps that compute attention themselves reproduce."""
        att = self._attention
        if isinstance(att, str):
            return att in ("auto", "sdpa", "math")
        options = att.config.model_dump(exclude={"type"})
        options.pop("kernel", None)  # a forced SDPA kernel computes the same attention
        return att.type_name() in ("auto", "sdpa", "math") and not options

    def _check_static_backend(self) -> None:
        """The static step computes attention itself (masked, over the whole cache), which is
        what ``sdpa`` and ``math`` compute; a backend with its own pattern would differ."""
        att = self._attention
        if isinstance(att, str):
            name, options = att, {}
        else:
            name, options = att.type_name(), att.config.model_dump(exclude={"type"})
            options.pop("kernel", None)  # a forced SDPA kernel computes the same attention
        if name not in ("auto", "sdpa", "math") or options:
            raise InputError(
                "static_cache / compile compute plain causal attention, but this prior uses "
                f"attention backend {name!r}"
                + (f" with {options}" if options else "")
                + "; sample without them."
            )

    def _decode_static(
        self,
        x0: Tensor,
        grid: tuple[int, int],
        pick: Callable[[Tensor, int], Tensor],
        copies: int,
        compiled: bool,
        aligned: Tensor | None = None,
    ) -> Tensor:
        """``_decode_cached`` with static shapes: every step is the same computation on the
        same buffers (cache, position tensor), so it compiles once and replays as a graph."""
        cfg = self.config
        rows, n_ctx, c = x0.shape
        n = grid[0] * grid[1]
        t_max = n_ctx + n - 1
        # Zeroed: the masked, not yet written entries must be finite (0 * NaN is NaN).
        cache = x0.new_zeros(cfg.n_layer, 2, rows, cfg.n_head, t_max, c // cfg.n_head)
        out = torch.empty(n, rows // copies, dtype=torch.long, device=x0.device)  # step-major
        h = self._run(x0, 0, list(cache.unbind(0)))[:, -1]  # [rows, C]
        step = self._static_step_fn(x0.device, x0.dtype, compiled)
        if compiled and x0.device.type == "cuda":
            # CUDA graphs replay fixed addresses: the cache is mutated in place, never moved.
            torch._dynamo.mark_static_address(cache)
        pos = torch.zeros(1, dtype=torch.long, device=x0.device)
        for i in range(n):
            code = pick(self._head(h), i)  # [B]
            out[i] = code
            if i == n - 1:
                break
            pos.fill_(n_ctx + i)
            add = self._step_add(aligned, out, i + 1, grid, copies)  # [rows, C] or None
            h = step(code if copies == 1 else code.repeat(copies), pos, cache, add)  # [rows, C]
            if compiled and x0.device.type == "cuda":
                h = h.clone()  # a CUDA-graph output is overwritten by the next replay
        return out.t()

    def _static_step_fn(
        self, device: torch.device, dtype: torch.dtype, compiled: bool
    ) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
        """``(codes [rows], pos [1], cache [L, 2, rows, H, T, Dh], add [rows, C] or None) -> h
        [rows, C]`` (``add``: the aligned conditions of the code to predict); compiled
        once per (device, dtype) when asked (torch.compile recompiles per new shape)."""
        key = (device, dtype)
        if compiled and key in self._compiled_steps:
            return self._compiled_steps[key]
        blocks = cast(list[_Block], list(self.blocks))
        emb, pos_emb = self.tok_emb.weight, self.pos_emb
        offset = self._code_pos0 - self.n_ctx  # pos_emb row of sequence position p: p + offset
        ln_w, ln_b, eps = self.ln_f.weight, self.ln_f.bias, self.config.layer_norm_eps
        rope_cos: Tensor | None = getattr(self, "rope_cos", None)
        rope_sin: Tensor | None = getattr(self, "rope_sin", None)

        def step(codes: Tensor, pos: Tensor, cache: Tensor, add: Tensor | None) -> Tensor:
            x = F.embedding(codes, emb)  # [rows, C]
            if add is not None:
                x = x + add
            rope = None
            if pos_emb is not None:
                x = x + pos_emb.index_select(0, pos + offset)
            elif rope_cos is not None and rope_sin is not None:
                rope = (rope_cos.index_select(0, pos), rope_sin.index_select(0, pos))  # [1, Dh]
            keep = torch.arange(cache.shape[4], device=cache.device) <= pos  # [T_max]
            for i, block in enumerate(blocks):
                x = block.step_static(x, cache[i], pos, keep, rope)
            return F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)

        if not compiled:
            return step
        # CPU: inductor fuses the elementwise ops into C++ loops; CUDA: reduce-overhead adds
        # CUDA graphs, one replay per step instead of ~20 launches per layer.
        mode = "reduce-overhead" if device.type == "cuda" else None
        fn = torch.compile(step, dynamic=False, fullgraph=True, mode=mode)
        self._compiled_steps[key] = fn
        return fn

    def _decode_uncached(
        self,
        x0: Tensor,
        grid: tuple[int, int],
        pick: Callable[[Tensor, int], Tensor],
        copies: int,
        aligned: Tensor | None = None,
    ) -> Tensor:
        """Reference decoding: the whole sequence is run again for every code."""
        rows = x0.shape[0]
        n = grid[0] * grid[1]
        out = torch.zeros(rows // copies, n, dtype=torch.long, device=x0.device)
        for i in range(n):
            x = x0
            if i:
                codes_in = out[:, :i].repeat(copies, 1)  # [rows, i]
                near = aligned
                if self.neighbour_emb is not None:
                    # codes from i on are not drawn yet: no code before them reads them
                    near = self._with_neighbours(aligned, out.repeat(copies, 1).view(-1, *grid))
                x = torch.cat((x0, self._embed_codes(codes_in, 0, near)), dim=1)
            h = self._run(x)[:, -1]  # [rows, C]
            out[:, i] = pick(self._head(h), i)
        return out


class _CachedWindowDecoder(WindowDecoder):
    """Window logits from one zeroed KV cache ``[L, 2, slots * rows, H, T + 1, Dh]`` made once;
    slot ``s`` owns rows ``s * rows .. (s + 1) * rows``. A slot's first call after ``start``
    runs its prefix and codes up to the asked position in one forward; slots asked one position
    further go through one batched decode step over the range of slots they span, each row at
    its own position (rows of slots not asked feed a dummy token into the spare column ``T``)."""

    def __init__(
        self, prior: TransformerPrior, rows: int, size: tuple[int, int], slots: int
    ) -> None:
        cfg = prior.config
        w = prior.tok_emb.weight
        self.t_max = prior.n_ctx + size[0] * size[1] - 1  # the last code is never fed back
        # Zeroed: masked keys of a row must be finite (a zero attention weight times NaN is NaN).
        cache = w.new_zeros(
            cfg.n_layer, 2, slots * rows, cfg.n_head, self.t_max + 1, cfg.n_embd // cfg.n_head
        )
        self.kv = list(cache.unbind(0))  # per-layer views, made once
        self.prior, self.rows, self.size = prior, rows, size
        self.windows: list[tuple[dict[str, Conditioning], int, int]] = [({}, 0, 0)] * slots
        self.fed: list[int | None] = [None] * slots  # codes in a slot's cache; None: none yet
        # Each slot's aligned conditions [rows, wh * ww, C] (prior._aligned), None without any.
        self.aligned: list[Tensor | None] = [None] * slots
        # The batched step computes plain attention with a per-row key mask; a backend with
        # its own pattern (a sliding band) goes through the per-slot forward instead.
        self.batched = prior._plain_attention()
        self.step = prior._rows_step_fn() if self.batched else None
        self.head: Linear = prior._head

    def start(self, slot: int, conds: dict[str, Conditioning], top: int, left: int) -> None:
        self.windows[slot], self.fed[slot] = (conds, top, left), None
        self.aligned[slot] = self.prior._aligned(conds, self.size)

    def running(self, options: Mapping[str, Any]) -> AbstractContextManager[None]:
        """The prior's ``threads`` option, sized by this decoder's calls: a batched step of
        every slot (several slots) or a forward of one window (one slot, ``exact``); with its
        ``prepack`` option (default ``"auto"``) the batched step's linear layers and the head
        use weights packed once for the draw (``priors.packed_linear``)."""
        c = self.prior.config.n_embd
        slots = len(self.fed)
        tokens = self.rows * (slots if slots > 1 else self.size[0] * self.size[1])
        flop = tokens * c * 4 * c * 2  # the MLP's first matmul
        prior, w = self.prior, self.kv[0]
        if self.batched and use_prepack(options.get("prepack", "auto"), w.device, w.dtype):
            # Packed for the rows of a step over every slot; fewer rows use the same packing.
            rows = self.rows * slots
            self.step = prior._rows_step_fn(rows, packed=True)
            weight = prior.tok_emb.weight if prior.head is None else prior.head.weight
            self.head = linear_fn(weight, None, rows, True)
        return decode_threads(options.get("threads", "auto"), flop, w.device)

    def _window(self, slot: int, codes: Tensor) -> Tensor:
        """The slot's window ``[rows, wh * ww]`` as drawn so far."""
        (wh, ww), (_, top, left) = self.size, self.windows[slot]
        win = codes[:, top : top + wh, left : left + ww].reshape(codes.shape[0], wh * ww)
        return win.repeat(self.rows // codes.shape[0], 1)

    def _forward(self, slot: int, position: int, codes: Tensor) -> Tensor:
        """Feed the slot everything before ``position`` it lacks in one forward -> ``[rows, K]``."""
        prior, fed = self.prior, self.fed[slot]
        kv = [k.narrow(1, slot * self.rows, self.rows) for k in self.kv]
        win, aligned = self._window(slot, codes), self.aligned[slot]
        # the neighbours of the codes before `position`, all drawn
        aligned = prior._with_neighbours(aligned, win.view(-1, *self.size))
        if fed is None:
            x = prior._prefix(self.windows[slot][0], self.rows, aligned)  # [rows, n_ctx, C]
            if position:
                x = torch.cat((x, prior._embed_codes(win[:, :position], 0, aligned)), dim=1)
            h = prior._run(x, 0, kv)[:, -1]  # [rows, C]
        else:
            if position <= fed:
                raise ValueError(f"positions must increase: {position} after {fed}")
            x = prior._embed_codes(win[:, fed:position], fed, aligned)  # [rows, T, C]
            h = prior._run(x, prior.n_ctx + fed, kv)[:, -1]
        self.fed[slot] = position
        return prior._head(h)  # [rows, K]

    def logits(self, slots: Sequence[int], positions: Sequence[int], codes: Tensor) -> Tensor:
        out: list[Tensor | None] = [None] * len(slots)
        stepping = []
        for n, (slot, position) in enumerate(zip(slots, positions, strict=True)):
            fed = self.fed[slot]
            if self.batched and fed is not None and position == fed + 1:
                stepping.append(n)
            else:
                out[n] = self._forward(slot, position, codes)
        if stepping:
            for n, h in zip(stepping, self._step([slots[n] for n in stepping], codes), strict=True):
                out[n] = h
        return torch.stack(cast(list[Tensor], out))  # [n, rows, K]

    def _step(self, slots: list[int], codes: Tensor) -> Tensor:
        """One batched step feeding each slot's next code -> logits ``[n, rows, K]``."""
        assert self.step is not None
        prior, rows, ww = self.prior, self.rows, self.size[1]
        lo, hi = min(slots), max(slots) + 1
        span = hi - lo
        device = codes.device
        fed = torch.tensor([self.fed[s] for s in slots], device=device)  # [n] window positions
        at = torch.tensor(slots, device=device) - lo
        corner = torch.tensor([self.windows[s][1:] for s in slots], device=device)  # [n, 2]
        tok = codes[:, corner[:, 0] + fed // ww, corner[:, 1] + fed % ww].t()  # [n, B]
        tokens = codes.new_zeros(span, rows)
        tokens[at] = tok.repeat(1, rows // codes.shape[0])
        index = torch.zeros(span, dtype=torch.long, device=device)  # code index (positions)
        index[at] = fed
        seq = torch.full((span,), self.t_max, dtype=torch.long, device=device)  # spare column
        seq[at] = prior.n_ctx + fed
        kv = [k.narrow(1, lo * rows, span * rows) for k in self.kv]
        add = None
        if self.aligned[slots[0]] is not None or prior.neighbour_emb is not None:
            # The input of window code fed predicts code fed + 1: its aligned conditions and
            # its neighbours above.
            add = self.kv[0].new_zeros(span, rows, prior.config.n_embd)
            if self.aligned[slots[0]] is not None:
                for s in slots:
                    table = self.aligned[s]
                    assert table is not None
                    add[s - lo] = table[:, cast(int, self.fed[s]) + 1]
            if prior.neighbour_emb is not None:
                near = prior._neighbours(codes, fed + 1, self.size, corner)  # [n, B, C]
                add[at] += near.repeat(1, rows // codes.shape[0], 1)
            add = add.view(span * rows, -1)
        h = self.step(
            tokens.view(-1), index.repeat_interleave(rows), seq.repeat_interleave(rows), kv, add
        )  # [span * rows, C]
        for s in slots:
            self.fed[s] = cast(int, self.fed[s]) + 1
        return self.head(h.view(span, rows, -1)[at].flatten(0, 1)).view(len(slots), rows, -1)
