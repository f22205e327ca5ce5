"""Convolutional encoder and decoder of VQ-VAE / VQGAN tokenizers.

The layout follows the autoencoder of "Taming Transformers for High-Resolution Image Synthesis"
(Esser, Rombach, Ommer 2021, https://arxiv.org/abs/2012.09841), itself derived from the DDPM
U-Net (https://arxiv.org/abs/2006.11239): ResNet blocks with GroupNorm and SiLU, strided-conv
downsampling, nearest-neighbour upsampling followed by a conv, and single-head self-attention at
chosen resolutions and in the middle.

Module and parameter names deliberately match taming-transformers'
``taming/modules/diffusionmodules/model.py`` (``conv_in``, ``down.{i}.block.{j}.norm1``,
``mid.attn_1.q``, ``up.{i}.upsample.conv``, ``norm_out``, ``conv_out`` ...), so the published
checkpoints load key for key (see ``latentgen.tokenizers.taming``). The code is our own and is
written for speed: attention goes through ``F.scaled_dot_product_attention`` with the three
projections in one matmul, upsampling + conv runs as one folded transposed convolution (2.25x
fewer FLOPs, same result), and residual sums are added in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentgen.errors import SpecError

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "group_norm",
]


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with ``gcd(num_groups, channels)`` groups (32 for wide layers).

    The published models use 32 groups everywhere; tiny test models with e.g. 16 or 8 channels
    cannot, so the group count falls back to the largest divisor of ``channels`` dividing
    ``num_groups``. eps=1e-6 as in the reference models (their checkpoints assume it).
    """
    return nn.GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-6, affine=True)


def _silu(x: Tensor) -> Tensor:
    """SiLU, in place when no gradient is recorded through ``x``.

    In place saves an activation-sized buffer at inference. Under autograd it would cost more
    than it saves: SiLU's backward needs its input, so autograd would copy it first.
    """
    return F.silu(x, inplace=not x.requires_grad)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, 1x1 conv shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        # nn.Identity when off: a Dropout(p=0) module still costs a call and a branch per block.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        # conv2's output is not needed by its own backward, so the residual can land in it.
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``h*w`` positions, with a residual connection.

    ``q``, ``k``, ``v`` and ``proj_out`` are 1x1 convolutions (the reference layout); the forward
    pass runs the three input projections as one matmul on ``[B, h*w, C]`` tokens and calls
    ``F.scaled_dot_product_attention`` (scale ``C**-0.5``), which picks a fused kernel.
    """

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)  # [3C, C]
        bias = torch.cat([cast(Tensor, m.bias) for m in (self.q, self.k, self.v)])  # [3C]
        qkv = F.linear(tokens, weight, bias)  # [B, h*w, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # 3 x [B, 1, h*w, C] (one head)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, h*w, C]
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # [B, h*w, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 stride-2 conv after padding right and bottom by one.

    The asymmetric (0, 1, 0, 1) padding keeps the reference models' pixel alignment; a
    symmetric ``padding=1`` conv would shift every output by one input pixel, and pretrained
    weights would no longer fit.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 conv (weights ``conv``).

    Computed as one stride-2 transposed convolution with a 4x4 kernel folded from the 3x3 one,
    which gives the same numbers (up to float rounding) with 4 instead of 9 multiply-adds per
    output pixel and without materialising the upsampled map. Why it is exact: after nearest
    upsampling, output row ``2m`` sees input rows ``m-1`` (tap 0) and ``m`` (taps 1+2), and row
    ``2m+1`` sees rows ``m`` (taps 0+1) and ``m+1`` (tap 2); the same holds for columns. The
    ``_fold`` matrix maps the 3 taps to the 4 transposed-conv offsets -1, 0, +1, +2.
    """

    _fold: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        fold = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
        self.register_buffer("_fold", fold, persistent=False)  # [4 offsets, 3 taps]

    def forward(self, x: Tensor) -> Tensor:
        fold = self._fold.to(self.conv.weight.dtype)
        # conv weight [out, in, 3, 3] -> transposed-conv weight [in, out, 4, 4].
        weight = torch.einsum("uk,vl,oikl->iouv", fold, fold, self.conv.weight)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks), ``attn`` (may be empty), a resampler."""

    # Set only on levels that resample, so the state-dict names match the reference exactly.
    downsample: nn.Module
    upsample: nn.Module

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: Tensor) -> Tensor:
        # The reference puts one attention block after each ResNet block of a level, or none.
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        elif hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class _Middle(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, num_groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _check_arch(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int) -> None:
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise SpecError(f"ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}.")
    if ch < 1 or num_res_blocks < 1:
        raise SpecError(
            f"ch and num_res_blocks must be >= 1, got ch={ch}, num_res_blocks={num_res_blocks}."
        )
    f = 2 ** (len(ch_mult) - 1)
    if resolution % f:
        raise SpecError(
            f"resolution {resolution} is not a multiple of the downsample factor {f} "
            f"(2**(len(ch_mult)-1) for ch_mult={list(ch_mult)}). Pick a resolution divisible "
            f"by {f}, e.g. {max(f, resolution // f * f)}."
        )


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> latents ``[B, z_channels, H/f, W/f]``, f = 2**(L-1).

    Args:
        ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: channel multiplier per resolution level; ``L = len(ch_mult)`` levels.
        num_res_blocks: ResNet blocks per level.
        attn_resolutions: feature-map sizes (relative to ``resolution``) that get attention.
        z_channels: latent channels (doubled when ``double_z``, for a Gaussian posterior).
        in_channels: image channels.
        resolution: the nominal input size that ``attn_resolutions`` refers to; any input whose
            sides are multiples of f runs, attention stays at the same levels.
        dropout: dropout rate inside the ResNet blocks.
        double_z: output ``2 * z_channels`` (mean and log-variance), as in the KL autoencoder.
        num_groups: GroupNorm groups (reduced for narrow layers, see ``group_norm``).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        in_channels: int,
        resolution: int,
        dropout: float = 0.0,
        double_z: bool = False,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks, resolution)
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)

        res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _Level(blocks, attns)
            if i != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)

        self.mid = _Middle(block_in, dropout, num_groups)
        self.norm_out = group_norm(block_in, num_groups)
        out = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> image ``[B, out_channels, h*f, w*f]``.

    Mirrors ``Encoder`` (same arguments) with ``num_res_blocks + 1`` ResNet blocks per level.
    No output squashing: like the reference, the output is unbounded and trained towards
    [-1, 1]. The last layer, ``conv_out``, is where VQGAN's adaptive GAN weight is measured.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        out_channels: int,
        resolution: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_arch(ch, ch_mult, num_res_blocks, resolution)
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Middle(block_in, dropout, num_groups)

        # Built from the lowest resolution up, but stored so that up[i] is level i, as in the
        # reference (its checkpoints name the 256x256 level up.0).
        levels: list[_Level] = []
        for i in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i]
            blocks: list[nn.Module] = []
            attns: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, num_groups))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))

        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final conv (``[out_channels, C, 3, 3]``), for the adaptive GAN weight."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_silu(self.norm_out(h)))
