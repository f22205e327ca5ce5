"""Attention backends behind one function: ``attend(q, k, v, causal, mask)`` on ``[B, H, T, Dh]``.

Every backend computes the same thing, ``softmax(q k^T / sqrt(Dh) + mask) v``; they differ in the
kernel. ``sdpa`` is torch's fused ``scaled_dot_product_attention`` (flash / memory-efficient /
cuDNN kernels on CUDA, a fused kernel on CPU), ``xformers`` is ``memory_efficient_attention`` when
xformers is installed and the tensors are on CUDA, ``flex`` is torch's ``flex_attention`` with a
block mask (causal and sliding-window patterns that skip whole blocks), and ``math`` is the
explicit reference every other backend is tested against.

Conventions shared by all backends:

- ``causal=True`` with ``Tq < Tk`` aligns the mask to the *end*: the queries are the last ``Tq``
  positions of the key sequence, so query ``i`` sees keys ``0 .. (Tk - Tq) + i``. This is what a
  KV cache needs (new queries at the end of a longer cached key sequence).
- ``mask`` broadcasts to ``[B, H, Tq, Tk]``; a bool mask is True where a query may attend, a float
  mask is added to the scores (``-inf`` removes a key). It combines with ``causal``.
- A query row that can see no key at all is undefined (backends disagree: NaN or zeros).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from latentgen.components import Component
from latentgen.errors import InputError, SpecError
from latentgen.specs import ComponentConfig

__all__ = [
    "AttentionBackend",
    "FlexAttention",
    "FlexAttentionConfig",
    "MathAttention",
    "MathAttentionConfig",
    "SDPAttention",
    "SDPAttentionConfig",
    "XFormersAttention",
    "XFormersAttentionConfig",
    "attend",
    "causal_mask",
    "get_backend",
    "known_backends",
]


class AttentionBackend(Component, ABC):
    """One way of computing attention; subclasses set ``Config`` and implement ``attend``.

    Backends are stateless apart from caches (compiled kernels, block masks), so a model builds
    one instance from its config and every layer shares it.
    """

    kind: ClassVar[str] = "attention_backend"

    def __init__(self, config: ComponentConfig) -> None:
        self.config = config

    @abstractmethod
    def is_available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend can run on ``device`` with tensors of ``dtype`` here."""

    @abstractmethod
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = False,
        mask: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        """``q [B, H, Tq, Dh]``, ``k, v [B, H, Tk, Dh]`` -> ``[B, H, Tq, Dh]``."""

    def attend_one(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Decode step: one query per row, ``q [B, H, Dh]``, over every key of ``k, v
        [B, H, Tk, Dh]`` (the query is the last position) -> ``[B, H, Dh]``.

        The default is ``attend`` with ``Tq = 1``; a backend overrides it where one query can go
        a cheaper way than its general kernel."""
        return self.attend(q.unsqueeze(2), k, v, causal=True).squeeze(2)


# -- helpers shared by the backends ------------------------------------------------------------
def causal_mask(tq: int, tk: int, device: torch.device | str | None = None) -> Tensor:
    """Bool ``[Tq, Tk]``, True where query ``i`` may see key ``j``: ``j <= (Tk - Tq) + i``."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(
            f"attention takes q, k, v of shape [B, H, T, Dh], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}."
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise InputError(
            f"attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}; k and v must match and share B, H and Dh with q."
        )
    if causal and q.shape[2] > k.shape[2]:
        raise InputError(
            f"causal attention with more queries ({q.shape[2]}) than keys ({k.shape[2]}): the "
            "first queries would see nothing. Queries are aligned to the end of the keys."
        )


def _merged_mask(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None) -> Tensor | None:
    """One mask for kernels that take either ``is_causal`` or a mask, not both.

    Returns None when nothing is masked (including causal with a single query, which sees every
    cached key: the KV-cache decode step never pays for a mask).
    """
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq > 1:
        cm = causal_mask(tq, tk, q.device)  # [Tq, Tk]
        if mask is None:
            return cm
        if mask.dtype == torch.bool:
            return mask & cm
        return mask.to(q.dtype).masked_fill(~cm, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        return mask.to(q.dtype)
    return mask


# -- math: the reference -----------------------------------------------------------------------
class MathAttentionConfig(ComponentConfig):
    """Explicit ``softmax(q k^T / sqrt(Dh)) v``: slow, exact, the reference for every backend."""

    type: Literal["math"] = "math"


class MathAttention(AttentionBackend):
    """Reference attention written out op by op (Vaswani et al. 2017, arXiv 1706.03762).

    Scores are computed in float32 whatever the input dtype, so it also serves as the accuracy
    reference for half-precision kernels.
    """

    Config = MathAttentionConfig

    def __init__(self, config: MathAttentionConfig) -> None:
        super().__init__(config)

    def is_available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = False,
        mask: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # [B, H, Tq, Tk]
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.float()
        if causal:
            cm = causal_mask(q.shape[2], k.shape[2], q.device)
            scores = scores.masked_fill(~cm, float("-inf"))
        att = scores.softmax(-1)
        if dropout_p > 0:
            att = F.dropout(att, dropout_p)
        return (att @ v.float()).to(q.dtype)  # [B, H, Tq, Dh]


def _attend_one_bmm(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` for one query per row: ``q [B, H, Dh]``, ``k, v
    [B, H, Tk, Dh]`` (views into a KV cache are fine) -> ``[B, H, Dh]``."""
    b, h, dh = q.shape
    tk = k.shape[2]
    q1 = (q * (1.0 / math.sqrt(dh))).reshape(b * h, 1, dh)
    att = torch.bmm(q1, k.reshape(b * h, tk, dh).transpose(1, 2)).softmax(-1)  # [B*H, 1, Tk]
    return torch.bmm(att, v.reshape(b * h, tk, dh)).view(b, h, dh)


# -- sdpa: torch's fused kernels ---------------------------------------------------------------
class SDPAttentionConfig(ComponentConfig):
    """torch ``scaled_dot_product_attention``; torch picks the kernel unless ``kernel`` is set."""

    type: Literal["sdpa"] = "sdpa"
    kernel: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto",
        description="Force one SDPA kernel (flash: arXiv 2205.14135, efficient: arXiv "
        "2112.05682) instead of letting torch choose; 'auto' lets torch choose per call.",
    )


class SDPAttention(AttentionBackend):
    """``torch.nn.functional.scaled_dot_product_attention``: the default on every device.

    On CUDA it dispatches to FlashAttention (arXiv 2205.14135), the memory-efficient kernel
    (arXiv 2112.05682) or cuDNN; on CPU to a fused flash-style kernel.
    """

    Config = SDPAttentionConfig

    def __init__(self, config: SDPAttentionConfig) -> None:
        super().__init__(config)
        self._kernel: Any = None
        if config.kernel != "auto":
            from torch.nn.attention import SDPBackend

            self._kernel = {
                "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION,
                "math": SDPBackend.MATH,
            }[config.kernel]

    def is_available(self, device: torch.device, dtype: torch.dtype) -> bool:
        kernel = self.config.kernel
        if kernel in ("auto", "math"):
            return True
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        if kernel == "flash":
            return dtype in (torch.float16, torch.bfloat16)
        return True

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = False,
        mask: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        tq, tk = q.shape[2], k.shape[2]
        if causal and mask is None and tq == tk:
            # The kernels' own causal flag aligns to the top left; it agrees with ours (aligned
            # to the end) only when Tq == Tk, and it lets flash skip the upper triangle.
            m, is_causal = None, True
        else:
            m, is_causal = _merged_mask(q, k, causal, mask), False
        if self._kernel is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal
            )
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self._kernel):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal
            )

    def attend_one(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self._kernel is not None or q.device.type != "cpu":
            return super().attend_one(q, k, v)
        # On CPU the fused kernel costs far more than the arithmetic for one query (thread
        # dispatch, blocking for long sequences): two batched matmuls and a softmax are cheaper.
        return _attend_one_bmm(q, k, v)


# -- xformers ----------------------------------------------------------------------------------
def _xformers_ops() -> Any:
    try:
        import xformers.ops as xops  # optional dependency: pip install latentgen[cuda]
    except Exception:  # ImportError, or a build that fails to load its CUDA extension
        return None
    return xops


class XFormersAttentionConfig(ComponentConfig):
    """xformers ``memory_efficient_attention`` (CUDA only; needs ``pip install xformers``)."""

    type: Literal["xformers"] = "xformers"


class XFormersAttention(AttentionBackend):
    """xformers' memory-efficient attention (Rabe & Staats, arXiv 2112.05682) on CUDA.

    xformers works on ``[B, T, H, Dh]``; we transpose in and out. An end-aligned causal mask is
    xformers' ``LowerTriangularFromBottomRightMask``; a user mask becomes an additive bias.
    """

    Config = XFormersAttentionConfig

    def __init__(self, config: XFormersAttentionConfig) -> None:
        super().__init__(config)

    def is_available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            device.type == "cuda"
            and torch.cuda.is_available()
            and dtype in (torch.float16, torch.bfloat16, torch.float32)
            and _xformers_ops() is not None
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = False,
        mask: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        xops = _xformers_ops()
        if xops is None:
            raise SpecError(
                "attention backend 'xformers' needs the xformers package: pip install xformers "
                "(or latentgen[cuda]), or use backend 'sdpa'."
            )
        b, h, tq, _ = q.shape
        tk = k.shape[2]
        bias: Any = None
        if mask is None:
            if causal and tq > 1:
                from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

                bias = LowerTriangularFromBottomRightMask()
        else:
            m = _merged_mask(q, k, causal, mask)
            assert m is not None
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~m, float("-inf")
                )
            # xformers wants a [B, H, Tq, Tk] bias whose last dim is stored padded to a multiple
            # of 8; allocate padded storage and slice it back to Tk.
            pad = (tk + 7) // 8 * 8
            storage = torch.zeros(b, h, tq, pad, dtype=q.dtype, device=q.device)
            bias = storage[..., :tk]
            bias.copy_(m.expand(b, h, tq, tk))
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        )  # [B, Tq, H, Dh]
        return out.transpose(1, 2)


# -- flex --------------------------------------------------------------------------------------
class FlexAttentionConfig(ComponentConfig):
    """torch ``flex_attention`` with a block mask (CUDA); can add a sliding-window band."""

    type: Literal["flex"] = "flex"
    window: int | None = Field(
        None,
        ge=1,
        description="Sliding-window band: a query sees only the `window` most recent keys "
        "(itself included), as in Longformer's local attention (arXiv 2004.05150). None: no band.",
    )
    compile: bool = Field(
        True,
        description="torch.compile flex_attention on CUDA (eager flex is a slow reference).",
    )
    mask_cache_size: int = Field(
        32, ge=1, description="How many block masks (one per shape and pattern) to keep."
    )


class FlexAttention(AttentionBackend):
    """``torch.nn.attention.flex_attention`` driven by a block mask (PyTorch >= 2.5).

    The block mask lets the kernel skip whole tiles that the causal or sliding-window pattern
    removes, so a narrow window costs ``O(T * window)``. Block masks for the pattern are cached
    per shape; a user ``mask`` is applied through ``mask_mod`` (bool) or ``score_mod`` (float).
    Attention dropout is not supported.
    """

    Config = FlexAttentionConfig

    def __init__(self, config: FlexAttentionConfig) -> None:
        super().__init__(config)
        self._masks: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._compiled: Callable[..., Tensor] | None = None

    def is_available(self, device: torch.device, dtype: torch.dtype) -> bool:
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        try:
            from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
        except ImportError:
            return False
        return True

    def _kernel(self, device: torch.device) -> Callable[..., Tensor]:
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda" or not self.config.compile:
            return flex_attention
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool = False,
        mask: Tensor | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        from torch.nn.attention.flex_attention import create_block_mask

        if dropout_p > 0:
            raise InputError(
                f"attention backend 'flex' has no attention dropout (got dropout_p={dropout_p}); "
                "set the model's attention dropout to 0 or use backend 'sdpa' for training."
            )
        b, h, tq, _ = q.shape
        tk = k.shape[2]
        offset = tk - tq  # queries sit at the end of the key sequence
        window = self.config.window
        bool_mask = (
            mask.expand(b, h, tq, tk) if mask is not None and mask.dtype == torch.bool else None
        )
        bias = (
            mask.expand(b, h, tq, tk).to(q.dtype)
            if mask is not None and bool_mask is None
            else None
        )

        def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            keep = qi >= 0  # all True, with the index tensors' shape
            if causal:
                keep = keep & (qi + offset >= ki)
            if window is not None:
                keep = keep & (qi + offset - ki < window)
            if bool_mask is not None:
                keep = keep & bool_mask[bi, hi, qi, ki]
            return keep

        block_mask = None
        if causal or window is not None or bool_mask is not None:
            if bool_mask is None:
                key = (tq, tk, causal, window, q.device)
                block_mask = self._masks.get(key)
                if block_mask is None:
                    block_mask = create_block_mask(mask_mod, None, None, tq, tk, device=q.device)
                    self._masks[key] = block_mask
                    if len(self._masks) > self.config.mask_cache_size:
                        self._masks.popitem(last=False)
                else:
                    self._masks.move_to_end(key)
            else:  # a data-dependent mask is never reused: build it per call
                block_mask = create_block_mask(mask_mod, b, h, tq, tk, device=q.device)
        score_mod = None
        if bias is not None:

            def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
                return score + bias[bi, hi, qi, ki]

        out = self._kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask)
        return out  # [B, H, Tq, Dh]


# -- lookup and the module-level function ------------------------------------------------------
# The registry is the one table of backends (built-ins register through the same hook as
# plugins). A backend instance holds its own caches (block masks, compiled kernels), so a model
# builds its backend once and keeps it.

#: What ``auto`` tries, fastest first. SDPA already dispatches to flash / memory-efficient
#: kernels on CUDA, so xformers only wins where SDPA cannot run (e.g. an old torch build).
_AUTO_ORDER = ("sdpa", "xformers", "math")


def known_backends() -> list[str]:
    """Names ``attend`` accepts: ``auto`` plus every registered backend."""
    from latentgen import registry

    return ["auto", *registry.list("attention_backend")]


def _build(spec: str | ComponentConfig) -> AttentionBackend:
    """The backend a name (default options) or a backend config describes."""
    import difflib

    from latentgen import registry
    from latentgen.errors import UnknownComponentError

    name = spec if isinstance(spec, str) else spec.type
    config = {"type": spec} if isinstance(spec, str) else spec
    try:
        backend = registry.build("attention_backend", config)
    except UnknownComponentError:
        known = known_backends()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"unknown attention backend {name!r}. Known backends: {', '.join(known)}.{hint}"
        ) from None
    if not isinstance(backend, AttentionBackend):  # the registry checks the base class
        raise SpecError(f"attention backend {name!r} built a {type(backend).__name__}.")
    return backend


def get_backend(
    spec: str | ComponentConfig | AttentionBackend,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    check: bool = True,
) -> AttentionBackend:
    """The backend for ``spec``: a registered name, a backend config (with its options) or an
    instance; ``auto`` is the fastest that works on ``device`` / ``dtype``.

    Raises ``SpecError`` for an unknown name (listing the known ones) or, with ``check``, a
    backend that cannot run on this device / dtype.
    """
    device = torch.device(device)
    if isinstance(spec, str) and spec == "auto":
        for cand in _AUTO_ORDER:
            backend = _build(cand)
            if backend.is_available(device, dtype):
                return backend
        raise SpecError(f"no attention backend of {_AUTO_ORDER} runs on {device.type}.")
    backend = spec if isinstance(spec, AttentionBackend) else _build(spec)
    if check and not backend.is_available(device, dtype):
        name = backend.type_name()
        raise SpecError(
            f"attention backend {name!r} is not available on {device.type} with {dtype}. "
            f"Use 'auto' (picks the fastest that works here) or one of "
            f"{', '.join(n for n in known_backends() if n != name)}."
            + (" flex and xformers need a CUDA GPU." if device.type != "cuda" else "")
        )
    return backend


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    mask: Tensor | None = None,
    backend: str | ComponentConfig | AttentionBackend = "auto",
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention of ``q [B, H, Tq, Dh]`` over ``k, v [B, H, Tk, Dh]`` -> ``[B, H, Tq, Dh]``.

    ``causal`` aligns the mask to the end of the keys (query ``i`` sees keys up to
    ``Tk - Tq + i``); ``mask`` (bool: True = attend, float: added to the scores) broadcasts to
    ``[B, H, Tq, Tk]``. ``backend`` is a name from ``known_backends()``, a backend config, or
    an instance (which keeps its caches between calls; a name builds a fresh backend).
    """
    _check_shapes(q, k, v, causal)
    impl = get_backend(backend, q.device, q.dtype)
    return impl.attend(q, k, v, causal=causal, mask=mask, dropout_p=dropout_p)
