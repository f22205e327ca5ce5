"""Nearest-code vector quantizers: ``vq`` (codebook learned by gradient) and ``ema`` (codebook
learned by exponential moving averages), with the common fixes for codebook collapse as options.

- VQ-VAE, straight-through estimator and commitment loss: https://arxiv.org/abs/1711.00937
- EMA codebook updates: appendix A.1 of the same paper.
- Low-dimensional factorized, l2-normalised codes (ViT-VQGAN): https://arxiv.org/abs/2110.04627
- k-means init and dead-code restart, as in Jukebox (https://arxiv.org/abs/2005.00341) and
  SoundStream (https://arxiv.org/abs/2107.03312).

Both quantizers look codes up in a "lookup space" of ``lookup_dim`` channels (``dim`` unless
``lookup_dim`` is set): ``z [B, D, h, w] -> x [B*h*w, d]`` (a linear projection when
``lookup_dim`` is set, then unit length when ``l2_normalize``), find the nearest of ``K`` codes,
and map the code back to ``D`` channels. Losses are means over elements, not sums.

Skipped steps: every state change of a training forward (EMA sums and counts, k-means init,
dead-code counters and restarts, usage counts) is staged (``latentgen.staged_state``) and
applied by the trainer only when the step passes its NaN guard.

Distributed training: every statistic that moves the codebook (EMA sums and counts, k-means,
dead-code choices, usage counts) is reduced or broadcast across ranks, so each rank holds the same
codebook. Training forwards are therefore collectives: all ranks must call them in lockstep, as
DDP already requires.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from latentgen.specs import ComponentConfig
from latentgen.tokenizers.quantizers.base import Quantizer, QuantizerOutput
from latentgen.tokenizers.quantizers.common import (
    UsageCounter,
    all_reduce_sum_,
    broadcast_,
    check_indices,
    check_latents,
    draw_distinct,
    fp32_region,
    is_distributed,
    kmeans,
    nearest_codes,
    perplexity,
)
from latentgen.tokenizers.quantizers.reservoir import Reservoir

__all__ = ["EMAQuantizer", "EMAQuantizerConfig", "VectorQuantizer", "VectorQuantizerConfig"]


class _CodebookConfig(ComponentConfig):
    """Options shared by ``vq`` and ``ema``."""

    codebook_size: int = Field(
        1024, ge=2, description="Number of codes K (the tokenizer's vocabulary size)."
    )
    dim: int = Field(
        256, ge=1, description="Channels D of the encoder output this quantizer takes and returns."
    )
    lookup_dim: int | None = Field(
        None,
        ge=1,
        description="Factorized codes (ViT-VQGAN, arXiv 2110.04627): project D -> lookup_dim with "
        "a learned linear map, look the code up there, project back to D. None looks up in D.",
    )
    l2_normalize: bool = Field(
        False,
        description="Cosine lookup: l2-normalise latents and codes in the lookup space before "
        "comparing them (ViT-VQGAN, arXiv 2110.04627). Improves codebook usage.",
    )
    commitment_beta: float = Field(
        0.25,
        ge=0,
        description="beta of the commitment loss beta * ||z_e - sg[z_q]||^2, which pulls the "
        "encoder toward its codes (VQ-VAE, arXiv 1711.00937, eq. 3).",
    )
    kmeans_init: bool = Field(
        False,
        description="Initialise the codebook with k-means on the first training batch (all "
        "ranks' batches under torch.distributed), in fp32. Runs once; the flag is saved.",
    )
    kmeans_iters: int = Field(
        10, ge=1, le=1000, description="Lloyd iterations of the k-means init."
    )
    dead_code_threshold: float = Field(
        0.0,
        ge=0,
        description="A code chosen fewer than this many times (over all ranks) during the last "
        "`dead_code_steps` training steps is re-seeded with a random encoder output of the "
        "current batch. 0 turns restarts off; 1 restarts codes that were not used at all.",
    )
    dead_code_steps: int = Field(
        100,
        ge=1,
        description="Length in training steps of the window over which dead codes are counted; "
        "restarts are checked at the end of each window.",
    )
    reservoir_size: int = Field(
        0,
        ge=0,
        description="Rows of recent encoder outputs (lookup space, all ranks together) kept for "
        "k-means init and dead-code restarts, so a large codebook fills at any batch size. With "
        "a reservoir, k-means waits until it holds codebook_size rows (or is full) and restarts "
        "re-seed every dead code from distinct reservoir rows. 0: the current batch only. "
        "About 4 x codebook_size is a good size.",
    )

    @model_validator(mode="after")
    def _check_reservoir(self) -> _CodebookConfig:
        if self.reservoir_size and not (self.kmeans_init or self.dead_code_threshold > 0):
            raise ValueError(
                f"reservoir_size={self.reservoir_size} feeds k-means init and dead-code restarts, "
                "but both are off: set kmeans_init=true or dead_code_threshold > 0, or "
                "reservoir_size=0."
            )
        return self


class VectorQuantizerConfig(_CodebookConfig):
    """Config of ``VectorQuantizer`` (type ``vq``)."""

    type: Literal["vq"] = "vq"


class EMAQuantizerConfig(_CodebookConfig):
    """Config of ``EMAQuantizer`` (type ``ema``)."""

    type: Literal["ema"] = "ema"
    decay: float = Field(
        0.99,
        gt=0,
        lt=1,
        description="EMA decay gamma of the code counts and sums (VQ-VAE appendix A.1, "
        "arXiv 1711.00937); closer to 1 moves codes more slowly.",
    )
    epsilon: float = Field(
        1e-5,
        gt=0,
        description="Laplace smoothing of the EMA code counts, so a code with a zero count does "
        "not divide by zero.",
    )


class _NearestCodeQuantizer(Quantizer):
    """Lookup, straight-through estimator, init and restarts shared by ``vq`` and ``ema``.

    Subclasses store the codebook ``[K, lookup_dim]`` as ``self.codebook`` and implement
    ``_write_codes`` (how rows are overwritten) and ``_update`` (what a training step changes).
    Training-time writes go through ``stage`` and reads through ``staged``/``current``.
    """

    codebook: Tensor
    codebook_initialized: Tensor
    window_counts: Tensor
    window_step: Tensor

    def __init__(self, config: _CodebookConfig) -> None:
        super().__init__(config)
        self.config: _CodebookConfig = config
        d = config.lookup_dim or config.dim
        self.lookup_dim = d
        if config.lookup_dim is not None:
            self.project_in: nn.Module = nn.Linear(config.dim, d)
            self.project_out: nn.Module = nn.Linear(d, config.dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        # Saved: a loaded checkpoint must not re-run k-means (or the first-step broadcast).
        self.register_buffer("codebook_initialized", torch.tensor(False))
        self.usage_counter = UsageCounter(config.codebook_size)
        self.reservoir = Reservoir(config.reservoir_size, d) if config.reservoir_size else None
        if config.dead_code_threshold > 0:
            # Saved, so a resumed run restarts the same codes as an uninterrupted one would.
            self.register_buffer(
                "window_counts", torch.zeros(config.codebook_size, dtype=torch.long)
            )
            self.register_buffer("window_step", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _initial_codebook(k: int, d: int) -> Tensor:
        # Uniform in [-1/K, 1/K] as in the VQ-VAE and taming reference code. This tiny init is
        # what lets a plain codebook collapse; k-means init and restarts are the remedies.
        return torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)

    # -- Quantizer contract ---------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.codebook_size

    @property
    def dim(self) -> int:
        """Channels D of the latents."""
        return self.config.dim

    def codes(self) -> Tensor:
        """The effective codebook in the lookup space ``[K, lookup_dim]`` (unit rows if l2)."""
        cb = self.current("codebook").float()
        return F.normalize(cb, dim=1) if self.config.l2_normalize else cb

    def embed(self, indices: Tensor) -> Tensor:
        """codes ``[B, h, w]`` -> latents ``[B, D, h, w]`` (equal to ``forward``'s z_q in eval)."""
        check_indices(indices, self.codebook_size, type(self).__name__)
        b, h, w = indices.shape
        with fp32_region(self.codebook):
            q = F.embedding(indices.reshape(-1).long(), self.codes())  # [B*h*w, d]
            return self._from_lookup(q, b, h, w)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``[B, D, h, w]`` -> nearest codes; the whole computation is fp32 even under autocast."""
        check_latents(z, self.dim, type(self).__name__)
        b, _, h, w = z.shape
        with fp32_region(z):
            x = self._to_lookup(z.float())  # [B*h*w, d]
            if self.training and self.reservoir is not None:
                self.reservoir.add(x.detach())
            if self.training and not bool(self.staged("codebook_initialized")):
                self._initialise(x.detach())
            codes = self.codes()  # [K, d]
            indices = nearest_codes(x.detach(), codes.detach())  # [B*h*w]
            counts = self.usage_counter.update(indices, reduce=self.training)  # [K]
            q = F.embedding(indices, codes)  # [B*h*w, d]; gradient reaches the codebook
            loss = self._loss(x, q)
            # Straight-through: value sg[q] (bit-exactly, since x - sg[x] == 0), gradient of x.
            # The codebook gets no reconstruction gradient, only the codebook loss, as in VQ-VAE.
            x_st = q.detach() + (x - x.detach())
            z_q = self._from_lookup(x_st, b, h, w)  # [B, D, h, w]
            stats = {"perplexity": perplexity(counts)}
            if self.training:
                stats.update(self._update(x.detach(), indices, counts))
        return QuantizerOutput(z_q=z_q, indices=indices.view(b, h, w), loss=loss, stats=stats)

    # -- pieces -----------------------------------------------------------------------------------
    def _to_lookup(self, z: Tensor) -> Tensor:
        x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [B*h*w, D]
        x = self.project_in(x)  # [B*h*w, d]
        return F.normalize(x, dim=1) if self.config.l2_normalize else x

    def _from_lookup(self, x: Tensor, b: int, h: int, w: int) -> Tensor:
        out = self.project_out(x)  # [B*h*w, D]
        return out.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]

    def _loss(self, x: Tensor, q: Tensor) -> Tensor:
        raise NotImplementedError

    def _write_codes(self, rows: Tensor, vectors: Tensor) -> None:
        raise NotImplementedError

    def _sync_initial_state(self) -> None:
        """Broadcast rank 0's codebook state (used when there is no k-means init)."""
        self.stage("codebook", broadcast_(self.staged("codebook").clone()))

    @torch.no_grad()
    def _initialise(self, x: Tensor) -> None:
        """First training step: k-means (on all ranks' data) or adopt rank 0's random codebook."""
        if self.config.kmeans_init:
            shared = False
            if self.reservoir is not None:
                # Wait for K points (or a full reservoir): k-means on fewer rows than centroids
                # leaves the surplus centroids as duplicates. The length agrees on all ranks.
                if len(self.reservoir) < min(self.codebook_size, self.reservoir.capacity):
                    return
                x, shared = self.reservoir.contents(), True
            centroids, counts = kmeans(
                x,
                self.codebook_size,
                self.config.kmeans_iters,
                spherical=self.config.l2_normalize,
                shared=shared,
            )
            self._set_codebook(centroids, counts)
        elif is_distributed():
            self._sync_initial_state()
        self.stage("codebook_initialized", torch.ones_like(self.codebook_initialized))

    def _set_codebook(self, centroids: Tensor, counts: Tensor) -> None:
        self.stage("codebook", centroids)

    @torch.no_grad()
    def _update(self, x: Tensor, indices: Tensor, counts: Tensor) -> dict[str, float]:
        """Training-step bookkeeping after the lookup; returns extra stats."""
        return self._restart_dead_codes(x, counts)

    @torch.no_grad()
    def _restart_dead_codes(self, x: Tensor, counts: Tensor) -> dict[str, float]:
        """Re-seed codes chosen fewer than ``dead_code_threshold`` times in the last window."""
        if self.config.dead_code_threshold <= 0:
            return {}
        window = self.staged("window_counts") + counts  # counts are summed over ranks already
        step = self.staged("window_step") + 1
        if int(step) < self.config.dead_code_steps:
            self.stage("window_counts", window)
            self.stage("window_step", step)
            return {}
        dead = (window.float() < self.config.dead_code_threshold).nonzero()[:, 0]
        self.stage("window_counts", torch.zeros_like(window))
        self.stage("window_step", torch.zeros_like(step))
        restarted = 0
        if dead.numel():
            # Distinct rows, picked on rank 0 and broadcast: every rank writes the same rows.
            # With fewer distinct rows than dead codes, the rest wait for the next window.
            pool = x if self.reservoir is None else self.reservoir.contents()
            rows = draw_distinct(pool, dead.numel())  # [m, d], m <= dead codes
            restarted = rows.shape[0]
            if restarted:
                self._write_codes(dead[:restarted], rows)
        return {"dead_code_restarts": float(restarted)}


def _with_rows(t: Tensor, rows: Tensor, values: Tensor | float) -> Tensor:
    """A copy of ``t`` with ``t[rows] = values`` (the staged value must not alias the buffer)."""
    out = t.clone()
    out[rows] = values if isinstance(values, float) else values.to(t.dtype)
    return out


class VectorQuantizer(_NearestCodeQuantizer):
    """VQ-VAE quantizer with a codebook trained by gradient descent (type ``vq``).

    Loss = ||sg[z_e] - z_q||² + β ||z_e - sg[z_q]||² (arXiv 1711.00937, eq. 3): the first term
    moves codes toward encoder outputs, the second (the commitment loss, weighted by β) keeps the
    encoder near its codes. Options: factorized low-dimensional and l2-normalised codes
    (arXiv 2110.04627), k-means init and dead-code restarts, all documented on
    ``VectorQuantizerConfig``.

    Args:
        config: a ``VectorQuantizerConfig``.
    """

    Config: ClassVar[type[ComponentConfig]] = VectorQuantizerConfig

    def __init__(self, config: VectorQuantizerConfig) -> None:
        super().__init__(config)
        self.codebook = nn.Parameter(self._initial_codebook(config.codebook_size, self.lookup_dim))

    def _loss(self, x: Tensor, q: Tensor) -> Tensor:
        # β weighs the ENCODER (commitment) term, as in the paper. The taming-transformers
        # VectorQuantizer2 with legacy=True puts β on the codebook term instead, which with
        # β=0.25 slows the codebook down rather than the encoder.
        codebook_loss = F.mse_loss(q, x.detach())
        commitment = F.mse_loss(x, q.detach())
        return codebook_loss + self.config.commitment_beta * commitment

    def _write_codes(self, rows: Tensor, vectors: Tensor) -> None:
        # Optimizer state (e.g. Adam moments) of these rows is kept; it fades within a few steps.
        self.stage("codebook", _with_rows(self.staged("codebook"), rows, vectors))


class EMAQuantizer(_NearestCodeQuantizer):
    """VQ-VAE quantizer whose codebook follows exponential moving averages (type ``ema``).

    Each training step, with n_i the number of vectors assigned to code i and s_i their sum
    (both summed over ranks): N_i <- γ N_i + (1-γ) n_i, m_i <- γ m_i + (1-γ) s_i, and
    e_i = m_i / Ñ_i with Laplace-smoothed Ñ_i = (N_i + ε) / (Σ N + K ε) · Σ N
    (arXiv 1711.00937, appendix A.1). The codebook gets no gradient, so the only loss is
    β ||z_e - sg[z_q]||². ``ema_count``, ``ema_sum`` and ``codebook`` are buffers, saved in the
    state_dict. With ``l2_normalize`` the averages are of unit vectors and codes are re-normalised
    at lookup.

    Args:
        config: an ``EMAQuantizerConfig``.
    """

    Config: ClassVar[type[ComponentConfig]] = EMAQuantizerConfig
    ema_count: Tensor
    ema_sum: Tensor

    def __init__(self, config: EMAQuantizerConfig) -> None:
        super().__init__(config)
        self.config: EMAQuantizerConfig = config
        init = self._initial_codebook(config.codebook_size, self.lookup_dim)
        self.register_buffer("codebook", init)
        # One pseudo-observation per code: an unused code then stays where it is instead of
        # decaying toward the origin.
        self.register_buffer("ema_count", torch.ones(config.codebook_size))
        self.register_buffer("ema_sum", init.clone())

    def _loss(self, x: Tensor, q: Tensor) -> Tensor:
        return self.config.commitment_beta * F.mse_loss(x, q.detach())

    def _sync_initial_state(self) -> None:
        for name in ("codebook", "ema_count", "ema_sum"):
            self.stage(name, broadcast_(self.staged(name).clone()))

    def _set_codebook(self, centroids: Tensor, counts: Tensor) -> None:
        n = counts.clamp_min(1.0)  # a centroid with no points would otherwise average to zero
        self.stage("codebook", centroids)
        self.stage("ema_count", n)
        self.stage("ema_sum", centroids * n.unsqueeze(1))

    def _write_codes(self, rows: Tensor, vectors: Tensor) -> None:
        self.stage("codebook", _with_rows(self.staged("codebook"), rows, vectors))
        self.stage("ema_sum", _with_rows(self.staged("ema_sum"), rows, vectors))
        self.stage("ema_count", _with_rows(self.staged("ema_count"), rows, 1.0))

    @torch.no_grad()
    def _update(self, x: Tensor, indices: Tensor, counts: Tensor) -> dict[str, float]:
        cfg = self.config
        k, d = self.codebook.shape
        sums = all_reduce_sum_(x.new_zeros(k, d).index_add_(0, indices, x))  # [K, d] over ranks
        # Out of place, then staged: the trainer applies them only if the step is not skipped.
        keep, new = cfg.decay, 1 - cfg.decay
        ema_count = self.staged("ema_count").mul(keep).add_(counts.float(), alpha=new)  # [K]
        ema_sum = self.staged("ema_sum").mul(keep).add_(sums, alpha=new)  # [K, d]
        total = ema_count.sum()
        smoothed = (ema_count + cfg.epsilon) / (total + k * cfg.epsilon) * total  # [K]
        self.stage("ema_count", ema_count)
        self.stage("ema_sum", ema_sum)
        self.stage("codebook", ema_sum / smoothed.unsqueeze(1))
        return self._restart_dead_codes(x, counts)
