"""Cached PixelSNAIL sampling: each position costs one position's work, not a cropped forward.

The uncached sampler runs the network over every row drawn so far for each new code (O(n) work
per code, O(n^2) per grid). But a causal network's activations at a position never change once
the codes before it are drawn, so they can be kept, as in Fast PixelCNN++ (Ramachandran et al.
2017, arXiv 1704.06001), and each step computes only what is new:

- every causal convolution keeps its (zero-padded) input map; a new position writes its input
  there and the convolution runs on the ``kh x kw`` patch that ends at it;
- the vertical stream at row ``r`` depends on rows ``< r`` only, so it is computed once per row
  for the whole row (a one-row strip through every vertical layer);
- each attention layer keeps its keys and values: position ``j``'s are computed once, right
  after code ``j`` is drawn (they read that code's embedding), and a step attends over them.

The arithmetic is the forward's, on smaller pieces; the draws equal the uncached sampler's for
the same generator (the kernels round differently, so in principle a draw that sits within
rounding of a boundary could differ; tests check equality on real draws).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.priors.base import SampleRequest

# The PixelSNAIL modules are typed ``Any`` here: pixelsnail.py imports this module to sample,
# and importing its classes back (even for type checking only) would make an import cycle.
PixelSNAILPrior = Any
CausalConv2d = Any
GatedResBlock = Any

__all__ = ["sample_cached"]


class _ConvCache:
    """A causal convolution's zero-padded input map ``[R, Cin, h + top, w + left + right]``,
    filled as positions are computed; outputs come from the patch ending at a position."""

    def __init__(self, conv: CausalConv2d, rows: int, grid: tuple[int, int], like: Tensor):
        left, right, top, _ = conv.pad
        self.weight, self.bias = conv.conv.weight, conv.conv.bias
        self.kh, self.kw = self.weight.shape[-2:]
        self.top, self.left = top, left
        cin = self.weight.shape[1]
        h, w = grid
        self.w = w
        self.buf = like.new_zeros(rows, cin, h + top, w + left + right)

    def write_row(self, r: int, x: Tensor) -> None:
        """Input row ``r``: ``x [R, Cin, 1, w]``."""
        self.buf[:, :, self.top + r, self.left : self.left + self.w] = x[:, :, 0]

    def write_at(self, r: int, c: int, x: Tensor) -> None:
        """Input at ``(r, c)``: ``x [R, Cin, 1, 1]``."""
        self.buf[:, :, self.top + r, self.left + c] = x[:, :, 0, 0]

    def row(self, r: int) -> Tensor:
        """Output row ``r`` ``[R, Cout, 1, w]`` (needs the input rows ``r - kh + 1 .. r``)."""
        return F.conv2d(self.buf[:, :, r : r + self.kh], self.weight, self.bias)

    def at(self, r: int, c: int) -> Tensor:
        """Output at ``(r, c)`` ``[R, Cout, 1, 1]`` (needs the inputs its kernel reads)."""
        return F.conv2d(self.buf[:, :, r : r + self.kh, c : c + self.kw], self.weight, self.bias)


class _GatedCache:
    """A ``GatedResBlock``'s two convolution caches and its condition term, precomputed."""

    def __init__(
        self,
        block: GatedResBlock,
        rows: int,
        grid: tuple[int, int],
        cond: Tensor | None,
        like: Tensor,
    ) -> None:
        self.block = block
        self.conv1 = _ConvCache(block.conv1, rows, grid, like)
        self.conv2 = _ConvCache(block.conv2, rows, grid, like)
        # [R, 2C, 1, 1] (class-like) or [R, 2C, h, w] (spatial), computed once, not per step.
        self.cond = block.cond(cond) if block.cond is not None and cond is not None else None

    def _gate(self, x: Tensor, out: Tensor, cond: Tensor | None) -> Tensor:
        if cond is not None:
            out = out + cond
        a, b = out.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)

    def row(self, r: int, x: Tensor) -> Tensor:
        """The block on row ``r`` of its input, ``x [R, C, 1, w]`` (no aux: vertical stream)."""
        self.conv1.write_row(r, F.elu(x))
        self.conv2.write_row(r, F.elu(self.conv1.row(r)))
        cond = self.cond
        if cond is not None and cond.shape[-2] > 1:
            cond = cond[:, :, r : r + 1]
        return self._gate(x, self.conv2.row(r), cond)

    def at(self, r: int, c: int, x: Tensor, aux: Tensor) -> Tensor:
        """The block at ``(r, c)``: ``x, aux [R, *, 1, 1]`` (horizontal stream)."""
        self.conv1.write_at(r, c, F.elu(x))
        out = self.conv1.at(r, c)
        if self.block.aux is not None:
            out = out + self.block.aux(F.elu(aux))
        self.conv2.write_at(r, c, F.elu(out))
        cond = self.cond
        if cond is not None and cond.shape[-2] > 1:
            cond = cond[:, :, r : r + 1, c : c + 1]
        return self._gate(x, self.conv2.at(r, c), cond)


def _pointwise(block: GatedResBlock, x: Tensor, aux: Tensor, cond: Tensor | None) -> Tensor:
    """A 1x1 ``GatedResBlock`` (the attention output block) at one position: its plain forward
    on ``[R, *, 1, 1]`` maps is exact (no padding, no neighbours)."""
    return block(x, aux=aux, cond=cond)


@torch.no_grad()
def sample_cached(prior: PixelSNAILPrior, request: SampleRequest) -> Tensor:
    """Draw codes ``[B, h, w]`` in raster order with cached activations (see the module doc)."""
    cfg = prior.config
    b, (h, w) = request.batch, request.grid
    rows = request.rows
    device = prior.embed.weight.device
    like = prior.embed.weight
    if request.prefix is None:
        codes = torch.zeros(b, h, w, dtype=torch.long, device=device)
        todo = [[True] * w for _ in range(h)]
    else:
        codes = request.prefix.clamp(min=0)
        todo = (request.prefix < 0).any(0).tolist()  # [h][w]: any row draws here (one sync)
    cond = prior._condition_map(request.conds, (h, w), rows)
    spatial = cond is not None and cond.shape[-2] > 1
    cond_at = cond  # the condition at one position, sliced per step when spatial
    bg = prior._background(h, w, device, like.dtype)[0]  # [2, h, w]
    grid = (h, w)
    blocks = list(prior.blocks)

    v_init = _ConvCache(prior.v_init, rows, grid, like)
    h_up = _ConvCache(prior.h_init_up, rows, grid, like)
    h_left = _ConvCache(prior.h_init_left, rows, grid, like)
    v_caches = [[_GatedCache(m, rows, grid, cond, like) for m in b.v_blocks] for b in blocks]
    h_caches = [[_GatedCache(m, rows, grid, cond, like) for m in b.h_blocks] for b in blocks]
    n = h * w
    keys: list[Tensor] = []
    values: list[Tensor] = []
    slot: list[int] = []  # block -> index into keys / values (-1: no attention)
    for blk in prior.blocks:
        slot.append(len(keys) if blk.attn is not None else -1)
        if blk.attn is not None:
            att = blk.attn
            # Slot 0: the learned start key/value; slot 1 + j: position j.
            k = like.new_zeros(rows, att.n_head, 1 + n, att.key.out_features // att.n_head)
            v = like.new_zeros(rows, att.n_head, 1 + n, att.value.out_features // att.n_head)
            k[:, :, 0] = att.start_key.view(att.n_head, -1)
            v[:, :, 0] = att.start_value.view(att.n_head, -1)
            keys.append(k)
            values.append(v)
    pre_attn: list[Tensor] = [like.new_empty(0)] * len(prior.blocks)
    zeros_row = like.new_zeros(rows, cfg.channel, 1, w)
    zeros_at = like.new_zeros(rows, cfg.channel, 1, 1)

    for r in range(h):
        # Vertical stream and the upward half of the horizontal start, for the whole row r:
        # both read rows < r only, all drawn by now. The down shift makes row 0 all zeros.
        vr = v_init.row(r - 1) if r else zeros_row  # [R, C, 1, w]
        up = h_up.row(r - 1) if r else zeros_row
        v_rows = []
        for caches in v_caches:
            per_block = []
            for gc in caches:
                vr = gc.row(r, vr)
                per_block.append(vr)
            v_rows.append(per_block)
        for c in range(w):
            i = r * w + c
            if spatial and cond is not None:
                cond_at = cond[:, :, r : r + 1, c : c + 1]
            bg_at = bg[:, r, c].expand(rows, 2)  # [R, 2]
            # The right shift makes column 0 of the leftward half all zeros.
            x = up[:, :, :, c : c + 1] + (h_left.at(r, c - 1) if c else zeros_at)  # [R,C,1,1]
            for bi, blk in enumerate(prior.blocks):
                for gc, v_row in zip(h_caches[bi], v_rows[bi]):
                    x = gc.at(r, c, x, v_row[:, :, :, c : c + 1])
                if blk.attn is not None:
                    att = blk.attn
                    pre_attn[bi] = x
                    q = att.query(torch.cat((x.flatten(1), bg_at), 1))  # [R, key_channel]
                    q = q.view(rows, att.n_head, 1, -1)
                    ki = slot[bi]
                    a = F.scaled_dot_product_attention(
                        q, keys[ki][:, :, : 1 + i], values[ki][:, :, : 1 + i]
                    )  # [R, nh, 1, dv]: every cached key is before i, so no mask
                    x = _pointwise(blk.attn_out, x, a.reshape(rows, -1, 1, 1), cond_at)
            if todo[r][c]:
                logits = prior.head(x).flatten(1)  # [R, K]
                codes[:, r, c] = request.pick(logits, i)  # [B]
            # Finish position i: its code's embedding enters the start convolutions' inputs
            # and every attention layer's key and value.
            e = prior.embed(request.expand(codes[:, r, c]))  # [R, C]
            xb = torch.cat((e, bg_at), 1)[:, :, None, None]  # [R, C + 2, 1, 1]
            for cache in (v_init, h_up, h_left):
                cache.write_at(r, c, xb)
            for bi, blk in enumerate(prior.blocks):
                if blk.attn is not None:
                    att, ki = blk.attn, slot[bi]
                    kv_in = torch.cat((pre_attn[bi].flatten(1), e, bg_at), 1)  # [R, 2C + 2]
                    keys[ki][:, :, 1 + i] = att.key(kv_in).view(rows, att.n_head, -1)
                    values[ki][:, :, 1 + i] = att.value(kv_in).view(rows, att.n_head, -1)
    return codes
