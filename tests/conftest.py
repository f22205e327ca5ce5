import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/examples.py

# Keep CPU tests from fighting over the two cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _fresh_torch_seed():
    import torch

    torch.manual_seed(0)
    yield
