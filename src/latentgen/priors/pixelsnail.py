"""PixelSNAIL prior: gated residual causal convolutions with causal self-attention.

PixelSNAIL (Chen et al. 2017, https://arxiv.org/abs/1712.09763), as used for the priors of
VQ-VAE-2 (Razavi et al. 2019, https://arxiv.org/abs/1906.00446), over a grid of codes.

Causality is carried by two streams, as in Gated PixelCNN (https://arxiv.org/abs/1606.05328):

- the *vertical* stream ``v`` at ``(r, c)`` depends only on codes in rows ``< r``, so its
  convolutions may look right as well as left (``down`` convolutions); stacked, its view of the
  rows above widens by ``kernel_size // 2`` columns per layer on both sides — no blind spot;
- the *horizontal* stream ``h`` at ``(r, c)`` depends only on codes before ``(r, c)`` in raster
  order. Its convolutions see rows ``<= r`` and columns ``<= c`` (``downright``), and it reads
  ``v`` at the same position through a 1x1 convolution.

Both streams start from shifted convolutions of the code embeddings (one row down for ``v``, one
column right for ``h``), so every later layer may include its own position. The attention
blocks read the *unshifted* code embeddings as part of their keys and values, so position ``i``
attends strictly to ``j < i``, plus a learned start token that keeps position 0's softmax
defined.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.base import ConditionSlot, Conds, Prior, PriorConfig, SampleRequest
from latentgen.priors.pixelsnail_cache import sample_cached
from latentgen.priors.threads import decode_threads

__all__ = ["PixelSNAILConfig", "PixelSNAILPrior"]


class PixelSNAILConfig(PriorConfig):
    """Configuration of :class:`PixelSNAILPrior` (defaults near VQ-VAE-2's top prior)."""

    type: Literal["pixelsnail"] = "pixelsnail"
    vocab_size: int = Field(
        1024, ge=2, description="Number of codes K the prior predicts (the codebook size)."
    )
    channel: int = Field(
        256, ge=1, description="Width of both causal streams and of the condition embeddings."
    )
    kernel_size: int = Field(
        5,
        ge=3,
        description="Odd width of the causal convolutions; each layer sees kernel_size // 2 "
        "rows above. See arXiv 1712.09763.",
    )
    n_block: int = Field(
        4, ge=1, description="PixelSNAIL blocks (residual blocks, then one attention layer)."
    )
    n_res_block: int = Field(
        4, ge=1, description="Gated residual blocks per PixelSNAIL block, on each stream."
    )
    res_channel: int = Field(
        256, ge=1, description="Hidden width inside each gated residual block."
    )
    attention: bool = Field(
        True,
        description="Causal multi-head self-attention at the end of each block (the 'SNAIL' "
        "part of arXiv 1712.09763). Off gives a Gated-PixelCNN-style model.",
    )
    n_head: int = Field(8, ge=1, description="Attention heads.")
    key_channel: int = Field(
        128, ge=1, description="Total query/key width over all heads (divisible by n_head)."
    )
    value_channel: int = Field(
        256, ge=1, description="Total value width over all heads (divisible by n_head)."
    )
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout in residual blocks and attention weights."
    )
    max_height: int = Field(
        32,
        ge=1,
        description="Largest code grid height; the positional (background) input is row / "
        "max_height, so grids up to this size share one coordinate scale.",
    )
    max_width: int = Field(32, ge=1, description="Largest code grid width (see max_height).")
    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="Conditions by name. num_tokens 1: class-like, a per-channel bias in each "
        "gated block; num_tokens hc*wc: a spatial map (Conditioning.grid), resized to the code "
        "grid (nearest) and added through a 1x1 convolution in each gated block.",
    )

    @model_validator(mode="after")
    def _check(self) -> PixelSNAILConfig:
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so the vertical convolution is centred, got "
                f"{self.kernel_size}; use {self.kernel_size + 1}."
            )
        if self.attention:
            for name in ("key_channel", "value_channel"):
                value = getattr(self, name)
                if value % self.n_head:
                    raise ValueError(
                        f"{name}={value} is not divisible by n_head={self.n_head}; pick a "
                        f"multiple of {self.n_head}."
                    )
        return self


# -- causal building blocks ------------------------------------------------------------------


def _down_shift(x: Tensor) -> Tensor:
    """Move a feature map one row down (row 0 becomes zeros)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _right_shift(x: Tensor) -> Tensor:
    """Move a feature map one column right (column 0 becomes zeros)."""
    return F.pad(x, (1, 0))[..., :-1]


class CausalConv2d(nn.Module):
    """Convolution whose output at ``(r, c)`` reads input rows ``r-kh+1 .. r`` only.

    ``mode="down"`` reads columns ``c-kw//2 .. c+kw//2`` (safe on the vertical stream, whose row
    ``r`` holds rows ``< r``); ``mode="downright"`` reads columns ``c-kw+1 .. c`` (raster-causal,
    including the current position).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: tuple[int, int], mode: Literal["down", "downright"]
    ) -> None:
        super().__init__()
        kh, kw = kernel
        # (left, right, top, bottom): never pad below, so cropping rows off the bottom is exact.
        self.pad = (kw // 2, kw // 2, kh - 1, 0) if mode == "down" else (kw - 1, 0, kh - 1, 0)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


class GatedResBlock(nn.Module):
    """Gated block ``x + a * sigmoid(b)`` with ``[a, b] = conv(elu(conv(elu(x)) + aux)) + cond``.

    As in PixelCNN++ (arXiv 1701.05517) with ELU; ``aux`` is a 1x1 projection of another stream
    (the vertical stream, or attention output) and ``cond`` the condition map.
    """

    def __init__(
        self,
        channel: int,
        res_channel: int,
        kernel: tuple[int, int],
        mode: Literal["down", "downright"],
        dropout: float,
        aux_channel: int = 0,
        cond_channel: int = 0,
    ) -> None:
        super().__init__()
        self.conv1 = CausalConv2d(channel, res_channel, kernel, mode)
        self.aux = nn.Conv2d(aux_channel, res_channel, 1) if aux_channel else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv2d(res_channel, 2 * channel, kernel, mode)
        self.cond = nn.Conv2d(cond_channel, 2 * channel, 1, bias=False) if cond_channel else None

    def forward(self, x: Tensor, aux: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        out = self.conv1(F.elu(x))  # [B, R, h, w]
        if self.aux is not None and aux is not None:
            out = out + self.aux(F.elu(aux))
        out = self.conv2(self.dropout(F.elu(out)))  # [B, 2C, h, w]
        if self.cond is not None and cond is not None:
            # cond is [B, D, 1, 1] (class-like: a per-channel bias) or [B, D, h, w] (spatial).
            out = out + self.cond(cond)
        a, b = out.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CausalAttention(nn.Module):
    """Multi-head attention over raster positions where position ``i`` sees ``j < i`` only.

    Keys and values carry the unshifted code at ``j``, hence the strict mask. A learned start
    key/value is visible to every position, so position 0 (nothing before it) still has a
    defined softmax instead of NaN.
    """

    def __init__(
        self, query_in: int, kv_in: int, key_channel: int, value_channel: int, n_head: int
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(query_in, key_channel)
        self.key = nn.Linear(kv_in, key_channel)
        self.value = nn.Linear(kv_in, value_channel)
        self.start_key = nn.Parameter(torch.zeros(key_channel))
        self.start_value = nn.Parameter(torch.zeros(value_channel))

    def forward(self, query_in: Tensor, kv_in: Tensor, dropout: float = 0.0) -> Tensor:
        """``query_in [B, Cq, h, w]``, ``kv_in [B, Ckv, h, w]`` -> ``[B, value_channel, h, w]``."""
        b, _, h, w = query_in.shape
        n = h * w
        q_in = query_in.flatten(2).transpose(1, 2)  # [B, L, Cq]
        kv = kv_in.flatten(2).transpose(1, 2)  # [B, L, Ckv]
        q = self._heads(self.query(q_in))  # [B, nh, L, dk]
        k = self._heads(torch.cat([self.start_key.expand(b, 1, -1), self.key(kv)], 1))
        v = self._heads(torch.cat([self.start_value.expand(b, 1, -1), self.value(kv)], 1))
        # Column 0 is the start token; column j+1 is position j, allowed iff j < i.
        mask = torch.ones(n, n + 1, dtype=torch.bool, device=q.device).tril()  # [L, L+1]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, L, value_channel]
        return out.transpose(1, 2).reshape(b, -1, h, w)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_head, d // self.n_head).transpose(1, 2)  # [B, nh, n, d/nh]


class PixelSNAILBlock(nn.Module):
    """``n_res_block`` gated blocks on each stream, then (optionally) causal attention on ``h``."""

    def __init__(self, cfg: PixelSNAILConfig, cond_channel: int) -> None:
        super().__init__()
        k, c, r = cfg.kernel_size, cfg.channel, cfg.res_channel
        self.v_blocks = nn.ModuleList(
            GatedResBlock(c, r, (k // 2 + 1, k), "down", cfg.dropout, 0, cond_channel)
            for _ in range(cfg.n_res_block)
        )
        self.h_blocks = nn.ModuleList(
            GatedResBlock(c, r, (k // 2 + 1, k // 2 + 1), "downright", cfg.dropout, c, cond_channel)
            for _ in range(cfg.n_res_block)
        )
        self.dropout = cfg.dropout
        self.attn: CausalAttention | None = None
        if cfg.attention:
            # Queries: h + position; keys/values: h + unshifted code embedding + position.
            self.attn = CausalAttention(
                c + 2, 2 * c + 2, cfg.key_channel, cfg.value_channel, cfg.n_head
            )
            self.attn_out = GatedResBlock(
                c, r, (1, 1), "downright", cfg.dropout, cfg.value_channel, cond_channel
            )

    def forward(
        self, v: Tensor, h: Tensor, x: Tensor, bg: Tensor, cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        for v_block, h_block in zip(self.v_blocks, self.h_blocks):
            v = v_block(v, cond=cond)
            h = h_block(h, aux=v, cond=cond)
        if self.attn is not None:
            bg = bg.expand(h.shape[0], -1, -1, -1)
            p = self.dropout if self.training else 0.0
            a = self.attn(torch.cat([h, bg], 1), torch.cat([h, x, bg], 1), p)
            h = self.attn_out(h, aux=a, cond=cond)
        return v, h


# -- the prior ---------------------------------------------------------------------------------


class PixelSNAILPrior(Prior):
    """PixelSNAIL over code grids ``[B, h, w]`` (arXiv 1712.09763; VQ-VAE-2, arXiv 1906.00446).

    Args:
        config: a :class:`PixelSNAILConfig`; the model is built from it and nothing else.

    One forward gives logits ``[B, K, h, w]`` for every position at once (training and
    ``log_prob``). Sampling draws in raster order and keeps every layer's activations, so each
    code costs one position's work (``latentgen.priors.pixelsnail_cache``, after Fast PixelCNN++,
    arXiv 1704.06001); ``use_cache=False`` runs one forward per position instead, cropped to the
    rows drawn so far (exact because no layer looks down).

    Conditions: each slot gets an embedding table of ``vocab_size + 1`` rows (the last is the
    learned null, used where ``Conditioning.drop`` is True). Class-like conditions become a
    ``[B, C, 1, 1]`` map; spatial ones a ``[B, C, hc, wc]`` map resized to the code grid
    (nearest). The maps of all conditions are summed and each gated block adds its own 1x1
    projection of the sum to its gate input.
    """

    Config = PixelSNAILConfig
    sample_options = frozenset({"use_cache", "threads"})
    # A map is always added at its cells and a label to every code, whatever the placement.
    placements = frozenset({"prefix", "aligned", "both"})

    def __init__(self, config: PixelSNAILConfig) -> None:
        super().__init__(config)
        self.config: PixelSNAILConfig = config
        c, k = config.channel, config.kernel_size
        self.embed = nn.Embedding(config.vocab_size, c)
        # Inputs are the code embedding plus 2 coordinate channels (the paper's "background").
        self.v_init = CausalConv2d(c + 2, c, (k // 2 + 1, k), "down")
        self.h_init_up = CausalConv2d(c + 2, c, (1, k), "down")
        self.h_init_left = CausalConv2d(c + 2, c, (k // 2 + 1, k // 2), "downright")
        cond_channel = c if config.conditions else 0
        self.cond_embed = nn.ModuleDict(
            {name: nn.Embedding(slot.vocab_size + 1, c) for name, slot in config.conditions.items()}
        )
        self.blocks = nn.ModuleList(
            PixelSNAILBlock(config, cond_channel) for _ in range(config.n_block)
        )
        self.head = nn.Sequential(
            nn.ELU(), nn.Conv2d(c, c, 1), nn.ELU(), nn.Conv2d(c, config.vocab_size, 1)
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # -- forward -------------------------------------------------------------------------------
    def forward(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Logits ``[B, K, h, w]`` for codes ``[B, h, w]``; logits at ``i`` see codes ``< i``."""
        got = self.check_inputs(codes, conds)
        b, h, w = codes.shape
        cond = self._condition_map(got, (h, w), b)
        return self._logits(codes.long(), cond)

    def code_logits(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Teacher-forced logits ``[B, h*w, K]`` in raster order (the sliding window's input)."""
        return self(codes, conds).flatten(2).transpose(1, 2)

    @property
    def window_size(self) -> tuple[int, int]:
        """The largest grid the prior models directly: the sliding window for larger ones (no
        KV cache here, so both window modes run a forward of the window per code; the cached
        mode's wavefront runs the windows of a wave in one batch)."""
        return (self.config.max_height, self.config.max_width)

    def _logits(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """Logits ``[B, K, h, w]``; ``cond`` may cover more rows than ``codes`` (sampling crops)."""
        return self.head(self._features(codes, cond))

    def _features(self, codes: Tensor, cond: Tensor | None) -> Tensor:
        """Horizontal-stream features ``[B, C, h, w]`` that the output head reads."""
        _, h, w = codes.shape
        if cond is not None and cond.shape[-2] > 1:
            cond = cond[:, :, :h, :w]
        x = self.embed(codes).permute(0, 3, 1, 2)  # [B, C, h, w]
        bg = self._background(h, w, x.device, x.dtype)  # [1, 2, h, w]
        xb = torch.cat([x, bg.expand(x.shape[0], -1, -1, -1)], 1)  # [B, C+2, h, w]
        # The shifts make position (r, c) blind to its own code: v sees rows < r, h raster < i.
        v = _down_shift(self.v_init(xb))
        h_ = _down_shift(self.h_init_up(xb)) + _right_shift(self.h_init_left(xb))
        for block in self.blocks:
            v, h_ = block(v, h_, x, bg, cond)
        return h_

    def _background(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        # Scaled by the max grid, not (h, w), so a cropped grid gets the same coordinates.
        rows = (torch.arange(h, device=device, dtype=dtype) + 0.5) / self.config.max_height
        cols = (torch.arange(w, device=device, dtype=dtype) + 0.5) / self.config.max_width
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # [2, h, w]
        return (2 * grid - 1).unsqueeze(0)

    def _condition_map(
        self, conds: dict[str, Conditioning], grid: tuple[int, int], batch: int
    ) -> Tensor | None:
        """Sum of the conditions' embedding maps: ``[B, C, 1, 1]`` or ``[B, C, h, w]``."""
        if not self.config.conditions:
            return None
        out: Tensor | None = None
        for name, slot in self.config.conditions.items():
            c = conds[name]
            tokens = c.tokens.to(self.embed.weight.device).long()  # [B, n]
            drop = c.drop.to(tokens.device) if c.drop is not None else None
            if drop is not None:
                tokens = tokens.masked_fill(drop[:, None], slot.vocab_size)  # null row
            e = self.cond_embed[name](tokens).transpose(1, 2)  # [B, C, n]
            if c.grid is None:
                e = e.unsqueeze(-1)  # [B, C, 1, 1] (n == 1, checked)
            else:
                e = e.reshape(e.shape[0], -1, *c.grid)  # [B, C, hc, wc]
                e = F.interpolate(e, size=grid, mode="nearest")  # [B, C, h, w]
            out = e if out is None else out + e
        return out

    # -- Prior API -----------------------------------------------------------------------------
    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Total log-likelihood ``[B]`` in nats of code grids ``[B, h, w]`` (one forward)."""
        logits = self(codes, conds)  # [B, K, h, w]
        nll = F.cross_entropy(logits.float(), codes.long(), reduction="none")  # [B, h, w]
        return -nll.flatten(1).sum(1)

    def generate(self, request: SampleRequest) -> Tensor:
        """Draw codes ``[B, h, w]`` in raster order.

        By default with cached activations (``latentgen.priors.pixelsnail_cache``: each code
        costs one position's work), on one thread where steps are small (option ``threads``,
        as for the transformer: ``latentgen.priors.threads``); the option ``use_cache=False``
        runs one cropped forward per position instead, the reference the cache is tested
        against. ``Prior.sample``
        checks the inputs and runs this in eval mode (no dropout); with guidance the
        conditional and null branches run as one batch of ``2B`` rows.
        """
        if request.options.get("use_cache", True):
            cfg = self.config
            k = cfg.kernel_size
            # A step's largest op: one vertical-row convolution (rows x w positions).
            flop = request.rows * request.grid[1] * cfg.channel * cfg.res_channel * k * k
            with decode_threads(request.options.get("threads", "auto"), flop, self.device):
                return sample_cached(self, request)
        b, (h, w) = request.batch, request.grid
        device = self.embed.weight.device
        if request.prefix is None:
            todo = torch.ones(b, h, w, dtype=torch.bool, device=device)
            codes = torch.zeros(b, h, w, dtype=torch.long, device=device)
        else:
            todo = request.prefix < 0
            # Placeholders read as code 0 until drawn; causality means nothing before them
            # ever sees them.
            codes = request.prefix.clamp(min=0)
        cond = self._condition_map(request.conds, (h, w), request.rows)
        for r in range(h):
            for c in range(w):
                if not todo[:, r, c].any():
                    continue
                x = request.expand(codes[:, : r + 1])  # [rows, r+1, w]: rows below r cannot matter
                # The head is 1x1, so only the position being drawn needs it.
                feat = self._features(x, cond)[:, :, r : r + 1, c : c + 1]  # [rows, C, 1, 1]
                codes[:, r, c] = request.pick(self.head(feat).flatten(1), r * w + c)  # [B]
        return codes

    # -- checks --------------------------------------------------------------------------------
    def check_grid(self, h: int, w: int) -> None:
        cfg = self.config
        if h < 1 or w < 1 or h > cfg.max_height or w > cfg.max_width:
            raise InputError(
                f"code grid ({h}, {w}) is outside this PixelSNAIL prior's range "
                f"(1..{cfg.max_height}, 1..{cfg.max_width}); Prior.sample draws a larger grid "
                "with the sliding window and window_log_prob scores it, or build the prior with "
                "larger max_height / max_width."
            )

    def check_conds(self, conds: Conds | None, batch: int | None = None) -> dict[str, Conditioning]:
        got = super().check_conds(conds, batch)
        for name, c in got.items():
            if c.num_tokens > 1 and c.grid is None:
                raise InputError(
                    f"condition {name!r} has {c.num_tokens} tokens but no grid; PixelSNAIL "
                    "takes several tokens only as a spatial map. Set Conditioning.grid=(hc, wc)."
                )
        return got
