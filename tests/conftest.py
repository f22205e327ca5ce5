"""Suite-wide settings: a hermetic sandbox for every cache, fresh in-process weight caches."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/examples.py

# Keep CPU tests from fighting over the two cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Hermetic: whatever latentgen, torch or Hugging Face would read from or write to the user's
# home (converted LPIPS weights, torch hub checkpoints, dataset downloads) goes to one temp
# directory for this session, set before any test module imports latentgen. A populated
# ~/.cache/latentgen on the machine is then never seen, and never written.
SANDBOX = Path(tempfile.mkdtemp(prefix="latentgen-tests-"))
atexit.register(shutil.rmtree, SANDBOX, ignore_errors=True)
for _var, _sub in {
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "LATENTGEN_CACHE": "latentgen-cache",
    "TORCH_HOME": "torch",
    "HF_HOME": "huggingface",
}.items():
    (SANDBOX / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_var] = str(SANDBOX / _sub)


@pytest.fixture(autouse=True)
def _fresh_weight_caches():
    """Weights that one test loaded are not handed to the next from memory."""
    lpips = sys.modules.get("latentgen.metrics.lpips")
    if lpips is not None:
        lpips.LPIPS._weights_cache.clear()
    yield


@pytest.fixture(autouse=True)
def _fresh_torch_seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _subnormals_kept():
    """After a test that trained (the trainer flushes subnormal floats), the flag is off again."""
    import torch

    yield
    torch.set_flush_denormal(False)
