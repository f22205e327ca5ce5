"""The Prior contract: a model of code grids ``[B, h, w]`` given conditions, and its plumbing.

Every prior shares the same sampling preamble (batch size, guidance, prefix and condition
checks, the doubled batch of classifier-free guidance) and the same condition dropout, so they
live here once and a new prior writes only what is its own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from latentgen.components import Component
from latentgen.conditioners.base import Conditioning, concat_conditionings
from latentgen.errors import InputError, SpecError
from latentgen.priors.sampling import draw_fast, guide
from latentgen.priors.window import (
    FullForwardDecoder,
    WindowBand,
    WindowDecoder,
    WindowMode,
    crop_conditions,
    sample_windowed,
    windowed_log_prob,
)
from latentgen.specs import ComponentConfig, SamplerConfig
from latentgen.tokenizers.base import _check_codes

__all__ = ["ConditionSlot", "Conds", "Prior", "PriorConfig", "SampleRequest"]

#: Conditions by name, as the pipeline's conditioners produced them.
Conds = Mapping[str, Conditioning]


class ConditionSlot(BaseModel):
    """What a prior config says about one condition it is built for (``conditions: {name: slot}``).

    The pipeline checks each slot against the conditioner of the same name, so a prior and its
    conditioners cannot drift apart silently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=1, description="Size of the conditioner's token vocabulary.")
    num_tokens: int = Field(1, ge=1, description="Tokens per sample (hc*wc for spatial maps).")
    placement: Literal["prefix", "aligned", "both"] = Field(
        "prefix",
        description="Where the transformer and masked priors put the condition. 'prefix': "
        "its tokens come before the codes, each with a learned position, and attention finds "
        "them (Taming Transformers). 'aligned': no prefix tokens; the embedding of the "
        "condition's cell is added to the input of each code it covers (for the GPT prior, "
        "the input that predicts that code), so a map steers each code where it lies without "
        "having to be found; a condition without a grid (a class label) is added to every "
        "code. 'both': the prefix and the aligned sum. PixelSNAIL ignores it (it always adds "
        "a map at its cells).",
    )
    prefix_downsample: int = Field(
        1,
        ge=1,
        description="A spatial condition in the prefix keeps one token per k x k cells of its "
        "map (the cell at each block's centre), so a map fine enough to be aligned with every "
        "code (placement 'both') costs the prefix k*k times fewer tokens. 1: every cell.",
    )

    @model_validator(mode="after")
    def _check_prefix_downsample(self) -> ConditionSlot:
        k = self.prefix_downsample
        if k > 1 and self.placement == "aligned":
            raise ValueError(
                "prefix_downsample applies to the prefix, but placement 'aligned' has none; "
                "use placement 'both' (or 'prefix'), or remove prefix_downsample."
            )
        if self.num_tokens % (k * k):
            raise ValueError(
                f"num_tokens={self.num_tokens} is not a whole number of {k}x{k} blocks; use a "
                "prefix_downsample that divides both sides of the condition's grid."
            )
        return self

    @property
    def prefix_tokens(self) -> int:
        """Tokens this condition puts in the prefix (0 when aligned only)."""
        if self.placement == "aligned":
            return 0
        return self.num_tokens // (self.prefix_downsample * self.prefix_downsample)


class PriorConfig(ComponentConfig):
    """Fields every prior config shares: the conditions it is built for and their dropout.

    A prior config subclasses this (and adds ``type: Literal[...]``) to get condition checks,
    ``condition_names`` and condition dropout from ``Prior`` without writing them.
    """

    conditions: dict[str, ConditionSlot] = Field(
        default_factory=dict,
        description="Conditions by name (vocab_size, num_tokens each), matched by name to the "
        "pipeline's conditioners. Empty: unconditional.",
    )
    cond_dropout: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Training probability of replacing all of a sample's conditions with the "
        "prior's null condition (the input of the unconditional branch), so that "
        "classifier-free guidance works (arXiv 2207.12598). 0: no null is learned.",
    )
    cond_dropout_each: dict[str, float] = Field(
        default_factory=dict,
        description="Per condition: training probability of nulling that condition alone (a "
        "draw of its own per sample, on top of cond_dropout), so one prior also samples with "
        "that condition left out, e.g. {label: 0.3, segmentation: 0.3} for images from a label "
        "alone, a map alone, or both. A pipeline accepts a call without such a condition.",
    )

    @model_validator(mode="after")
    def _check_condition_names(self) -> PriorConfig:
        for name in self.conditions:
            if not name.isidentifier():
                raise ValueError(
                    f"condition name {name!r} must be a Python identifier (it is passed as a "
                    "keyword, e.g. pipe(label=[3])); use letters, digits and underscores."
                )
        for name, p in self.cond_dropout_each.items():
            if name not in self.conditions:
                raise ValueError(
                    f"cond_dropout_each names {name!r}, which is not one of the prior's "
                    f"conditions ({', '.join(self.conditions) or 'none'}); use one of them."
                )
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"cond_dropout_each.{name} = {p} must lie in [0, 1].")
        return self

    def optional_conditions(self) -> tuple[str, ...]:
        """Conditions the prior learned to do without (``cond_dropout_each`` above 0)."""
        return tuple(n for n, p in self.cond_dropout_each.items() if p > 0)


@dataclass(frozen=True)
class SampleRequest:
    """Checked inputs of one ``Prior.sample`` call, as ``Prior.generate`` receives them.

    Attributes:
        grid: code grid ``(h, w)``, already checked by ``Prior.check_grid``.
        batch: B, the number of code grids to draw.
        sampler: temperature / top-k / top-p / guidance.
        generator: the ``torch.Generator`` every random draw must use (or None).
        conds: the checked conditions on the prior's device, with ``rows`` rows each: with
            guidance the B conditional rows followed by the same B rows dropped (the null
            branch), so that one batched forward serves both; else the B rows as given.
        prefix: ``[B, h, w]`` long on the prior's device, -1 where a code is to be drawn and a
            code that must be kept elsewhere; None when everything is drawn.
        options: the prior's own sampling options given to ``sample`` (names checked against
            ``Prior.sample_options``).
        window: ``(wh, ww)`` when the grid is drawn with the sliding window
            (``latentgen.priors.window``), the conditions then being the whole-grid ones; None
            when ``generate`` draws the grid directly.
        on_code: called by ``pick`` with the number of codes it just drew (B), or by a prior
            that draws many codes per pass with the number it filled (0 for a pass that
            only redraws codes, like the masked prior's refinement passes), for progress and
            cancelling (it may raise to stop the draw); None: nothing is called.
        progress: whether ``sample`` was asked for a progress bar (a prior that decodes in
            steps, like the masked prior, shows one over its steps).
    """

    grid: tuple[int, int]
    batch: int
    sampler: SamplerConfig
    generator: torch.Generator | None
    conds: dict[str, Conditioning]
    prefix: Tensor | None
    options: Mapping[str, Any] = field(default_factory=dict)
    window: tuple[int, int] | None = None
    on_code: Callable[[int], None] | None = None
    progress: bool = False

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance mixes a null branch into the logits."""
        return bool(self.conds) and self.sampler.guidance_scale != 1.0

    @property
    def rows(self) -> int:
        """Rows a forward pass runs: 2B with guidance, else B."""
        return 2 * self.batch if self.guided else self.batch

    def expand(self, x: Tensor) -> Tensor:
        """``[B, ...]`` -> ``[rows, ...]``: the same inputs for the conditional and null rows."""
        return torch.cat((x, x)) if self.guided else x

    def mix(self, logits: Tensor) -> Tensor:
        """``[rows, ..., K]`` -> ``[B, ..., K]``: the guided logits ``u + s * (c - u)``."""
        if not self.guided:
            return logits
        b = self.batch
        return guide(logits[:b], logits[b:], self.sampler.guidance_scale)

    def keep(self, codes: Tensor, position: int) -> Tensor:
        """Drawn ``codes [B]`` at raster ``position``, with the prefix's given codes kept."""
        if self.prefix is None:
            return codes
        given = self.prefix.view(self.batch, -1)[:, position]  # [B]
        return torch.where(given >= 0, given, codes)

    def pick(self, logits: Tensor, position: int) -> Tensor:
        """Code ``[B]`` at raster ``position`` from ``logits [rows, K]``: guide, draw, keep."""
        codes = self.keep(draw_fast(self.mix(logits), self.sampler, self.generator), position)
        if self.on_code is not None:
            self.on_code(int(codes.shape[0]))
        return codes


def _count_codes(
    report: Callable[[int, int], None], request: SampleRequest
) -> Callable[[int], None]:
    """``report(done, total)`` as a ``SampleRequest.on_code`` that counts the codes drawn."""
    total = request.batch * request.grid[0] * request.grid[1]
    done = 0

    def on_code(n: int) -> None:
        nonlocal done
        done = min(done + n, total)
        report(done, total)

    return on_code


class Prior(Component, nn.Module, ABC):
    """Stage 2: models ``p(codes | conds)`` over a code grid.

    What a prior implements: ``vocab_size``, ``log_prob(codes, conds)`` (nats per grid) and
    ``generate(request)`` (draw codes). What the base does for it:

    - ``sample(conds, grid, sampler, generator, num_samples, prefix)`` is a template method: it
      checks the grid (``check_grid``, which a prior with a size limit overrides), the
      conditions (``check_conds``), the batch (B is the conditions' batch; without conditions
      ``num_samples``, else the prefix's batch, else 1), that guidance has conditions to guide
      by, and the prefix (``[B, h, w]`` integer codes, -1 where a code is drawn); moves
      everything to the prior's device; doubles the conditions for classifier-free guidance;
      then calls ``generate(request)`` in eval and inference mode with a ``SampleRequest``,
      and restores the mode. Extra keywords of ``sample`` are the prior's own options: their
      names are listed in ``sample_options`` and reach ``generate`` as ``request.options``.
    - ``condition_names`` and ``condition_slots`` come from the config's ``conditions`` (a
      ``PriorConfig`` field); ``check_conds`` checks names, vocabularies, token counts, dtypes,
      value ranges, drop masks and batch sizes against them.
    - ``loss`` is the mean NLL per code in nats, with the config's ``cond_dropout`` applied in
      training mode (``drop_conditions``): one draw per sample nulls all its conditions, the
      input the null branch of guidance sees. ``log_prob`` itself never drops conditions.
    - ``check_inputs(codes, conds)`` is the preamble of ``log_prob``: codes, grid, conditions.
    - The sliding window (``latentgen.priors.window``): a grid larger than the prior models
      directly (or any grid, with ``SamplerConfig.window_size``) is drawn window by window
      from ``window_decoder`` and scored by ``window_log_prob`` from ``code_log_probs``. A
      prior opts in by implementing ``code_logits`` (teacher-forced logits of a window) and
      ``window_size`` (the window it was trained on); a KV-cached ``window_decoder`` is what
      makes ``window="cached"`` fast.
    """

    kind: ClassVar[str] = "prior"
    #: Names of the prior's own keyword options to ``sample`` (e.g. ``use_cache``).
    sample_options: ClassVar[frozenset[str]] = frozenset()
    #: True when ``log_prob`` is a lower bound (an ELBO, e.g. the masked prior's), not exact.
    log_prob_is_bound: ClassVar[bool] = False
    #: True when ``sample`` runs ``SamplerConfig.steps`` passes (e.g. the masked prior), so the
    #: number of passes is worth measuring; autoregressive priors ignore ``steps``.
    decodes_in_passes: ClassVar[bool] = False
    #: The ``ConditionSlot.placement`` values the prior implements. A prior that reads every
    #: condition as a prefix keeps the default, so a slot asking it for ``aligned`` or ``both``
    #: is refused when it is built instead of being read as a prefix without a word.
    placements: ClassVar[frozenset[str]] = frozenset({"prefix"})

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.config = config
        asked = {n: s.placement for n, s in self.condition_slots.items()}
        unsupported = {n: p for n, p in asked.items() if p not in self.placements}
        if unsupported:
            raise SpecError(
                f"{type(self).__name__} implements condition placement "
                f"{sorted(self.placements)}, but its config asks for {unsupported}; set "
                "placement: prefix on those conditions, or use a prior that adds conditions at "
                "their cells (transformer, masked)."
            )

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of codes K the prior predicts over."""

    @property
    def condition_slots(self) -> dict[str, ConditionSlot]:
        """The config's ``conditions`` by name (empty: unconditional)."""
        return dict(getattr(self.config, "conditions", None) or {})

    @property
    def condition_names(self) -> tuple[str, ...]:
        """Names of the conditions this prior was built for, from its config's ``conditions``."""
        return tuple(self.condition_slots)

    @property
    def device(self) -> torch.device:
        """Where the prior's weights live (CPU when it has none)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @abstractmethod
    def log_prob(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Total log-likelihood ``[B]`` in nats of each code grid ``[B, h, w]``."""

    def generate(self, request: SampleRequest) -> Tensor:
        """Draw codes ``[B, h, w]`` for checked inputs; called by ``sample``, call that instead.

        ``request.pick(logits, i)`` turns the logits of raster position ``i`` (``rows`` rows)
        into ``B`` codes: the guidance mix, the sampler's filters and the kept prefix codes.
        Not abstract only so that a prior written before it, which overrides ``sample``
        itself, still builds.
        """
        raise NotImplementedError(
            f"{type(self).__name__} implements neither generate(request) nor sample(...): "
            "implement generate and let Prior.sample check the inputs."
        )

    # -- the sliding window ------------------------------------------------------------------
    @property
    def window_size(self) -> tuple[int, int] | None:
        """The code window ``(wh, ww)`` the prior was trained on, the sliding window's default
        size; None when the prior does not know it (then ``SamplerConfig.window_size`` must
        say it for a grid the prior cannot model directly)."""
        return None

    def check_window(self, size: tuple[int, int]) -> None:
        """Raise ``InputError`` when the prior cannot model a ``size`` window (default:
        ``check_grid``, the window being a grid the prior models directly)."""
        self.check_grid(*size)

    def code_logits(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Teacher-forced logits ``[B, h*w, K]`` of a grid ``[B, h, w]`` the prior models
        directly: entry ``i`` predicts code ``i`` (raster order) from the codes before it."""
        raise InputError(
            f"{type(self).__name__} does not implement code_logits, so it cannot use the sliding "
            "window: sample grids it models directly, or use a prior that supports it (e.g. "
            "'transformer')."
        )

    def code_log_probs(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Log-probability ``[B, h*w]`` in nats of each code of ``codes [B, h, w]``."""
        logits = self.code_logits(codes, conds).float()  # [B, n, K]
        flat = codes.reshape(codes.shape[0], -1).to(logits.device, torch.long)  # [B, n]
        return logits.log_softmax(-1).gather(-1, flat[..., None]).squeeze(-1)

    def window_decoder(self, rows: int, size: tuple[int, int], slots: int = 1) -> WindowDecoder:
        """The logits of ``slots`` windows of ``size`` at once for ``rows`` rows each; the
        default runs ``code_logits`` over every window asked for a code, the windows of one
        wave stacked into one batch; a prior with a KV cache returns a cached decoder that
        steps every asked window by one code in one batch."""
        return FullForwardDecoder(self, rows, size, slots)

    def resolve_window(
        self, grid: tuple[int, int], size: tuple[int, int] | None, force: bool = False
    ) -> tuple[int, int] | None:
        """The window ``(wh, ww)`` for an ``(h, w)`` grid, or None to model it directly.

        The window is ``size`` (checked by ``check_window``), else ``window_size``. It is used
        when ``force`` is set, when ``size`` is given and the grid exceeds it, or when the prior
        cannot model the grid directly (``check_grid`` refuses it). A grid lower than the window
        uses a window of the grid's height (its rows are a prefix of the trained ones); a grid
        narrower than the window cannot be windowed (the prior's rows would wrap elsewhere).
        """
        h, w = grid
        if size is not None:
            wh, ww = int(size[0]), int(size[1])
            self.check_window((wh, ww))
            use = force or h > wh or w > ww
        else:
            try:
                self.check_grid(h, w)
            except InputError as direct:
                if self.window_size is None:
                    raise InputError(
                        f"{direct} {type(self).__name__} does not know the code window it was "
                        "trained on, so the sliding window needs it: set the prior config's "
                        "window (e.g. TransformerPriorConfig.window=[16, 16]) or the sampler's "
                        "window_size, e.g. SamplerConfig(window_size=(16, 16))."
                    ) from None
                use = True
            else:
                use = force and self.window_size is not None
            if not use:
                return None
            wh, ww = self.window_size  # type: ignore[misc]
            self.check_window((wh, ww))
        if not use:
            return None
        if w < ww and h > wh:
            raise InputError(
                f"the {h}x{w} code grid is {w} codes wide but the window is {ww} codes wide: "
                f"the prior reads rows of {ww} codes, so a narrower grid cannot be windowed. "
                f"Sample a grid at least {ww} codes wide (and crop the image), or give "
                "a window_size that fits."
            )
        return min(wh, h), ww

    def window_log_prob(
        self,
        codes: Tensor,
        conds: Conds | None = None,
        *,
        window: WindowMode = "cached",
        window_size: tuple[int, int] | None = None,
        per_code: bool = False,
        window_band: WindowBand = "middle",
        window_stride: tuple[int, int] | None = None,
        window_margin: int | None = None,
    ) -> Tensor:
        """Log-likelihood ``[B]`` in nats of code grids ``[B, h, w]`` under the sliding window.

        Each code is scored from the window ``window`` mode would draw it from (see
        ``latentgen.priors.window``; ``window_band``, ``window_stride`` and ``window_margin``
        as in ``SamplerConfig``); on a grid the prior models directly with no
        ``window_size``, this is ``log_prob``. ``per_code=True`` returns ``[B, h, w]``.
        """
        if window not in ("exact", "cached"):
            raise InputError(f"window must be 'exact' or 'cached', got {window!r}.")
        self.check_codes(codes)
        b, h, w = (int(n) for n in codes.shape)
        size = self.resolve_window((h, w), window_size, force=window_size is not None)
        if size is None:
            size = (h, w)
            self.check_grid(h, w)
        got = self._check_window_conds(conds, (h, w), size, batch=b)
        got = {name: c.to(codes.device) for name, c in got.items()}
        return windowed_log_prob(
            self,
            codes,
            got,
            size,
            window,
            stride=window_stride,
            per_code=per_code,
            band=window_band,
            margin=window_margin,
        )

    def _check_window_conds(
        self,
        conds: Conds | None,
        grid: tuple[int, int],
        size: tuple[int, int],
        batch: int | None = None,
    ) -> dict[str, Conditioning]:
        """``check_conds`` for whole-grid conditions: each spatial one is checked as its
        crop to one window (which is what the prior sees), its values over the whole map."""
        got = dict(conds or {})
        if not all(isinstance(c, Conditioning) for c in got.values()):
            self.check_conds(got, batch)  # names the one that is not a Conditioning
        for name, c in got.items():
            slot = self.condition_slots.get(name)
            if c.grid is not None and slot is not None and c.tokens.numel():
                lo, hi = int(c.tokens.min()), int(c.tokens.max())
                if lo < 0 or hi >= slot.vocab_size:
                    raise InputError(
                        f"condition {name!r} tokens must lie in [0, {slot.vocab_size}), got "
                        f"values in [{lo}, {hi}]."
                    )
        self.check_conds(crop_conditions(got, grid, 0, 0, size), batch)
        return got

    # -- the sampling template ---------------------------------------------------------------
    def sample(
        self,
        conds: Conds | None = None,
        grid: tuple[int, int] = (16, 16),
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
        prefix: Tensor | None = None,
        progress: bool = False,
        on_code: Callable[[int, int], None] | None = None,
        **options: Any,
    ) -> Tensor:
        """Draw codes ``[B, h, w]``.

        Args:
            conds: conditions by name; B is their batch size (``Conditioning.repeat(n)`` gives
                n samples per condition).
            grid: code grid ``(h, w)``.
            sampler: temperature / top-k / top-p / guidance; None uses the defaults.
            generator: a ``torch.Generator`` on the prior's device for reproducible draws.
            num_samples: B when there are no conditions (default: the prefix's batch, else 1);
                with conditions it may only repeat their batch size.
            prefix: optional ``[B, h, w]`` codes with -1 where codes are to be drawn; given
                codes are kept (completion, as in the paper's image-completion figures).
            progress: show a progress bar (tqdm) over the codes of a windowed draw (or over
                the steps of a prior that decodes in steps).
            on_code: called as ``on_code(done, total)`` after each drawn position (or pass),
                counting codes over the whole batch (``total = B * h * w``); an exception it
                raises stops the draw and reaches the caller (how ``latentgen serve`` cancels).
            **options: prior-specific sampling options, passed on to ``generate``.

        A grid the prior cannot model directly (or any grid larger than
        ``sampler.window_size``) is drawn with the sliding window, ``sampler.window`` saying
        which kind (``latentgen.priors.window``).
        """
        request = self.sample_request(
            conds, grid, sampler, generator, num_samples, prefix, **options
        )
        if on_code is not None:
            request = replace(request, on_code=_count_codes(on_code, request))
        if progress:
            request = replace(request, progress=True)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                if request.window is None:
                    out = self.generate(request)
                else:
                    out = sample_windowed(
                        self,
                        request,
                        request.window,
                        request.sampler.window,
                        progress=progress,
                        stride=request.sampler.window_stride,
                        band=request.sampler.window_band,
                        margin=request.sampler.window_margin,
                    )
        finally:
            self.train(was_training)
        want = (request.batch, *request.grid)
        if tuple(out.shape) != want:
            raise RuntimeError(
                f"{type(self).__name__}.generate returned codes of shape {tuple(out.shape)}, "
                f"expected [B, h, w] = {list(want)}."
            )
        # Clone outside inference mode: inference tensors cannot be used later in autograd
        # (e.g. sampled codes fed to a training step).
        return out.clone()

    def sample_request(
        self,
        conds: Conds | None = None,
        grid: tuple[int, int] = (16, 16),
        sampler: SamplerConfig | None = None,
        generator: torch.Generator | None = None,
        num_samples: int | None = None,
        prefix: Tensor | None = None,
        **options: Any,
    ) -> SampleRequest:
        """Check ``sample``'s arguments and gather them into a ``SampleRequest``."""
        unknown = sorted(set(options) - self.sample_options)
        if unknown:
            takes = ", ".join(sorted(self.sample_options)) or "no options of its own"
            raise InputError(
                f"{type(self).__name__}.sample got unknown option(s) {unknown}; it takes "
                f"conds, grid, sampler, generator, num_samples, prefix and {takes}."
            )
        sampler = sampler or SamplerConfig()
        gh, gw = int(grid[0]), int(grid[1])
        if gh < 1 or gw < 1:
            raise InputError(f"code grid must be at least 1x1, got {gh}x{gw}.")
        window = self.resolve_window((gh, gw), sampler.window_size)
        if window is None:
            self.check_grid(gh, gw)
            got = self.check_conds(conds)
        else:
            got = self._check_window_conds(conds, (gh, gw), window)
        batch = self._sample_batch(got, num_samples, prefix, sampler)
        device = self.device
        given = None
        if prefix is not None:
            self._check_prefix(prefix, batch, (gh, gw), num_samples)
            given = prefix.to(device=device, dtype=torch.long)
        got = {name: c.to(device) for name, c in got.items()}
        if got and sampler.guidance_scale != 1.0:
            got = {name: _with_null_rows(c) for name, c in got.items()}
        return SampleRequest((gh, gw), batch, sampler, generator, got, given, options, window)

    # -- checks every prior shares ------------------------------------------------------------
    def check_grid(self, h: int, w: int) -> None:
        """Raise ``InputError`` when this prior cannot model an ``h x w`` grid (default: any)."""

    def check_codes(self, codes: Tensor) -> None:
        _check_codes(codes, self.vocab_size, type(self).__name__)

    def check_inputs(self, codes: Tensor, conds: Conds | None) -> dict[str, Conditioning]:
        """``log_prob``'s preamble: codes in ``[0, K)``, the grid, and conditions for its batch."""
        self.check_codes(codes)
        self.check_grid(int(codes.shape[1]), int(codes.shape[2]))
        return self.check_conds(conds, batch=int(codes.shape[0]))

    def check_conds(self, conds: Conds | None, batch: int | None = None) -> dict[str, Conditioning]:
        """Check ``conds`` against the conditions this prior was built for; returns them as a dict.

        Names must match ``condition_names``; where the config has a slot, vocabulary and token
        count must match it and tokens lie in its range; drop masks are bool ``[B]``; every
        condition has the same batch size, equal to ``batch`` when given.
        """
        got = dict(conds or {})
        want = set(self.condition_names)
        if set(got) != want:
            missing, extra = sorted(want - set(got)), sorted(set(got) - want)
            parts = []
            if missing:
                parts.append(f"missing {missing}")
            if extra:
                parts.append(f"unexpected {extra}")
            raise InputError(
                f"{type(self).__name__} was built for conditions {sorted(want) or 'none'}: "
                f"{'; '.join(parts)}. Pass each as a keyword (e.g. label=[3, 7]) or fix "
                "the prior's config."
            )
        slots = self.condition_slots
        for name, c in got.items():
            if not isinstance(c, Conditioning):
                raise InputError(
                    f"condition {name!r} must be a Conditioning (what a conditioner's encode "
                    f"returns), got {type(c).__name__}."
                )
            slot = slots.get(name)
            if slot is not None:
                self._check_slot(name, slot, c)
            if c.drop is not None and (
                not isinstance(c.drop, Tensor)
                or c.drop.dtype != torch.bool
                or tuple(c.drop.shape) != (c.batch_size,)
            ):
                raise InputError(
                    f"condition {name!r} drop must be a bool tensor [{c.batch_size}] (True where "
                    f"the condition is dropped), got {getattr(c.drop, 'dtype', type(c.drop))} "
                    f"{tuple(getattr(c.drop, 'shape', ()))}."
                )
        sizes = {c.batch_size for c in got.values()}
        if len(sizes) > 1:
            raise InputError(
                f"conditions have different batch sizes: {sorted(sizes)}; give every condition "
                "one row per sample."
            )
        if batch is not None and sizes and sizes != {batch}:
            raise InputError(
                f"the conditions have batch size {sizes.pop()} but codes have {batch}; pass one "
                "condition row per code grid."
            )
        return got

    def _check_slot(self, name: str, slot: ConditionSlot, c: Conditioning) -> None:
        if c.vocab_size != slot.vocab_size or c.num_tokens != slot.num_tokens:
            raise InputError(
                f"condition {name!r} has vocab_size={c.vocab_size}, num_tokens={c.num_tokens}, "
                f"but {type(self).__name__} was built for vocab_size={slot.vocab_size}, "
                f"num_tokens={slot.num_tokens}. Use the conditioner the prior was trained with "
                f"(or fix conditions.{name} in the prior's config)."
            )
        if (
            c.tokens.dtype.is_floating_point
            or c.tokens.dtype.is_complex
            or c.tokens.dtype == (torch.bool)
        ):
            raise InputError(
                f"condition {name!r} tokens must be integers, got dtype {c.tokens.dtype}."
            )
        if c.tokens.numel():
            lo, hi = int(c.tokens.min()), int(c.tokens.max())
            if lo < 0 or hi >= slot.vocab_size:
                raise InputError(
                    f"condition {name!r} tokens must lie in [0, {slot.vocab_size}), got values "
                    f"in [{lo}, {hi}]."
                )

    def _sample_batch(
        self,
        conds: dict[str, Conditioning],
        num_samples: int | None,
        prefix: Tensor | None,
        sampler: SamplerConfig,
    ) -> int:
        if conds:
            b = next(iter(conds.values())).batch_size
            if num_samples is not None and num_samples != b:
                raise InputError(
                    f"num_samples={num_samples} but the conditions hold {b} rows; repeat them "
                    "instead (Conditioning.repeat(n)) or leave num_samples out."
                )
            return b
        if sampler.guidance_scale != 1.0:
            raise InputError(
                f"guidance_scale={sampler.guidance_scale} needs a conditional prior; this one "
                "is unconditional. Use guidance_scale=1."
            )
        if num_samples is not None:
            if num_samples < 1:
                raise InputError(f"num_samples must be >= 1, got {num_samples}.")
            return num_samples
        return int(prefix.shape[0]) if isinstance(prefix, Tensor) and prefix.dim() == 3 else 1

    def _check_prefix(
        self, prefix: Any, b: int, grid: tuple[int, int], num_samples: int | None
    ) -> None:
        h, w = grid
        if not isinstance(prefix, Tensor) or prefix.dim() != 3 or tuple(prefix.shape[1:]) != grid:
            got = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
            raise InputError(
                f"prefix must be a [B, h, w] = [{b}, {h}, {w}] tensor of codes with -1 where "
                f"codes are to be drawn, got {got}."
            )
        if prefix.shape[0] != b:
            source = "num_samples" if num_samples is not None else "the conditions"
            raise InputError(
                f"prefix holds {prefix.shape[0]} grids but {b} samples are drawn (B from "
                f"{source}); give one prefix grid per sample, or leave num_samples out to draw "
                "one sample per prefix grid."
            )
        if prefix.dtype.is_floating_point or prefix.dtype.is_complex or prefix.dtype == torch.bool:
            raise InputError(f"prefix must hold integer codes, got dtype {prefix.dtype}.")
        if prefix.numel():
            lo, hi = int(prefix.min()), int(prefix.max())
            if lo < -1 or hi >= self.vocab_size:
                raise InputError(
                    f"prefix codes must lie in [0, {self.vocab_size}) or be -1 (to draw), got "
                    f"values in [{lo}, {hi}]."
                )

    # -- training ------------------------------------------------------------------------------
    def drop_conditions(self, conds: Conds | None, batch: int) -> Conds | None:
        """In training mode, null all conditions of a sample with probability ``cond_dropout``.

        One draw per sample for all conditions together, OR-ed into ``Conditioning.drop``: the
        unconditional branch of guidance drops them all at once, so that is what is trained.
        ``cond_dropout_each`` adds one draw per sample and condition for that condition alone.
        Outside training, or with ``cond_dropout`` 0, ``conds`` come back unchanged.
        """
        p = float(getattr(self.config, "cond_dropout", 0.0) or 0.0)
        each: dict[str, float] = dict(getattr(self.config, "cond_dropout_each", None) or {})
        if not self.training or (p <= 0 and not any(each.values())) or not conds:
            return conds
        drop = torch.rand(batch, device=self.device) < p  # [B]
        out = {}
        for name, c in conds.items():
            if isinstance(c, Conditioning) and c.batch_size == batch:
                d = drop
                if each.get(name, 0.0) > 0:  # this condition alone, drawn independently
                    d = d | (torch.rand(batch, device=self.device) < each[name])  # [B]
                d = d.to(c.tokens.device)
                c = c.with_drop(d if c.drop is None else c.drop.to(d.device) | d)
            out[name] = c  # a mismatched batch is left for check_conds to report
        return out

    def loss(self, codes: Tensor, conds: Conds | None = None) -> Tensor:
        """Mean negative log-likelihood per code in nats, with condition dropout in training."""
        nll = -self.log_prob(codes, self.drop_conditions(conds, int(codes.shape[0])))
        return nll.sum() / codes.numel()

    @staticmethod
    def bits_per_code(nats_per_code: float) -> float:
        """Nats per code -> bits per code (``log2 e`` times)."""
        return nats_per_code / math.log(2.0)


def _with_null_rows(c: Conditioning) -> Conditioning:
    """``[c; null(c)]``: the conditional rows, then the same rows dropped (for guidance)."""
    return concat_conditionings([c, c.null()])
