"""Pixel-level reconstruction metrics for images in [-1, 1]: PSNR and SSIM.

SSIM follows Wang et al., "Image Quality Assessment: From Error Visibility to Structural
Similarity" (IEEE TIP 2004, https://ieeexplore.ieee.org/document/1284395): an 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) statistics, computed per
channel over the positions where the whole window fits, then averaged over channels and space.
That is what ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.errors import InputError

__all__ = ["psnr", "ssim"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(
            f"{name} takes two torch tensors, got {type(x).__name__} and {type(y).__name__}."
        )
    if x.shape != y.shape:
        raise InputError(
            f"{name} compares images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.ndim != 4:
        raise InputError(f"{name} expects images [B, C, H, W], got shape {tuple(x.shape)}.")
    if not x.is_floating_point() or not y.is_floating_point():
        raise InputError(
            f"{name} expects float images in [-1, 1], got dtypes {x.dtype} and {y.dtype}; "
            f"convert uint8 images with x / 127.5 - 1."
        )


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image [B]; ``inf`` where the images are identical.

    ``data_range`` is max - min of the pixel scale: 2 for [-1, 1] images, 255 for uint8 values.
    """
    _check_pair(x, y, "psnr")
    if data_range <= 0:
        raise InputError(f"psnr data_range must be > 0, got {data_range}; use 2.0 for [-1, 1].")
    # float64 keeps the MSE of near-identical images from rounding to 0 (a false inf).
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)  # [B]
    return (10.0 * torch.log10(data_range**2 / mse)).to(x.dtype)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity per image [B] for [B, C, H, W] images (1.0 when identical).

    Gaussian window 11 / sigma 1.5, standard constants, averaged over channels; H and W must
    be at least 11.
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[2], x.shape[3]) < SSIM_WINDOW:
        raise InputError(
            f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its Gaussian "
            f"window), got {x.shape[2]}x{x.shape[3]}."
        )
    if data_range <= 0:
        raise InputError(f"ssim data_range must be > 0, got {data_range}; use 2.0 for [-1, 1].")
    b, c = x.shape[:2]
    xd, yd = x.double(), y.double()
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, xd.dtype, xd.device)
    # Separable depthwise filtering of the five moments at once: [B, 5C, H, W] -> valid region.
    stack = torch.cat([xd, yd, xd * xd, yd * yd, xd * yd], dim=1)  # [B, 5C, H, W]
    n = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    mu_x, mu_y, exx, eyy, exy = stack.split(c, dim=1)  # each [B, C, H-10, W-10]
    var_x, var_y = exx - mu_x**2, eyy - mu_y**2
    cov = exy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    # Mean over space then channels == mean over both, since every channel has the same size.
    return smap.reshape(b, -1).mean(dim=1).to(x.dtype)
