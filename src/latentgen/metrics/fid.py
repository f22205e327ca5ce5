"""Fréchet Inception Distance (FID) and reconstruction FID (rFID).

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", https://arxiv.org/abs/1706.08500. FID fits a Gaussian to Inception-v3 pool
features of each image set and reports the Fréchet distance between the two Gaussians:
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. rFID (used by VQGAN papers) compares the
dataset's images with their reconstructions.

Why no FID package: pytorch-fid, clean-fid and torch-fidelity all import torchvision at import
time (and torch-fidelity loads its weights with a full pickle), so none of them runs in a
torchvision-free install. The distance itself is implemented here (numpy, eigen-decomposition),
and the features come from a feature extractor the user supplies: either any callable mapping
images [B, 3, H, W] in [-1, 1] to [B, D], or :class:`InceptionFeatures`, which wraps the
TorchScript Inception-v3 that StyleGAN2-ADA and clean-fid use (``inception-2015-12-05.pt``, the
TF-FID graph ported to PyTorch) from a local file. Nothing is downloaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from latentgen.errors import CheckpointError, InputError, WeightsNotFoundError
from latentgen.metrics.lpips import resolve_cache_dir

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "GaussianStats",
    "InceptionFeatures",
    "fid_from_features",
    "frechet_distance",
    "rfid",
]

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)

FeatureExtractor = Callable[[Tensor], Tensor]


def _as_float64(a: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1), N(mu2, sigma2); mu [D], sigma [D, D]."""
    m1, m2 = _as_float64(mu1), _as_float64(mu2)
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InputError(
            f"frechet_distance needs means [D] and covariances [D, D] of one D, got "
            f"{m1.shape}, {s1.shape}, {m2.shape}, {s2.shape}."
        )
    for name, a in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise InputError(f"frechet_distance: {name} has NaN or inf entries.")
    # tr((S1 S2)^(1/2)) = tr((A)^(1/2)) with A = S1^(1/2) S2 S1^(1/2), which is symmetric PSD:
    # its eigenvalues are real and >= 0, so no complex sqrtm (and no eps retry) is needed.
    r1 = _sqrt_psd(s1)
    a = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((a + a.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical inputs


class GaussianStats:
    """Streaming mean and covariance of feature vectors (float64), for FID over many batches."""

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features: np.ndarray | Tensor) -> None:
        """Add features [N, D]."""
        f = _as_float64(features)
        if f.ndim != 2 or (self._sum is not None and f.shape[1] != self._sum.shape[0]):
            want = "[N, D]" if self._sum is None else f"[N, {self._sum.shape[0]}]"
            raise InputError(f"GaussianStats.update expects features {want}, got {f.shape}.")
        if self._shift is None:
            # Sums of features minus a fixed shift avoid the cancellation of E[x^2] - E[x]^2
            # when features have a large mean.
            self._shift = f.mean(axis=0)
            self._sum = np.zeros(f.shape[1])
            self._outer = np.zeros((f.shape[1], f.shape[1]))
        assert self._sum is not None and self._outer is not None
        c = f - self._shift  # [N, D]
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c  # [D, D]
        self.n += f.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """Mean [D]."""
        self._need(1)
        assert self._sum is not None and self._shift is not None
        return self._shift + self._sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D] (ddof=1, as ``np.cov`` and the reference FID code)."""
        self._need(2)
        assert self._sum is not None and self._outer is not None
        m = self._sum / self.n
        return (self._outer - self.n * np.outer(m, m)) / (self.n - 1)

    def _need(self, k: int) -> None:
        if self.n < k:
            raise InputError(
                f"GaussianStats holds {self.n} feature vectors; at least {k} are needed (FID "
                f"is only meaningful with thousands)."
            )


def fid_from_features(real: np.ndarray | Tensor, fake: np.ndarray | Tensor) -> float:
    """FID between two feature sets [N, D] and [M, D]."""
    a, b = GaussianStats(), GaussianStats()
    a.update(real)
    b.update(fake)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


class InceptionFeatures(nn.Module):
    """2048-d pool features of the TF-FID Inception-v3, from NVIDIA's TorchScript port.

    The file is ``inception-2015-12-05.pt`` (StyleGAN2-ADA, https://arxiv.org/abs/2006.06676;
    also what clean-fid uses). It resizes to 299x299 itself and expects pixel values in
    [0, 255]; this wrapper maps [-1, 1] images there and rounds to integers, as if the images
    had been saved as 8-bit PNGs, which is how reference FID numbers are computed.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(_missing_inception_message(path))
        try:
            with warnings.catch_warnings():
                # NVIDIA ships this model only as TorchScript; recent torch marks jit as
                # deprecated but still loads it, and the warning would repeat on every load.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a TorchScript Inception model ({type(e).__name__}: {e}); use "
                f"{INCEPTION_FILE} from {INCEPTION_URL}."
            ) from e
        self.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, cache_dir: str | Path | None = None
    ) -> InceptionFeatures:
        """Load ``path``, else ``<cache>/fid/inception-2015-12-05.pt``; never downloads."""
        if path is None:
            path = resolve_cache_dir(cache_dir) / "fid" / INCEPTION_FILE
        return cls(path)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Features [B, 2048] of images [B, C, H, W] in [-1, 1], C in {1, 3}."""
        return self.net(self._pixels(x), return_features=True).reshape(x.shape[0], -1)  # [B, 2048]

    @torch.no_grad()
    def class_probs(self, x: Tensor) -> Tensor:
        """ImageNet class probabilities [B, 1008] of images in [-1, 1], for the Inception Score.

        ``no_output_bias`` matches the original TF Inception Score code, as StyleGAN2-ADA does.
        """
        return self.net(self._pixels(x), no_output_bias=True).reshape(x.shape[0], -1)

    @staticmethod
    def _pixels(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise InputError(
                f"InceptionFeatures expects images [B, C, H, W] with C = 1 or 3, got shape "
                f"{tuple(x.shape)}."
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # [B, 3, H, W] in {0..255}


def _missing_inception_message(path: Path) -> str:
    return (
        f"FID needs Inception-v3 weights and {path} does not exist. latentgen ships no "
        f"Inception code or weights (pytorch-fid, clean-fid and torch-fidelity all require "
        f"torchvision). Download the TorchScript file {INCEPTION_URL} yourself and either put "
        f"it at {path} or pass its path (InceptionFeatures.from_pretrained(path=...)); or pass "
        f"your own feature extractor (a callable images [B, 3, H, W] in [-1, 1] -> [B, D]) to "
        f"rfid()."
    )


def rfid(pairs: Iterable[tuple[Tensor, Tensor]], extractor: FeatureExtractor) -> float:
    """Reconstruction FID over batches of (real images, reconstructions), both in [-1, 1]."""
    real, recon = GaussianStats(), GaussianStats()
    for x, x_rec in pairs:
        if x.shape != x_rec.shape:
            raise InputError(
                f"rfid: a real batch {tuple(x.shape)} and its reconstruction "
                f"{tuple(x_rec.shape)} differ in shape."
            )
        with torch.no_grad():
            real.update(extractor(x))
            recon.update(extractor(x_rec))
    return frechet_distance(real.mean, real.cov, recon.mean, recon.cov)
