"""PSNR / SSIM, the Fréchet distance and its rFID hook, and codebook usage statistics."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from latentgen.errors import InputError, WeightsNotFoundError
from latentgen.metrics.codebook import CodebookUsage, code_counts, usage_stats
from latentgen.metrics.fid import (
    INCEPTION_FILE,
    GaussianStats,
    InceptionFeatures,
    fid_from_features,
    frechet_distance,
    rfid,
)
from latentgen.metrics.image import psnr, ssim

HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
HAVE_SCIPY = importlib.util.find_spec("scipy") is not None


def _images(seed: int, shape: tuple[int, ...] = (2, 3, 32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish images (SSIM on white noise is uninformative): blurred noise in [-1, 1].
    x = torch.rand(shape, generator=g) * 2 - 1
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x / x.abs().amax()


# --- PSNR / SSIM ------------------------------------------------------------------------------


def test_identical_images() -> None:
    x = _images(0)
    assert torch.isinf(psnr(x, x.clone())).all()
    assert torch.allclose(ssim(x, x.clone()), torch.ones(2), atol=1e-6)


def test_noisier_is_worse() -> None:
    x = _images(1)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    p = [psnr(x, x + s * noise) for s in (0.02, 0.1, 0.3)]
    s = [ssim(x, x + s * noise) for s in (0.02, 0.1, 0.3)]
    assert bool((p[0] > p[1]).all() and (p[1] > p[2]).all())
    assert bool((s[0] > s[1]).all() and (s[1] > s[2]).all())
    assert bool((s[0] <= 1).all())


def test_psnr_matches_definition() -> None:
    x = _images(3)
    y = x + 0.1
    # MSE is exactly 0.01 per image: 10 log10(4 / 0.01) = 26.02 dB.
    assert torch.allclose(psnr(x, y), torch.full((2,), 10 * math.log10(4 / 0.01)), atol=1e-3)
    assert torch.allclose(psnr(x, y, data_range=1.0), psnr(x, y) - 10 * math.log10(4), atol=1e-3)


def test_ssim_per_image_and_channel_average() -> None:
    x, y = _images(4), _images(5)
    both = ssim(x, y)
    assert torch.allclose(both, torch.cat([ssim(x[i : i + 1], y[i : i + 1]) for i in range(2)]))
    per_channel = torch.stack([ssim(x[:, c : c + 1], y[:, c : c + 1]) for c in range(3)])
    assert torch.allclose(both, per_channel.mean(0), atol=1e-6)


@pytest.mark.skipif(not HAVE_SKIMAGE, reason="needs scikit-image for the reference SSIM")
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels: int) -> None:
    from skimage.metrics import structural_similarity

    x = _images(6, (1, channels, 40, 33))
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))).clamp(-1, 1)
    a, b = x[0].permute(1, 2, 0).double().numpy(), y[0].permute(1, 2, 0).double().numpy()
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0)
    if channels == 1:
        ref = structural_similarity(a[..., 0], b[..., 0], **kw)
    else:
        ref = structural_similarity(a, b, channel_axis=2, **kw)
    assert float(ssim(x, y)[0]) == pytest.approx(ref, abs=1e-5)


def test_image_metric_errors() -> None:
    with pytest.raises(InputError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(InputError, match="at least 11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="float"):
        ssim(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), torch.zeros(1, 1, 16, 16))


# --- Fréchet distance -------------------------------------------------------------------------


def _spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_zero_and_symmetric() -> None:
    mu, s = np.arange(4.0), _spd(4, 0)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    mu2, s2 = mu + 1, _spd(4, 1)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu, s), rel=1e-9
    )


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = float(((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected)


@pytest.mark.skipif(not HAVE_SCIPY, reason="needs scipy for the reference sqrtm")
def test_frechet_distance_matches_scipy_sqrtm() -> None:
    from scipy import linalg

    s1, s2 = _spd(6, 2), _spd(6, 3)
    m1, m2 = np.zeros(6), np.full(6, 0.5)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-7)


def test_streaming_stats_equal_numpy() -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(loc=100.0, size=(50, 7))  # a large mean tests the shifted sums
    stats = GaussianStats()
    for chunk in np.array_split(feats, 4):
        stats.update(torch.from_numpy(chunk))
    assert stats.n == 50
    assert np.allclose(stats.mean, feats.mean(0))
    assert np.allclose(stats.cov, np.cov(feats, rowvar=False))


def test_fid_shifts_with_distribution() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 3)), rng.normal(size=(400, 3))
    near, far = fid_from_features(a, b), fid_from_features(a, b + 2.0)
    assert near < 0.2 and far == pytest.approx(12.0, rel=0.1)  # |shift|^2 = 3 * 2^2


def test_frechet_distance_shape_error() -> None:
    with pytest.raises(InputError, match=r"\[D\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_missing_names_file_and_source(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        InceptionFeatures.from_pretrained(cache_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "fid" / INCEPTION_FILE) in msg and "torchvision" in msg
    assert "https://" in msg


class _FakeInception(torch.nn.Module):
    """Stands in for the TorchScript Inception: per-channel mean and max of the raw pixels."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.cat([img.mean(dim=(2, 3)), img.amax(dim=(2, 3))], dim=1)


def test_inception_wrapper_feeds_0_255_pixels_and_rfid(tmp_path: Path) -> None:
    path = tmp_path / "fid" / INCEPTION_FILE
    path.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.x
        torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    ext = InceptionFeatures.from_pretrained(cache_dir=tmp_path)
    x = _images(8, (4, 1, 16, 16))
    feats = ext(x)  # grayscale is repeated to RGB
    assert feats.shape == (4, 6)
    pixels = ((x + 1) * 127.5).round()
    assert torch.allclose(feats[:, 0], pixels.mean(dim=(1, 2, 3)))
    assert torch.equal(feats[:, 3], pixels.amax(dim=(1, 2, 3)))

    batches = [_images(s, (8, 3, 16, 16)) for s in range(4)]
    same = rfid(((b, b) for b in batches), ext)
    worse = rfid(((b, (b * 0.5).clamp(-1, 1)) for b in batches), ext)
    assert same == pytest.approx(0.0, abs=1e-6) and worse > 100.0


# --- codebook usage ---------------------------------------------------------------------------


def test_codebook_usage_counts_exact() -> None:
    idx = torch.tensor([[0, 0, 1], [3, 3, 3]])
    assert code_counts(idx, 5).tolist() == [2, 1, 0, 3, 0]
    acc = CodebookUsage(5)
    acc.update(idx)
    acc.update(torch.tensor([4]))
    stats = acc.compute()
    assert stats["usage"] == pytest.approx(4 / 5) and stats["dead_codes"] == 1
    p = np.array([2, 1, 3, 1]) / 7
    assert stats["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_perplexity_bounds() -> None:
    assert usage_stats(torch.full((8,), 5))["perplexity"] == pytest.approx(8.0)
    assert usage_stats(torch.tensor([9, 0, 0]))["perplexity"] == pytest.approx(1.0)
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        code_counts(torch.tensor([4]), 4)
