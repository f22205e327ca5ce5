"""Masked bidirectional transformer prior: MaskGIT / absorbing-state discrete diffusion on codes.

A bidirectional transformer reads the code grid with some codes replaced by a mask token and
predicts every masked code at once (MaskGIT, Chang et al., arXiv 2202.04200). Conditions are
prefix tokens exactly as the GPT prior takes them (``latentgen.priors.transformer``): the same
``ConditionSlot``s, each condition with its own embedding table, positions and learned null
embedding, condition dropout and classifier-free guidance through ``Prior``. The blocks are the
GPT prior's own (``_Block`` with ``causal=False``), not a copy.

- **Training** masks a fraction ``gamma(u)``, ``u ~ U(0, 1)``, of each grid's codes, where
  ``gamma`` is the mask schedule (``cosine`` by default, as in MaskGIT), and minimises the
  cross-entropy of the masked codes (label-smoothed if ``label_smoothing`` > 0, as MaskGIT
  trains). The B grids of a batch draw ``u`` stratified, one from each of B equal slices.
- **Sampling** starts from all-masked (or from a ``prefix`` whose -1 entries are free, so any
  region can be completed) and runs T passes (``SamplerConfig.steps``, default the config's
  ``steps`` = 12). Each pass draws every masked code (temperature / top-k / top-p / guidance,
  seeded generator), keeps the most confident ones and re-masks the rest so that a fraction
  ``gamma((t + 1) / T)`` of the free codes stays masked; the confidence is the drawn code's
  log-probability plus Gumbel noise annealed to zero over the passes (MaskGIT's choice
  temperature).
- **Refinement** (``SamplerConfig.refine_steps`` = K, 0 by default): after the T passes, K
  passes that score every drawn code by the prior's own probability of it given the rest,
  re-mask the least likely and draw them again (Token-Critic's re-masking, arXiv 2209.04439,
  with the prior as the critic). Two of them lift the class accuracy of shapes samples from
  64% to 75% (docs/priors.md).
- **Local convolution** (``local_conv``, off by default): a depthwise k x k convolution of the
  code grid added before every block, so a masked code reads its neighbours without having to
  learn where they are (the positional convolution of CPVT, arXiv 2102.10882). With the label
  also added at every code (``placement: both``) it lifts the class accuracy of shapes samples
  from 48% to 61% at equal steps (docs/priors.md).
- **Self-conditioning** (``self_condition``, off by default; Chen et al., arXiv 2208.04202):
  each masked code's input also gets the model's own last prediction for it, its probabilities
  through a learned projection (zero at first). A sampling pass gets the previous pass's; half
  the training steps run a first pass without gradients to make one, and ``log_prob`` always
  runs the two passes, so its bound is of the model that samples.
- **Likelihood**: ``log_prob`` is a lower bound (ELBO) of the log-likelihood in nats: the
  absorbing-state diffusion bound (Austin et al., arXiv 2107.03006; Bond-Taylor et al., arXiv
  2111.12701), here in its discrete-time, any-order form (Hoogeboom et al., arXiv 2110.02037)

      -log p(x) <= sum_{m=1..N} E_{|S|=m} [ (1/m) sum_{i in S} -log p(x_i | x outside S) ]

  estimated with ``elbo_samples`` mask draws, stratified over m and seeded by ``elbo_seed``
  (the same draws for every grid, so a grid's bound does not depend on its batch). ``-log_prob``
  is therefore an upper bound on the NLL and sits above an autoregressive prior's exact NLL for
  an equally good model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from latentgen.conditioners.base import Conditioning
from latentgen.errors import InputError
from latentgen.priors.aligned import (
    aligned_embedding,
    aligned_names,
    prefix_names,
    prefix_tokens,
)
from latentgen.priors.attention import AttentionBackend, get_backend
from latentgen.priors.base import ConditionSlot, Conds, Prior, PriorConfig, SampleRequest
from latentgen.priors.sampling import filter_logits, guide
from latentgen.priors.transformer import (
    AttentionSpec,
    AttnDropout,
    EmbdDropout,
    NEmbd,
    NHead,
    NLayer,
    ResidDropout,
    _Block,
    init_gpt_weights,
)

__all__ = ["MASK_SCHEDULES", "MaskedPrior", "MaskedPriorConfig", "mask_ratio"]


#: Mask schedules ``gamma: [0, 1] -> [0, 1]``, decreasing from 1 (all masked) to 0: the masked
#: fraction at training time ``gamma(u)`` and after sampling pass t of T ``gamma((t + 1) / T)``.
MASK_SCHEDULES: dict[str, Callable[[Tensor], Tensor]] = {
    "cosine": lambda r: torch.cos(r * (math.pi / 2)),  # MaskGIT's default
    "linear": lambda r: 1 - r,
    "square": lambda r: 1 - r**2,  # convex: more codes per pass early
    "sqrt": lambda r: 1 - r.sqrt(),  # concave: more codes per pass late
}


def mask_ratio(schedule: str, r: Tensor) -> Tensor:
    """The masked fraction ``gamma(r)`` of the named schedule at ``r`` in [0, 1]."""
    try:
        fn = MASK_SCHEDULES[schedule]
    except KeyError:
        raise InputError(
            f"unknown mask schedule {schedule!r}; use one of {', '.join(MASK_SCHEDULES)}."
        ) from None
    return fn(r.clamp(0, 1)).clamp(0, 1)


class MaskedPriorConfig(PriorConfig):
    """Config of the masked prior (MaskGIT, arXiv 2202.04200; absorbing diffusion, 2111.12701)."""

    type: Literal["masked"] = "masked"
    vocab_size: int = Field(1024, ge=2, description="Number of codes K (the tokenizer's codebook).")
    block_size: int = Field(
        256,
        ge=1,
        description="Code positions the model has (h*w of the largest grid it reads; positions "
        "are raster order). There is no sliding window: a larger grid is an error.",
    )
    n_layer: NLayer = 8
    n_head: NHead = 8
    n_embd: NEmbd = 512
    embd_dropout: EmbdDropout = 0.0
    attn_dropout: AttnDropout = 0.0
    resid_dropout: ResidDropout = 0.0
    bias: bool = Field(True, description="Biases in the linear layers and LayerNorms.")
    layer_norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    attention: AttentionSpec = Field(
        "auto",
        description="Attention backend, as for the transformer prior: 'auto', a backend name, "
        "or a backend config with its options.",
    )
    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="Conditions by name (vocab_size, num_tokens each); their prefixes come in "
        "this order, as in the transformer prior. Empty: unconditional.",
    )
    mask_schedule: str = Field(
        "cosine",
        description="Mask schedule gamma, used for the training mask ratio gamma(u), u ~ U(0,1), "
        "and for how many codes stay masked after each sampling pass: "
        + ", ".join(MASK_SCHEDULES)
        + " (MaskGIT finds cosine best).",
    )
    steps: int = Field(
        12,
        ge=1,
        description="Default number of sampling passes T (SamplerConfig.steps overrides it). "
        "MaskGIT uses 8-12 for 16x16 grids.",
    )
    choice_temperature: float = Field(
        4.5,
        ge=0,
        description="Scale of the Gumbel noise added to the confidences that pick which drawn "
        "codes are kept, annealed linearly to 0 over the passes (MaskGIT's value: 4.5). "
        "0: keep the most likely codes.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Label smoothing of the training cross-entropy (MaskGIT trains with 0.1). "
        "Training only: the ELBO and eval loss are unsmoothed.",
    )
    local_conv: int = Field(
        0,
        ge=0,
        description="Side k of a depthwise k x k convolution over the code grid, added as a "
        "residual before every block (odd; 0: none; 3 in the shipped shapes configs). It hands "
        "a masked code its neighbours' content at once, where attention over learned positions "
        "has to learn where the neighbours are (docs/priors.md, 'Local convolution').",
    )
    self_condition: bool = Field(
        False,
        description="Self-conditioning: a masked code's input also gets the model's own "
        "previous prediction for it (its probabilities through a learned projection): the "
        "previous pass's when sampling; in training, half the steps run a first pass without "
        "gradients for it (about 12% more time a step). docs/priors.md measures it.",
    )
    elbo_samples: int = Field(
        16,
        ge=1,
        description="Mask draws per log_prob call for the ELBO estimate (one forward pass each).",
    )
    elbo_seed: int = Field(0, description="Seed of log_prob's mask draws (fixed: deterministic).")

    @field_validator("mask_schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        if value not in MASK_SCHEDULES:
            raise ValueError(
                f"unknown mask_schedule {value!r}; use one of {', '.join(MASK_SCHEDULES)}."
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> MaskedPriorConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a width "
                f"that is a multiple of the head count, e.g. {self.n_head * 64}."
            )
        if self.local_conv % 2 == 0 and self.local_conv:
            raise ValueError(
                f"local_conv={self.local_conv} is even: the convolution is centred on each "
                f"code, so give an odd kernel side ({self.local_conv + 1}, or 3), or 0 for none."
            )
        if self.steps > self.block_size:
            raise ValueError(
                f"steps={self.steps} is more than the block_size={self.block_size} codes: each "
                f"pass fills at least one code; use steps <= {self.block_size}."
            )
        return self


class MaskedPrior(Prior):
    """Bidirectional transformer over the code grid with a mask token (arXiv 2202.04200).

    Args:
        config: a ``MaskedPriorConfig``; nothing else is needed to rebuild the model.

    ``loss`` in training mode is MaskGIT's objective (cross-entropy of the codes masked at a
    ratio drawn from the schedule); outside training it is ``-log_prob / codes``, the ELBO per
    code, like every prior's mean NLL. ``log_prob`` is a bound, not the exact likelihood (see
    the module docstring); ``log_prob_is_bound`` says so to ``eval prior`` and ``compare``.
    """

    Config = MaskedPriorConfig
    log_prob_is_bound = True
    decodes_in_passes = True
    placements = frozenset({"prefix", "aligned", "both"})

    def __init__(self, config: MaskedPriorConfig) -> None:
        super().__init__(config)
        cfg = config
        c = cfg.n_embd
        in_prefix = prefix_names(cfg.conditions)
        self.n_ctx = sum(cfg.conditions[n].prefix_tokens for n in in_prefix)  # prefix length
        self.mask_id = cfg.vocab_size  # the absorbing state: one row past the codes
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, c)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.block_size, c))
        self.cond_emb = nn.ModuleDict(
            {n: nn.Embedding(s.vocab_size, c) for n, s in cfg.conditions.items()}
        )
        self.cond_pos = nn.ParameterDict(  # aligned conditions take their code's position
            {n: nn.Parameter(torch.zeros(cfg.conditions[n].prefix_tokens, c)) for n in in_prefix}
        )
        self.cond_null = nn.ParameterDict({n: nn.Parameter(torch.zeros(c)) for n in cfg.conditions})
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        # One depthwise convolution per block, over the code grid (not the prefix): torch has
        # no attention with a built-in local term, so the neighbourhood comes in this way.
        k = cfg.local_conv
        self.local = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c) for _ in range(cfg.n_layer if k else 0)
        )
        self.sc_proj = nn.Linear(cfg.vocab_size, c, bias=False) if cfg.self_condition else None
        self.ln_f = nn.LayerNorm(c, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.head = nn.Linear(c, cfg.vocab_size, bias=False)  # never predicts the mask token
        self._backends: dict[tuple[torch.device, torch.dtype], AttentionBackend] = {}
        self._attention: str | AttentionBackend = "auto"
        if cfg.attention != "auto":
            # Built now, so an unknown name fails at build time (as in the transformer prior).
            self._attention = get_backend(cfg.attention, check=False)
        self._init_weights()

    def _init_weights(self) -> None:
        free = (self.pos_emb, *self.cond_null.values(), *self.cond_pos.values())
        init_gpt_weights(self, self.config.n_layer, free)  # as the transformer prior
        if self.sc_proj is not None:
            nn.init.zeros_(self.sc_proj.weight)
        for conv in self.local:  # zero: the residual starts as the identity
            for p in conv.parameters():
                nn.init.zeros_(p)

    # -- properties and checks -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def check_grid(self, h: int, w: int) -> None:
        n = self.config.block_size
        if h * w > n:
            raise InputError(
                f"code grid {h}x{w} ({h * w} codes) is larger than the {n} positions the masked "
                f"prior was built with (block_size={n}), and it has no sliding window: sample a "
                f"grid of at most {n} codes, or train a masked prior with block_size >= {h * w}."
            )

    def resolve_window(
        self, grid: tuple[int, int], size: tuple[int, int] | None, force: bool = False
    ) -> tuple[int, int] | None:
        """Always None (every grid is drawn whole); a window asked for is an error."""
        if size is not None or force:
            raise InputError(
                "the masked prior has no sliding window (it reads the whole grid at once): "
                "leave SamplerConfig.window_size unset and sample a grid of at most "
                f"block_size={self.config.block_size} codes."
            )
        self.check_grid(*grid)
        return None

    def num_steps(self, sampler_steps: int | None, grid: tuple[int, int]) -> int:
        """The number of sampling passes T for ``grid``: the sampler's, else the config's (at
        most one per code on a grid smaller than the config's steps)."""
        n = grid[0] * grid[1]
        if sampler_steps is None:
            return min(int(self.config.steps), n)  # a default, not something the user asked
        t = int(sampler_steps)
        if t < 1 or t > n:
            raise InputError(
                f"steps={t} for a {grid[0]}x{grid[1]} grid of {n} codes: each pass fills at "
                f"least one code, so use 1 <= steps <= {n} (SamplerConfig.steps, `--steps` on "
                "the command line; MaskGIT uses 8-12)."
            )
        return t

    def _backend(self, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
        key = (device, dtype)
        backend = self._backends.get(key)
        if backend is None:
            backend = get_backend(self._attention, device, dtype)
            self._backends[key] = backend
        return backend

    # -- the network ---------------------------------------------------------------------------
    def _prefix(self, conds: dict[str, Conditioning], batch: int) -> Tensor | None:
        """Embedded condition prefix ``[B, n_ctx, C]``, nulls where dropped; None if none."""
        device = self.tok_emb.weight.device
        parts = []
        for name in prefix_names(self.config.conditions):
            cond = conds[name]
            tokens = prefix_tokens(name, self.config.conditions[name], cond)  # [B, n]
            e = self.cond_emb[name](tokens.to(device=device, dtype=torch.long))  # [B, n, C]
            if cond.drop is not None:
                d = cond.drop.to(device=device, dtype=torch.bool)
                e = torch.where(d[:, None, None], self.cond_null[name].to(e.dtype), e)
            parts.append(e + self.cond_pos[name])
        if not parts:
            return None
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _logits(
        self,
        tokens: Tensor,
        conds: dict[str, Conditioning],
        positions: Tensor | None = None,
        *,
        grid: tuple[int, int] | None = None,
        sc: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[B, N, K]`` of every position of ``tokens [B, N]`` (``mask_id`` = masked),
        or ``[M, K]`` of only the M True entries of ``positions [B, N]`` (row-major order);
        ``grid`` is the ``(h, w)`` of the ``N`` codes (for the aligned conditions)."""
        cfg = self.config
        b, n = tokens.shape
        train = self.training
        x = self.tok_emb(tokens) + self.pos_emb[:n]  # [B, N, C]
        if sc is not None and self.sc_proj is not None:
            x = x + self.sc_proj(sc.to(x.dtype))  # [B, N, K] previous probabilities
        aligned = None
        if aligned_names(cfg.conditions):
            if grid is None:
                raise ValueError("_logits needs the grid of a prior with aligned conditions")
            aligned = aligned_embedding(cfg.conditions, conds, grid, self.cond_emb, self.cond_null)
        if aligned is not None:
            x = x + aligned  # each code's own cell: the model is not causal
        prefix = self._prefix(conds, b)
        if prefix is not None:
            x = torch.cat((prefix, x), dim=1)  # [B, n_ctx + N, C]
        if train and cfg.embd_dropout:
            x = F.dropout(x, cfg.embd_dropout, training=True)
        backend = self._backend(x.device, x.dtype)
        attn_p = cfg.attn_dropout if train else 0.0
        resid_p = cfg.resid_dropout if train else 0.0
        for i, block in enumerate(self.blocks):
            if self.local:
                x = self._local(i, x, grid)
            x = block(x, backend, None, None, 0, attn_p, resid_p, causal=False)
        h = x[:, self.n_ctx :]  # [B, N, C]
        if positions is not None:
            # Only the positions asked for go through the final norm and the head: in sampling
            # and training these are the masked codes, a fraction of the grid.
            h = h[positions]  # [M, C]
        h = F.layer_norm(h, (h.shape[-1],), self.ln_f.weight, self.ln_f.bias, cfg.layer_norm_eps)
        return self.head(h)  # [B, N, K] or [M, K]

    def _local(self, i: int, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """``x [B, n_ctx + N, C]`` plus layer i's depthwise convolution of its N codes' grid."""
        if grid is None:
            raise ValueError("_logits needs the grid of a prior with local_conv")
        b, _, c = x.shape
        codes = x[:, self.n_ctx :].transpose(1, 2).reshape(b, c, *grid)  # [B, C, h, w]
        mixed = self.local[i](codes).flatten(2).transpose(1, 2)  # [B, N, C]
        return torch.cat((x[:, : self.n_ctx], x[:, self.n_ctx :] + mixed), dim=1)

    def _probs_at(self, logits: Tensor, positions: Tensor) -> Tensor:
        """``[B, N, K]``: softmax of ``logits [M, K]`` at the True ``positions``, 0 elsewhere."""
        b, n = positions.shape
        out = logits.new_zeros(b, n, logits.shape[-1], dtype=torch.float32)
        return out.masked_scatter(positions[..., None], logits.detach().float().softmax(-1))

    def _two_pass_logits(
        self,
        tokens: Tensor,
        conds: dict[str, Conditioning],
        positions: Tensor,
        grid: tuple[int, int],
        first: bool,
    ) -> Tensor:
        """``_logits`` at ``positions``; with ``first``, self-conditioned on a pass before it
        (without gradients) at the same inputs."""
        sc = None
        if first:
            with torch.no_grad():
                sc = self._probs_at(self._logits(tokens, conds, positions, grid=grid), positions)
        return self._logits(tokens, conds, positions, grid=grid, sc=sc)

    # -- training and likelihood -------------------------------------------------------------
    def loss(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Training mode: cross-entropy of the codes masked at a ratio ``gamma(u)`` (MaskGIT),
        with condition dropout. Otherwise: ``-log_prob`` per code, the ELBO in nats."""
        if not self.training:
            return super().loss(codes, conds)
        b = int(codes.shape[0])
        got = self.check_inputs(codes, self.drop_conditions(conds, b))
        flat = codes.reshape(b, -1).to(self.tok_emb.weight.device, torch.long)  # [B, N]
        n = flat.shape[1]
        u = _stratified_uniform(b, flat.device)  # [B]
        # At least one masked code per grid, so every sample contributes to the loss.
        n_mask = (mask_ratio(self.config.mask_schedule, u) * n).ceil().clamp(1, n)  # [B]
        mask = _first_by_random_rank(b, n, n_mask, flat.device)  # [B, N] bool
        grid = (int(codes.shape[1]), int(codes.shape[2]))
        first = self.sc_proj is not None and bool(torch.rand(()) < 0.5)  # half the steps
        tokens = flat.masked_fill(mask, self.mask_id)
        logits = self._two_pass_logits(tokens, got, mask, grid, first)  # [M, K]
        return F.cross_entropy(
            logits.float(), flat[mask], label_smoothing=self.config.label_smoothing
        )

    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """A lower bound ``[B]`` in nats on each code grid's log-likelihood (the ELBO).

        ``elbo_samples`` seeded mask draws, stratified over the number of masked codes, the
        same draws for every grid (see the module docstring). Dropout applies in training mode;
        call ``eval()`` for the deterministic bound.
        """
        got = self.check_inputs(codes, conds)
        b = int(codes.shape[0])
        flat = codes.reshape(b, -1).to(self.tok_emb.weight.device, torch.long)  # [B, N]
        n, grid = flat.shape[1], (int(codes.shape[1]), int(codes.shape[2]))
        e = self.config.elbo_samples
        g = torch.Generator().manual_seed(self.config.elbo_seed)
        # Stratified m in 1..N: draw j covers the j-th of e equal slices of (0, 1].
        u = torch.arange(e, dtype=torch.float64) + torch.rand(e, generator=g, dtype=torch.float64)
        m = (u / e * n).ceil().clamp(1, n).long()  # [E]
        order = torch.rand(e, n, generator=g).argsort(-1)  # [E, N]: a random order per draw
        total = flat.new_zeros(b, dtype=torch.float32)
        for j in range(e):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[order[j, : int(m[j])]] = True
            mask = mask.to(flat.device)
            rows = mask.expand(b, n)  # the same m codes masked in every grid
            tokens = flat.masked_fill(mask, self.mask_id)
            first = self.sc_proj is not None  # the bound of the model that samples
            logits = self._two_pass_logits(tokens, got, rows, grid, first)  # [B*m, K]
            lp = logits.view(b, -1, logits.shape[-1]).float().log_softmax(-1)  # [B, m, K]
            lp = lp.gather(-1, flat[:, mask, None]).squeeze(-1).sum(-1)  # [B]
            # Unbiased for the sum over m = 1..N of the mean over masked codes.
            total = total + lp * (n / int(m[j]))
        return total / e

    # -- sampling ------------------------------------------------------------------------------
    def generate(self, request: SampleRequest) -> Tensor:
        """Draw codes ``[B, h, w]`` in T confidence-ordered passes (``Prior.sample`` checks
        the inputs; ``request.prefix`` codes are kept, its -1 entries drawn)."""
        from tqdm.auto import tqdm

        gh, gw = request.grid
        n, b = gh * gw, request.batch
        steps = self.num_steps(request.sampler.steps, request.grid)
        device = self.tok_emb.weight.device
        codes = (
            torch.full((b, n), -1, dtype=torch.long, device=device)
            if request.prefix is None
            else request.prefix.reshape(b, n).clone()
        )  # [B, N], -1 = still masked
        free = (codes < 0).sum(-1)  # [B] codes each grid draws
        gen = request.generator
        schedule = self.config.mask_schedule
        k = request.sampler.refine_steps
        refine = f" + {k} refinement{'s' if k > 1 else ''}" if k else ""
        bar = tqdm(
            total=steps + k,
            desc=f"sampling (masked, {steps} steps{refine})",
            unit="step",
            disable=not request.progress,
        )
        if request.on_code is not None:
            request.on_code(int(b * n - free.sum()))  # the given codes count as done
        prev: Tensor | None = None  # [rows, N, K] the last pass's probabilities
        with bar:
            for t in range(steps):
                masked = codes < 0  # [B, N]
                if not bool(masked.any()):
                    break  # a prefix left fewer free codes than passes
                raw, logits = self._pass_logits(codes, masked, request, sc=prev)
                if self.sc_proj is not None:
                    prev = self._probs_at(raw, request.expand(masked))
                logits = filter_logits(logits, request.sampler)  # [M, K], -inf removed
                logp = logits.log_softmax(-1)
                picked = torch.multinomial(logp.exp(), 1, generator=gen)  # [M, 1]
                conf_m = logp.gather(-1, picked).squeeze(-1)  # [M]
                noise_scale = self.config.choice_temperature * (1 - (t + 1) / steps)
                if noise_scale > 0:
                    conf_m = conf_m + noise_scale * _gumbel(conf_m.shape, gen, device)
                drawn = codes.masked_scatter(masked, picked.squeeze(-1))  # [B, N]
                # given codes rank first
                conf = torch.full((b, n), float("inf"), device=device).masked_scatter(
                    masked, conf_m
                )
                # Codes still masked after this pass: gamma((t+1)/T) of the free ones, at least
                # one fewer than now (every pass fills a code), none after the last pass.
                left = masked.sum(-1)  # [B]
                r = torch.full((b,), (t + 1) / steps, dtype=torch.float64)
                keep_masked = (mask_ratio(schedule, r).to(device) * free).floor().long()
                keep_masked = torch.minimum(keep_masked, (left - 1).clamp(min=0))
                if t == steps - 1:
                    keep_masked = torch.zeros_like(keep_masked)
                # Fill the (left - keep_masked) most confident masked codes of each row.
                order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
                rank = order.argsort(-1)  # [B, N]: 0 = most confident
                fill = masked & (rank < (n - keep_masked)[:, None])
                codes = torch.where(fill, drawn, codes)
                if prev is not None:  # filled codes are visible now: no belief for them
                    prev = prev * request.expand(codes < 0)[..., None]
                bar.update(1)
                if request.on_code is not None:
                    request.on_code(int(fill.sum()))
            given = codes.new_zeros(codes.shape, dtype=torch.bool)
            if request.prefix is not None:
                given = request.prefix.reshape(b, n) >= 0
            for j in range(k if bool((~given).any()) else 0):
                codes = self._refine(codes, ~given, j, request)
                bar.update(1)
                if request.on_code is not None:
                    request.on_code(0)  # no new codes; lets a caller cancel between passes
        return codes.view(b, gh, gw)

    def _pass_logits(
        self, codes: Tensor, masked: Tensor, request: SampleRequest, sc: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One sampling pass with the True entries of ``masked [B, N]`` masked (``codes`` may
        hold anything there) and the rest of ``codes`` visible: the logits of every row
        ``[rows * M, K]`` (with guidance the conditional rows' M first, then the null rows'
        same M) and the guided logits ``[B * M, K]`` at the masked codes, in row-major order.
        Only the masked positions go through the head."""
        tokens = codes.masked_fill(masked, self.mask_id)
        raw = self._logits(
            request.expand(tokens), request.conds, request.expand(masked), grid=request.grid, sc=sc
        )
        if not request.guided:
            return raw, raw
        m = raw.shape[0] // 2
        return raw, guide(raw[:m], raw[m:], request.sampler.guidance_scale)

    def _refine(self, codes: Tensor, free: Tensor, j: int, request: SampleRequest) -> Tensor:
        """Refinement pass j of ``SamplerConfig.refine_steps`` on a full grid ``codes [B, N]``:
        score each ``free`` code by the prior's log-probability of it given the rest, with a
        random half of the grid (the code's own half) masked; re-mask the least likely and
        draw them again.

        This is Token-Critic's re-masking (Lezama et al., arXiv 2209.04439) with the prior as
        its own critic: MaskGIT never revisits a code, and the ones kept in the first passes
        were chosen with most of the grid unknown. The two halves cost two passes, the redraw
        a third; re-masking at random instead (a Gibbs step) made samples worse on shapes.
        """
        gen = request.generator
        b, n = codes.shape
        half = torch.rand(b, n, generator=gen, device=codes.device) < 0.5  # [B, N]
        score = torch.full((b, n), float("inf"), device=codes.device)  # given codes rank last
        for part in (half & free, ~half & free):
            if bool(part.any()):
                logp = self._pass_logits(codes, part, request)[1].float().log_softmax(-1)
                score = score.masked_scatter(part, logp.gather(-1, codes[part][:, None])[:, 0])
        steps = request.sampler.refine_steps
        fraction = request.sampler.refine_fraction * (1 - j / steps)  # fewer codes each pass
        count = (fraction * free.sum(-1)).ceil().clamp(min=1)  # [B]
        remask = free & (score.argsort(-1).argsort(-1) < count[:, None])  # the lowest-scored
        logits = filter_logits(self._pass_logits(codes, remask, request)[1], request.sampler)
        picked = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        return codes.masked_scatter(remask, picked)


def _gumbel(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard Gumbel noise ``-log(-log U)`` drawn with ``generator``."""
    u = torch.rand(shape, generator=generator, device=device)
    e = (-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20)  # Exp(1), kept away from 0
    return -torch.log(e)


def _stratified_uniform(b: int, device: torch.device) -> Tensor:
    """``[B]`` draws of U(0, 1), one in each of B equal slices, in random order.

    Each draw is still uniform, but a batch covers every mask ratio of the schedule evenly
    instead of by chance: a lower-variance gradient (the low-discrepancy sampler of MDLM,
    arXiv 2406.07524).
    """
    u = (torch.arange(b, device=device) + torch.rand(b, device=device)) / b
    return u[torch.randperm(b, device=device)]


def _first_by_random_rank(b: int, n: int, count: Tensor, device: torch.device) -> Tensor:
    """Bool ``[B, N]`` with ``count[i]`` randomly chosen True entries in row i."""
    rank = torch.rand(b, n, device=device).argsort(-1).argsort(-1)  # a random permutation
    return rank < count.to(device)[:, None]
