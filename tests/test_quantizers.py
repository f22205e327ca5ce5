"""Property checks of the stage-1 quantizers (vq, ema, gumbel, fsq)."""

from __future__ import annotations

import copy
import itertools
import math

import pydantic
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from latentgen.errors import InputError
from latentgen.tokenizers.quantizers.base import Quantizer
from latentgen.tokenizers.quantizers.fsq import FSQuantizer, FSQuantizerConfig
from latentgen.tokenizers.quantizers.gumbel import GumbelQuantizer, GumbelQuantizerConfig
from latentgen.tokenizers.quantizers.vq import (
    EMAQuantizer,
    EMAQuantizerConfig,
    VectorQuantizer,
    VectorQuantizerConfig,
)

CLASSES: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "ema": EMAQuantizer,
    "gumbel": GumbelQuantizer,
    "fsq": FSQuantizer,
}

FACTORIZED = dict(lookup_dim=4, l2_normalize=True, kmeans_init=True, dead_code_threshold=1.0,
                  dead_code_steps=2)  # fmt: skip
CONFIGS = {
    "vq": VectorQuantizerConfig(codebook_size=32, dim=8),
    "vq_factorized": VectorQuantizerConfig(codebook_size=32, dim=8, **FACTORIZED),
    "ema": EMAQuantizerConfig(codebook_size=32, dim=8, decay=0.9),
    "ema_factorized": EMAQuantizerConfig(codebook_size=32, dim=8, decay=0.9, **FACTORIZED),
    "gumbel": GumbelQuantizerConfig(codebook_size=32, dim=8, anneal_steps=10),
    "gumbel_hard": GumbelQuantizerConfig(
        codebook_size=32, dim=8, anneal_steps=10, straight_through=True
    ),
    "fsq": FSQuantizerConfig(levels=(4, 3, 2)),
    "fsq_projected": FSQuantizerConfig(levels=(8, 5, 5, 5), dim=8),
}
ALL = pytest.mark.parametrize("name", list(CONFIGS))
NEAREST = pytest.mark.parametrize("name", ["vq", "vq_factorized", "ema", "ema_factorized"])


def build(name: str, seed: int = 0) -> Quantizer:
    """The quantizer of CONFIGS[name], built from its config alone."""
    torch.manual_seed(seed)
    config = CONFIGS[name]
    return CLASSES[config.type](config)


def latents(q: Quantizer, b: int = 2, h: int = 4, w: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, q.dim, h, w, generator=g)


def clustered(n: int, d: int, clusters: int, seed: int, spread: float = 0.1) -> torch.Tensor:
    """``n`` points ``[n, d]`` around ``clusters`` random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(clusters, d, generator=g)
    return centres[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(
        n, d, generator=g
    )


def as_grid(x: torch.Tensor, h: int = 4) -> torch.Tensor:
    """``[n, D]`` -> ``[n // (h*h), D, h, h]`` latents."""
    d = x.shape[1]
    return x.view(-1, h, h, d).permute(0, 3, 1, 2).contiguous()


def lookup_space(q: VectorQuantizer | EMAQuantizer, z: torch.Tensor) -> torch.Tensor:
    """Recompute the encoder outputs in the lookup space with public modules: ``[B*h*w, d]``."""
    x = q.project_in(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    return F.normalize(x, dim=1) if q.config.l2_normalize else x


# -- contract --------------------------------------------------------------------------------------
@ALL
def test_contract_shapes_and_type_names(name: str) -> None:
    q = build(name)
    z = latents(q)
    out = q(z)
    assert out.z_q.shape == z.shape
    assert out.indices.shape == (2, 4, 5) and out.indices.dtype == torch.long
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.stats["perplexity"] >= 1.0
    assert type(q).type_name() == CONFIGS[name].type
    assert isinstance(q.Config(), type(CONFIGS[name]))  # defaults validate


@ALL
def test_straight_through_gradient_reaches_z(name: str) -> None:
    q = build(name)
    z = latents(q).requires_grad_()
    q(z).z_q.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_vq_straight_through_is_identity() -> None:
    q = build("vq")
    z = latents(q).requires_grad_()
    g = torch.randn_like(z)
    (q(z).z_q * g).sum().backward()
    assert torch.equal(z.grad, g)


def test_vq_loss_puts_beta_on_the_encoder_term() -> None:
    # The loss *value* is (1 + beta) * mse either way; only the gradients show where beta sits.
    beta = 0.1
    torch.manual_seed(0)
    q = VectorQuantizer(VectorQuantizerConfig(codebook_size=8, dim=4, commitment_beta=beta))
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    x = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)  # [18, 4]
    idx = out.indices.reshape(-1)
    e = q.codebook.detach()[idx]  # [18, 4]
    n = x.numel()
    torch.testing.assert_close(out.loss, (1 + beta) * (e - x).pow(2).sum() / n)
    out.loss.backward()
    grad_z = z.grad.permute(0, 2, 3, 1).reshape(-1, 4)
    # d/dz  beta * mean((z - sg e)^2) = 2 beta (z - e) / n
    torch.testing.assert_close(grad_z, 2 * beta * (x - e) / n)
    # d/de  mean((sg z - e)^2) = 2 (e - z) / n, summed over the vectors assigned to each code
    expected = torch.zeros_like(q.codebook).index_add_(0, idx, 2 * (e - x) / n)
    torch.testing.assert_close(q.codebook.grad, expected)


@NEAREST
def test_indices_are_the_nearest_codes(name: str) -> None:
    q = build(name).eval()  # eval: no k-means or EMA step, the codebook stays as set here
    with torch.no_grad():
        q.codebook.normal_()
    z = latents(q, b=4, h=6, w=6)
    out = q(z)
    with torch.no_grad():
        d = torch.cdist(lookup_space(q, z).double(), q.codes().double())  # [N, K] brute force
    chosen = d.gather(1, out.indices.reshape(-1, 1))[:, 0]
    assert torch.all(chosen <= d.min(dim=1).values + 1e-5)


@ALL
def test_embed_equals_z_q_in_eval(name: str) -> None:
    q = build(name)
    q(latents(q, seed=2))  # one training step first (k-means, EMA, schedule)
    q.eval()
    out = q(latents(q))
    assert torch.equal(q.embed(out.indices), out.z_q)


def test_gumbel_eval_is_argmax_of_logits() -> None:
    q = build("gumbel").eval()
    z = latents(q)
    out = q(z)
    assert torch.equal(out.indices, q.to_logits(z).argmax(dim=1))
    assert torch.equal(q(z).indices, out.indices)  # no noise in eval


# -- codebook learning -----------------------------------------------------------------------------
def test_ema_moves_codes_toward_assigned_means() -> None:
    decay, eps = 0.5, 1e-5
    torch.manual_seed(0)
    q = EMAQuantizer(EMAQuantizerConfig(codebook_size=8, dim=4, decay=decay, epsilon=eps))
    with torch.no_grad():
        q.codebook.normal_()
        q.ema_sum.copy_(q.codebook)
    old = q.codebook.clone()
    old_count, old_sum = q.ema_count.clone(), q.ema_sum.clone()
    z = 2 * torch.randn(2, 4, 4, 4)
    idx = q(z).indices.reshape(-1)
    x = z.permute(0, 2, 3, 1).reshape(-1, 4)
    counts = torch.bincount(idx, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, idx, x)
    used = counts > 0
    means = sums[used] / counts[used, None]
    assert used.sum() >= 2
    assert torch.all((q.codebook[used] - means).norm(dim=1) < (old[used] - means).norm(dim=1))
    # and exactly the VQ-VAE appendix A.1 update with Laplace smoothing
    n = decay * old_count + (1 - decay) * counts
    m = decay * old_sum + (1 - decay) * sums
    smoothed = (n + eps) / (n.sum() + 8 * eps) * n.sum()
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])
    torch.testing.assert_close(q.ema_count, n)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_dead_codes_are_restarted_from_batch_vectors(kind: str) -> None:
    cls, cfg_cls = (
        (VectorQuantizer, VectorQuantizerConfig)
        if kind == "vq"
        else (EMAQuantizer, EMAQuantizerConfig)
    )
    torch.manual_seed(0)
    q = cls(cfg_cls(codebook_size=16, dim=4, dead_code_threshold=1.0, dead_code_steps=2))
    with torch.no_grad():
        q.codebook.normal_()
    # All vectors near one point: a handful of codes is used, the others are dead.
    z1, z2 = (5 + 0.01 * torch.randn(2, 4, 4, 4) for _ in range(2))
    out1 = q(z1)
    before = q.codebook.detach().clone()
    out2 = q(z2)
    used = torch.cat([out1.indices.flatten(), out2.indices.flatten()]).unique()
    dead = torch.tensor([i for i in range(16) if i not in set(used.tolist())])
    assert len(dead) >= 8
    assert out1.stats.get("dead_code_restarts") is None  # window not over yet
    assert out2.stats["dead_code_restarts"] == len(dead)
    x2 = lookup_space(q, z2)
    # each restarted code is (bit for bit) one of the current batch's encoder outputs
    same = q.codebook.detach()[dead].unsqueeze(1) == x2.unsqueeze(0)  # [dead, N, d]
    assert same.all(dim=2).any(dim=1).all()
    if kind == "vq":  # live codes are left alone (no optimizer step here)
        assert torch.equal(q.codebook.detach()[used], before[used])


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_kmeans_init_beats_random_init(kind: str) -> None:
    cls, cfg_cls = (
        (VectorQuantizer, VectorQuantizerConfig)
        if kind == "vq"
        else (EMAQuantizer, EMAQuantizerConfig)
    )
    x = clustered(512, 8, clusters=16, seed=3)
    z = as_grid(x)  # [32, 8, 4, 4]

    def error(q: Quantizer) -> float:
        q.train()(z)  # first training step: k-means happens here if enabled
        out = q.eval()(z)
        return F.mse_loss(out.z_q, z).item()

    torch.manual_seed(0)
    default = cls(cfg_cls(codebook_size=16, dim=8))
    torch.manual_seed(0)
    rows = cls(cfg_cls(codebook_size=16, dim=8))
    with torch.no_grad():  # "random init" done well: random data points as codes
        rows.codebook.copy_(x[torch.randperm(512)[:16]])
        if kind == "ema":
            rows.ema_sum.copy_(rows.codebook)
    torch.manual_seed(0)
    km = cls(cfg_cls(codebook_size=16, dim=8, kmeans_init=True))
    e_km = error(km)
    assert e_km < error(rows) and e_km < error(default)
    assert bool(km.codebook_initialized)


# -- usage -----------------------------------------------------------------------------------------
@ALL
def test_usage_counts_are_exact_over_a_pass_and_reset(name: str) -> None:
    q = build(name)
    seen = []
    for i, mode in enumerate(["train", "train", "eval", "eval", "eval"]):
        q.train(mode == "train")
        seen.append(q(latents(q, b=3, seed=10 + i)).indices.flatten())
    expected = torch.bincount(torch.cat(seen), minlength=q.codebook_size)
    assert torch.equal(q.usage_counter.counts, expected)
    p = expected[expected > 0].double() / expected.sum()
    usage = q.usage()
    assert usage["usage"] == (expected > 0).sum().item() / q.codebook_size
    assert usage["dead_codes"] == q.codebook_size - (expected > 0).sum().item()
    assert math.isclose(usage["perplexity"], math.exp(-(p * p.log()).sum().item()), rel_tol=1e-9)
    q.reset_usage()
    assert q.usage_counter.counts.sum() == 0
    assert q.usage() == {"usage": 0.0, "perplexity": 0.0, "dead_codes": float(q.codebook_size)}
    last = q(latents(q, seed=99)).indices.flatten()
    assert torch.equal(q.usage_counter.counts, torch.bincount(last, minlength=q.codebook_size))


# -- gumbel ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("anneal", ["cosine", "linear", "exponential"])
def test_gumbel_temperature_schedule(anneal: str) -> None:
    q = GumbelQuantizer(
        GumbelQuantizerConfig(
            codebook_size=8, dim=4, tau_start=1.0, tau_end=0.0625, anneal_steps=4, anneal=anneal
        )
    )
    taus = [q.temperature(s) for s in range(7)]
    assert taus[0] == 1.0 and taus[4] == pytest.approx(0.0625) and taus[6] == taus[4]
    assert all(a > b for a, b in itertools.pairwise(taus[:5]))
    mid = {"cosine": (1 + 0.0625) / 2, "linear": (1 + 0.0625) / 2, "exponential": 0.25}[anneal]
    assert taus[2] == pytest.approx(mid)
    z = torch.randn(1, 4, 2, 2)
    used = [q(z).stats["temperature"] for _ in range(3)]  # training forwards advance the step
    assert used == taus[:3] and int(q.step) == 3
    q.eval()(z)
    assert int(q.step) == 3 and q.temperature() == taus[3]


# -- fsq -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3), (4, 4, 6), (7,)])
def test_fsq_every_index_round_trips(levels: tuple[int, ...]) -> None:
    q = FSQuantizer(FSQuantizerConfig(levels=levels)).eval()
    k = math.prod(levels)
    assert q.codebook_size == k
    idx = torch.arange(k).view(1, 1, k)
    emb = q.embed(idx)  # [1, n, 1, K]
    assert emb.abs().max() <= 1
    assert torch.equal(q.codes_to_indices(emb.permute(0, 2, 3, 1)), idx)
    assert len(torch.unique(emb.flatten(2), dim=2)[0].T) == k  # K distinct codes
    # with a projection the grid conversion round-trips just the same
    qp = FSQuantizer(FSQuantizerConfig(levels=levels, dim=5))
    assert torch.equal(qp.codes_to_indices(qp.indices_to_codes(idx)), idx)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 4, 6)])
def test_fsq_reaches_every_level_including_even_ones(levels: tuple[int, ...]) -> None:
    q = FSQuantizer(FSQuantizerConfig(levels=levels))
    z = 4 * torch.randn(64, len(levels), 8, 8)
    out = q(z)
    digits = (out.indices.flatten().unsqueeze(1) // q._basis) % q._levels  # [N, n]
    for i, L in enumerate(levels):
        assert digits[:, i].unique().tolist() == list(range(L))
    assert torch.equal(q.codes_to_indices(out.z_q.permute(0, 2, 3, 1)), out.indices)
    assert out.loss.item() == 0.0


# -- numerics --------------------------------------------------------------------------------------
def test_bf16_autocast_keeps_fp32_distances() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(VectorQuantizerConfig(codebook_size=512, dim=64)).eval()
    with torch.no_grad():
        q.codebook.normal_()
    z = torch.randn(4, 64, 8, 8).bfloat16().float()  # exactly representable in bf16
    ref = q(z).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        # what a lookup without the fp32 region would compute: these data are hard enough
        x = z.permute(0, 2, 3, 1).reshape(-1, 64)
        naive = ((q.codebook**2).sum(1) - 2 * x @ q.codebook.t()).argmin(1)
    assert not torch.equal(naive, ref.flatten())
    assert torch.equal(out.indices, ref)
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32


def test_bf16_autocast_keeps_ema_and_kmeans_in_fp32() -> None:
    cfg = EMAQuantizerConfig(codebook_size=64, dim=32, lookup_dim=16, kmeans_init=True)
    torch.manual_seed(0)
    plain = EMAQuantizer(cfg)
    auto = copy.deepcopy(plain)
    z = as_grid(clustered(256, 32, clusters=64, seed=5))
    for step in range(2):
        torch.manual_seed(step)
        plain(z)
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto(z)
    for name in ("codebook", "ema_sum", "ema_count"):
        assert getattr(auto, name).dtype == torch.float32
        assert torch.equal(getattr(auto, name), getattr(plain, name)), name


# -- state dict ------------------------------------------------------------------------------------
@ALL
def test_state_dict_round_trip_through_safetensors(name: str, tmp_path) -> None:
    q = build(name)
    for i in range(3):
        q(latents(q, seed=20 + i))
    path = tmp_path / "q.safetensors"
    save_file(q.state_dict(), str(path))
    fresh = build(name, seed=123)
    fresh.load_state_dict(load_file(str(path)))
    z = latents(q, seed=7)
    a, b = q.eval()(z), fresh.eval()(z)
    assert torch.equal(a.z_q, b.z_q) and torch.equal(a.indices, b.indices)
    assert torch.equal(a.loss, b.loss)
    # training continues identically: k-means is not re-run, the gumbel step is restored
    q.train(), fresh.train()
    torch.manual_seed(5)
    a = q(z)
    torch.manual_seed(5)
    b = fresh(z)
    assert torch.equal(a.z_q, b.z_q) and a.stats == b.stats


# -- errors ----------------------------------------------------------------------------------------
@ALL
def test_bad_input_raises_input_error(name: str) -> None:
    q = build(name)
    with pytest.raises(InputError, match=r"\[B, \d+, h, w\]"):
        q(torch.randn(2, q.dim + 1, 4, 4))
    with pytest.raises(InputError, match="codes must lie in"):
        q.embed(torch.full((1, 2, 2), q.codebook_size))
    with pytest.raises(InputError, match="integer codes"):
        q.embed(torch.zeros(1, 2, 2))


def test_configs_reject_bad_values() -> None:
    with pytest.raises(pydantic.ValidationError):
        FSQuantizerConfig(levels=(8, 1))
    with pytest.raises(pydantic.ValidationError):
        VectorQuantizerConfig(codebook_size=16, dim=4, commitment_beta=-1)
    with pytest.raises(pydantic.ValidationError):
        EMAQuantizerConfig(decay=1.0)
    with pytest.raises(pydantic.ValidationError):
        VectorQuantizerConfig(codebok_size=16)  # typo: extra fields are refused
