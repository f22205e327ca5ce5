"""Attention backends: every backend agrees with the explicit `math` reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from latentgen.errors import InputError, SpecError
from latentgen.priors.attention import (
    AttentionBackend,
    FlexAttention,
    FlexAttentionConfig,
    MathAttention,
    SDPAttention,
    SDPAttentionConfig,
    XFormersAttention,
    attend,
    causal_mask,
    get_backend,
    known_backends,
)

CUDA = torch.cuda.is_available()


def _qkv(b=2, h=3, tq=5, tk=5, dh=8, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, dh, generator=g)
    k = torch.randn(b, h, tk, dh, generator=g)
    v = torch.randn(b, h, tk, dh, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _masks(b, h, tq, tk, seed=1):
    """None, a bool mask broadcast over heads (every row keeps key 0), a float mask."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, 1, tq, tk, generator=g) > 0.4
    keep[..., 0] = True  # no fully masked rows: their result is undefined
    bias = torch.randn(b, h, tq, tk, generator=g)
    bias[..., -1] = float("-inf")
    return {"none": None, "bool": keep, "float": bias}


def _brute_force(q, k, v, causal, mask):
    """Attention one query at a time, straight from the definition."""
    b, h, tq, dh = q.shape
    tk = k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                scores = (k[bi, hi] @ q[bi, hi, i]) / math.sqrt(dh)  # [Tk]
                if mask is not None:
                    m = mask.expand(b, h, tq, tk)[bi, hi, i]
                    scores = (
                        scores.masked_fill(~m, -math.inf) if m.dtype == torch.bool else scores + m
                    )
                if causal:
                    scores[tk - tq + i + 1 :] = -math.inf  # aligned to the end of the keys
                out[bi, hi, i] = scores.softmax(-1) @ v[bi, hi]
    return out


CASES = [(5, 5), (3, 7), (1, 6)]  # (Tq, Tk): square, queries at the end of longer keys, decode


@pytest.mark.parametrize("tq,tk", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_math_matches_definition(tq, tk, causal, mask_kind):
    q, k, v = _qkv(tq=tq, tk=tk)
    mask = _masks(2, 3, tq, tk)[mask_kind]
    got = attend(q, k, v, causal=causal, mask=mask, backend="math")
    torch.testing.assert_close(got, _brute_force(q, k, v, causal, mask), atol=1e-5, rtol=1e-5)


CPU_BACKENDS = [
    "sdpa",
    "auto",
    SDPAttention(SDPAttentionConfig(kernel="math")),
    FlexAttention(FlexAttentionConfig(compile=False)),  # eager flex, called directly below
]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=["sdpa", "auto", "sdpa-math", "flex-eager"])
@pytest.mark.parametrize("tq,tk", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_cpu_backends_match_math(backend, tq, tk, causal, mask_kind):
    q, k, v = _qkv(tq=tq, tk=tk)
    mask = _masks(2, 3, tq, tk)[mask_kind]
    ref = attend(q, k, v, causal=causal, mask=mask, backend="math")
    if isinstance(backend, FlexAttention):
        # flex is CUDA-only through attend(); its masks are still checked on CPU in eager mode.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = backend.attend(q, k, v, causal=causal, mask=mask)
    else:
        got = attend(q, k, v, causal=causal, mask=mask, backend=backend)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math", "flex-window"])
@pytest.mark.parametrize("filled", [1, 6, 11])
def test_attend_one_equals_attend_with_one_query_on_a_cache_view(backend, filled):
    """The decode-step call: one query per row over the filled part of a longer cache."""
    impl = (
        FlexAttention(FlexAttentionConfig(compile=False, window=4))
        if backend == "flex-window"
        else get_backend(backend)
    )
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 3, 4, 11, 8, generator=g)  # [2, B, H, T_max, Dh]
    q = torch.randn(3, 4, 8, generator=g)  # [B, H, Dh]
    k, v = cache[0, :, :, :filled], cache[1, :, :, :filled]  # views, not contiguous
    got = impl.attend_one(q, k, v)
    want = impl.attend(q.unsqueeze(2), k.contiguous(), v.contiguous(), causal=True)[:, :, 0]
    assert got.shape == (3, 4, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if backend != "flex-window":
        ref = _brute_force(q.unsqueeze(2), k, v, causal=False, mask=None)[:, :, 0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flex_window_is_a_band_mask():
    q, k, v = _qkv(tq=4, tk=9)
    window = 3
    flex = FlexAttention(FlexAttentionConfig(window=window, compile=False))
    i = torch.arange(4)[:, None] + 5  # query positions at the end of the keys
    j = torch.arange(9)[None, :]
    band = (j <= i) & (i - j < window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex.attend(q, k, v, causal=True)
    ref = attend(q, k, v, mask=band, backend="math")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_causal_suffix_equals_full_causal_rows(backend):
    """What a KV cache relies on: the last Tq queries over all keys == those rows of full causal."""
    q, k, v = _qkv(tq=7, tk=7)
    full = attend(q, k, v, causal=True, backend=backend)
    suffix = attend(q[:, :, 4:], k, v, causal=True, backend=backend)
    torch.testing.assert_close(suffix, full[:, :, 4:], atol=1e-5, rtol=1e-5)
    # ... and it differs from the (wrong) top-left alignment, so the test can fail.
    top_left = attend(
        q[:, :, 4:], k, v, mask=torch.ones(3, 7, dtype=torch.bool).tril(), backend=backend
    )
    assert not torch.allclose(top_left, full[:, :, 4:], atol=1e-3)


def test_causal_mask_alignment():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_auto_picks_sdpa_on_cpu():
    assert isinstance(get_backend("auto", "cpu", torch.float32), SDPAttention)


def test_unknown_backend_lists_known_ones():
    q, k, v = _qkv()
    with pytest.raises(SpecError) as e:
        attend(q, k, v, backend="sdpaa")
    msg = str(e.value)
    assert "'sdpaa'" in msg and "math" in msg and "flex" in msg and "Did you mean 'sdpa'" in msg
    assert {"auto", "sdpa", "xformers", "flex", "math"} <= set(known_backends())


@pytest.mark.skipif(CUDA, reason="checks the CPU refusal")
@pytest.mark.parametrize("name", ["flex", "xformers"])
def test_unavailable_backend_is_refused(name):
    q, k, v = _qkv()
    with pytest.raises(SpecError, match=f"'{name}' is not available on cpu"):
        attend(q, k, v, backend=name)


def test_bad_shapes_raise_input_error():
    q, k, v = _qkv(tq=6, tk=4)
    with pytest.raises(InputError, match="more queries"):
        attend(q, k, v, causal=True)
    with pytest.raises(InputError, match=r"\[B, H, T, Dh\]"):
        attend(q[0], k[0], v[0])
    with pytest.raises(InputError, match="do not fit"):
        attend(q, k, v[..., :4])


def test_flex_refuses_dropout():
    q, k, v = _qkv()
    with pytest.raises(InputError, match="dropout"):
        FlexAttention(FlexAttentionConfig(compile=False)).attend(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("cls", [SDPAttention, MathAttention, FlexAttention, XFormersAttention])
def test_backends_build_from_their_config(cls):
    backend = cls(cls.Config())
    assert isinstance(backend, AttentionBackend)
    assert backend.type_name() == cls.Config().type
    assert backend.kind == "attention_backend"


# -- CUDA -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["sdpa", "flex", "xformers", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tq,tk", [(64, 64), (16, 80), (1, 80)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_cuda_backends_match_math(name, dtype, tq, tk, causal, mask_kind):
    try:
        backend = get_backend(name, "cuda", dtype)
    except SpecError as e:  # xformers not installed
        pytest.skip(str(e))
    q, k, v = _qkv(b=2, h=4, tq=tq, tk=tk, dh=64, dtype=dtype, device="cuda")
    mask = _masks(2, 4, tq, tk)[mask_kind]
    mask = None if mask is None else mask.cuda()
    ref = attend(q, k, v, causal=causal, mask=mask, backend="math")
    got = attend(q, k, v, causal=causal, mask=mask, backend=backend)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
