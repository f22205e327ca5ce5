"""Linear layers with weights prepacked once for a decode loop's fixed batch (the ``prepack``
sampling option of the transformer prior).

A decode step multiplies a few rows (the batch) by every weight matrix. On CPU,
``F.linear`` goes to MKL's sgemm, which repacks the weight into its blocked layout on every call
and, on the shared 2-core AMD EPYC this was measured on, ran an 8-row step's matmuls at half the
speed of oneDNN with the weight packed once (s model, batch 8: 2.6 vs 1.25 ms for all of a
step's linears; m: 14.9 vs 10.4 ms). torch has no public API for a prepacked linear, only the
oneDNN ops its inductor compiler emits (``mkldnn::_reorder_linear_weight`` and
``mkldnn::_linear_pointwise``), so this module uses those and falls back to ``F.linear`` where
they are missing. In whole sampling runs the packed form was as fast or faster at one row too
(s: 2.8-3.0 vs 2.8-3.2 ms per step; m: 12-13.6 vs 13.6-15.4 ms, the weights streamed from
memory either way), so ``"auto"`` packs whenever it can.

The results equal ``F.linear``'s up to float rounding (another summation order), which is why
the option exists: ``prepack=False`` gives ``F.linear``'s exact numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from latentgen.errors import InputError

__all__ = ["Linear", "linear_fn", "prepack_available", "use_prepack"]

Linear = Callable[[Tensor], Tensor]


def prepack_available() -> bool:
    """Whether this torch build has the oneDNN ops for prepacked linears."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018  # resolving the op is the check
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def use_prepack(option: Any, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decode loop packs its weights, given the ``prepack`` option: ``"auto"`` or
    True, on CPU in float32 where the ops exist (elsewhere the plain path runs); False never."""
    if option is not True and option is not False and option != "auto":
        raise InputError(f"prepack must be 'auto', True or False, got {option!r}.")
    if option is False or device.type != "cpu" or dtype != torch.float32:
        return False
    return prepack_available()


def linear_fn(weight: Tensor, bias: Tensor | None, rows: int, packed: bool) -> Linear:
    """``x [rows, in] -> x W^T + b``: with the weight packed for ``rows`` rows (``packed``), else
    plain ``F.linear``. Pack again after the weights change (the packed copy does not follow)."""
    if not packed:
        return lambda x: F.linear(x, weight, bias)
    w = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    b = None if bias is None else bias.detach()
    op = torch.ops.mkldnn._linear_pointwise
    return lambda x: op(x, w, b, "none", [], "")
