"""``Pipeline``: a tokenizer, a prior, named conditioners and a default sampler, saved as one dir.

>>> pipe = Pipeline.from_spec(spec)                          # doctest: +SKIP
>>> images = pipe(label=[3, 7], size=(64, 64), generator=torch.Generator().manual_seed(0))
>>> pipe.save_pretrained("out/shapes")   # atomic: pipeline.json + one component dir each
>>> pipe = Pipeline.from_pretrained("out/shapes", prior=other_prior)  # swap one component
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from latentgen import registry
from latentgen.artifact import (
    PIPELINE_FILE,
    PIPELINE_FORMAT,
    PIPELINE_FORMAT_VERSION,
    ComponentRef,
    check_registered,
    load_component,
    pipeline_component,
    read_pipeline_manifest,
    write_component,
)
from latentgen.conditioners.base import Conditioner, Conditioning
from latentgen.conditioners.spatial import SpatialConditioner
from latentgen.errors import CheckpointError, InputError, SpecError
from latentgen.files import atomic_directory, atomic_write_json
from latentgen.priors.base import Prior
from latentgen.rejection import RejectionConfig, RejectionReport
from latentgen.specs import ComponentConfig, PipelineSpec, SamplerConfig, load_spec, spec_error
from latentgen.tokenizers.base import Tokenizer
from latentgen.tokenizers.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    TileMode,
    decode_tiled,
    exact_tiling_error,
    exact_tiling_supported,
    needs_tiling,
)
from latentgen.version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "PIPELINE_FILE", "Pipeline"]

# The files are latentgen.artifact's; older versions of pipeline.json are upgraded there.
FORMAT = PIPELINE_FORMAT
FORMAT_VERSION = PIPELINE_FORMAT_VERSION


def _check_fit(tokenizer: Tokenizer, prior: Prior, conditioners: Mapping[str, Conditioner]) -> None:
    """Raise a ``SpecError`` when the components cannot work together."""
    if prior.vocab_size != tokenizer.vocab_size:
        raise SpecError(
            f"the prior predicts {prior.vocab_size} codes but the tokenizer has "
            f"{tokenizer.vocab_size}: set the prior's vocab_size to {tokenizer.vocab_size}."
        )
    want, have = set(prior.condition_names), set(conditioners)
    if want != have:
        raise SpecError(
            f"the prior is built for conditions {sorted(want) or 'none'} but the pipeline has "
            f"conditioners {sorted(have) or 'none'}. Make the prior config's `conditions` and "
            "the spec's `conditioners` name the same conditions."
        )
    for name, cond in conditioners.items():
        f = getattr(cond, "image_downsample", None)
        # a condition grid is the code grid, or coarser by a whole factor (one token per
        # k x k codes: fewer prefix tokens); the sliding window crops both alike
        if f is not None and (f < tokenizer.downsample or f % tokenizer.downsample):
            raise SpecError(
                f"conditioner '{name}' ({cond.config.type}) makes one token per {f}x{f} image "
                f"pixels but the tokenizer one code per {tokenizer.downsample}x"
                f"{tokenizer.downsample}, so the condition grid would be neither the code grid "
                f"nor a whole factor coarser: {_downsample_fix(cond, tokenizer.downsample)}"
            )
    slots = prior.condition_slots
    for name, cond in conditioners.items():
        slot = slots.get(name)
        if slot is None:
            continue
        if slot.vocab_size != cond.vocab_size:
            if getattr(cond, "tokenizer", None) is not None:
                raise SpecError(
                    f"conditioner '{name}' tokenizes its maps with a cond-stage tokenizer of "
                    f"{cond.vocab_size} codes but the prior's slot for it expects "
                    f"{slot.vocab_size}: set prior.conditions.{name}.vocab_size = "
                    f"{cond.vocab_size}, or use the cond-stage tokenizer the prior was trained "
                    "with."
                )
            raise SpecError(
                f"conditioner '{name}' has a vocabulary of {cond.vocab_size} tokens but the "
                f"prior's slot for it expects {slot.vocab_size}: set "
                f"prior.conditions.{name}.vocab_size = {cond.vocab_size}."
            )
        n = cond.num_tokens
        window = prior.window_size
        spatial = n is None and isinstance(cond, SpatialConditioner)
        # a spatial condition emits one token per k x k codes of the window the prior sees
        k = (
            int(getattr(cond, "image_downsample", None) or tokenizer.downsample)
            // tokenizer.downsample
        )
        if spatial and window is not None:
            if window[0] % k or window[1] % k:
                raise SpecError(
                    f"conditioner '{name}' ({cond.config.type}) makes one token per {k}x{k} "
                    f"codes, which does not divide the prior's {window[0]}x{window[1]} code "
                    f"window: use a window whose sides are multiples of {k}, or a finer "
                    "condition."
                )
            count = (window[0] // k) * (window[1] // k)
            if count != slot.num_tokens:
                per = "code" if k == 1 else f"{k}x{k} codes"
                raise SpecError(
                    f"conditioner '{name}' ({cond.config.type}) emits one token per {per}, "
                    f"{count} for the prior's {window[0]}x{window[1]} code window, but the "
                    f"prior's slot for it expects {slot.num_tokens}: set "
                    f"prior.conditions.{name}.num_tokens = {count} (or give the prior the "
                    "window whose token count that is)."
                )
        if n is not None and n != slot.num_tokens:
            raise SpecError(
                f"conditioner '{name}' ({cond.config.type}) emits {n} token(s) per sample but "
                f"the prior's slot for it expects {slot.num_tokens}: set "
                f"prior.conditions.{name}.num_tokens = {n} (or, if the conditioner really emits "
                f"{slot.num_tokens}, make its num_tokens property say so)."
            )


def _downsample_fix(cond: Conditioner, f: int) -> str:
    ratio = int(getattr(cond, "map_ratio", 1))
    if getattr(cond, "tokenizer", None) is not None:
        return f"use a cond-stage tokenizer with downsample {f // ratio}."
    return f"set conditioners.<name>.downsample = {f // ratio}."


def _component_of(kind: str, value: Any, what: str) -> Any:
    """An override for ``from_pretrained``/``replace``: a built module, a config or a mapping."""
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, ComponentConfig | Mapping):
        return registry.build(kind, value)
    raise SpecError(
        f"{what} must be a built {kind}, its config, or a mapping with 'type'; got "
        f"{type(value).__name__}."
    )


def _apply_overrides(parts: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Swap components named in ``overrides`` into ``parts`` (tokenizer, prior, conditioners,
    sampler); shared by ``Pipeline.replace`` and ``Pipeline.from_pretrained``."""
    parts = dict(parts, conditioners=dict(parts["conditioners"]))
    for key, value in overrides.items():
        if key in ("tokenizer", "prior"):
            parts[key] = _component_of(key, value, key)
        elif key == "sampler":
            parts[key] = value if isinstance(value, SamplerConfig) else SamplerConfig(**value)
        elif key == "conditioners":
            parts[key] = {
                n: _component_of("conditioner", v, f"conditioner '{n}'")
                for n, v in dict(value).items()
            }
        elif key in parts["conditioners"]:
            parts["conditioners"][key] = _component_of("conditioner", value, f"conditioner '{key}'")
        else:
            names = ", ".join(parts["conditioners"]) or "none here"
            raise SpecError(
                f"unknown component '{key}': use tokenizer, prior, sampler, conditioners, or a "
                f"conditioner name ({names})."
            )
    return parts


class Pipeline:
    """Tokenizer + prior + conditioners + default sampler: generate, encode, decode, score."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prior: Prior,
        conditioners: Mapping[str, Conditioner] | None = None,
        sampler: SamplerConfig | None = None,
        card: Mapping[str, Any] | None = None,
        rejection: RejectionConfig | None = None,
    ) -> None:
        conditioners = dict(conditioners or {})
        if not isinstance(tokenizer, Tokenizer):
            raise SpecError(f"tokenizer must be a latentgen.Tokenizer, got {type(tokenizer)}")
        if not isinstance(prior, Prior):
            raise SpecError(f"prior must be a latentgen.Prior, got {type(prior)}")
        for name, c in conditioners.items():
            if not isinstance(c, Conditioner):
                raise SpecError(f"conditioner '{name}' must be a latentgen.Conditioner")
        if rejection is not None and not isinstance(rejection, RejectionConfig):
            raise SpecError(
                f"rejection must be a latentgen.rejection.RejectionConfig, got {type(rejection)}"
            )
        _check_fit(tokenizer, prior, conditioners)
        self.tokenizer = tokenizer
        self.prior = prior
        self.conditioners = conditioners
        self.sampler = sampler or SamplerConfig()
        self.card: dict[str, Any] = dict(card or {})
        # Classifier rejection sampling for every draw (not saved: it names a classifier).
        self.rejection = rejection
        self.last_rejection: RejectionReport | None = None  # what the last draw with it did
        self.spec  # noqa: B018 -- validate now that the configs form a spec

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: PipelineSpec | Mapping[str, Any] | str | os.PathLike[str]) -> Pipeline:
        """Build a pipeline with fresh weights from a spec, a mapping or a JSON/YAML file."""
        if not isinstance(spec, PipelineSpec):
            spec = load_spec(spec if isinstance(spec, Mapping) else Path(spec))
        tokenizer = registry.build("tokenizer", spec.tokenizer)
        prior = registry.build("prior", spec.prior)
        conds = {n: registry.build("conditioner", c) for n, c in spec.conditioners.items()}
        return cls(tokenizer, prior, conds, spec.sampler)

    @property
    def spec(self) -> PipelineSpec:
        """The spec of the current components (always in step with them)."""
        try:
            return PipelineSpec(
                tokenizer=self.tokenizer.config,
                prior=self.prior.config,
                conditioners={n: c.config for n, c in self.conditioners.items()},
                sampler=self.sampler,
            )
        except ValidationError as e:
            raise spec_error(e, "pipeline") from None

    @property
    def components(self) -> dict[str, Any]:
        """``{'tokenizer': ..., 'prior': ..., 'conditioners': {...}}``."""
        return {
            "tokenizer": self.tokenizer,
            "prior": self.prior,
            "conditioners": dict(self.conditioners),
        }

    def replace(self, **overrides: Any) -> Pipeline:
        """A new pipeline sharing every module except those given (by module, config or mapping).

        Keywords: ``tokenizer``, ``prior``, ``sampler``, ``conditioners`` (a whole mapping), or
        a conditioner's own name to swap just that one; ``rejection`` (a ``RejectionConfig``
        or None).
        """
        rejection = overrides.pop("rejection", self.rejection)
        parts = {
            "tokenizer": self.tokenizer,
            "prior": self.prior,
            "conditioners": dict(self.conditioners),
            "sampler": self.sampler,
        }
        return Pipeline(**_apply_overrides(parts, overrides), card=self.card, rejection=rejection)

    # -- files ----------------------------------------------------------------------------------
    def _named_modules(self) -> Iterator[tuple[str, str, Any]]:
        yield "tokenizer", "tokenizer", self.tokenizer
        yield "prior", "prior", self.prior
        for name, cond in self.conditioners.items():
            yield f"conditioners.{name}", "conditioner", cond

    def save_pretrained(
        self, path: str | os.PathLike[str], card: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``pipeline.json`` and one component directory per component, atomically."""
        path = Path(path)
        if card:
            self.card.update(card)
        spec = self.spec
        components: dict[str, Any] = {}
        with atomic_directory(path) as tmp:
            for name, kind, module in self._named_modules():
                rel = name.replace(".", "/")  # conditioners.label -> conditioners/label
                write_component(module, kind, tmp / rel)
                components[name] = {"path": rel}
            atomic_write_json(
                tmp / PIPELINE_FILE,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "latentgen_version": __version__,
                    "spec": spec.model_dump(mode="json"),
                    "components": components,
                    "card": self.card,
                },
            )
        return path

    @staticmethod
    def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
        """Read and upgrade ``pipeline.json`` of a saved pipeline directory."""
        return read_pipeline_manifest(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> Pipeline:
        """Load a saved pipeline, strictly; keywords swap components as in ``replace``.

        Every file must lie inside the directory and match its sha256, every config the one its
        weights were saved with, every key and shape the spec; a component type that no
        installed plugin provides says which distribution to install. ``rejection`` sets
        classifier rejection sampling (a ``RejectionConfig``).
        """
        rejection = overrides.pop("rejection", None)
        path = Path(path)
        meta = read_pipeline_manifest(path)
        meta_file = path / PIPELINE_FILE
        refs: dict[str, ComponentRef] = {}
        for name in meta["components"]:
            refs[name] = pipeline_component(path, name, meta)
            check_registered(refs[name], name)
        try:
            spec = PipelineSpec.model_validate(meta.get("spec"))
        except ValidationError as e:
            raise spec_error(e, str(path / PIPELINE_FILE)) from None

        built: dict[str, Any] = {}
        cond_names = set(spec.conditioners)
        for name, kind, cfg in (
            ("tokenizer", "tokenizer", spec.tokenizer),
            ("prior", "prior", spec.prior),
            *((f"conditioners.{n}", "conditioner", c) for n, c in spec.conditioners.items()),
        ):
            short = name.split(".", 1)[-1]
            if short in overrides or (short in cond_names and "conditioners" in overrides):
                continue  # swapped out below: its weights are not needed
            ref = refs.get(name) or pipeline_component(path, name, meta)  # names the gap
            if ref.kind != kind:
                raise CheckpointError(f"{ref.where} holds a {ref.kind}, not the {kind} '{name}'.")
            built[short] = load_component(
                ref, kind, config=cfg, name=name, config_source=f"the spec in {meta_file}"
            )
        parts = {
            "tokenizer": built.get("tokenizer"),
            "prior": built.get("prior"),
            "conditioners": {n: built[n] for n in cond_names if n in built},
            "sampler": spec.sampler,
        }
        return cls(**_apply_overrides(parts, overrides), card=meta.get("card"), rejection=rejection)

    # -- running --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for p in self.prior.parameters():
            return p.device
        for b in self.prior.buffers():
            return b.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> Pipeline:
        """Move every component to ``device`` (in place); returns self."""
        for _, _, module in self._named_modules():
            module.to(device)
        return self

    @contextmanager
    def _eval(self) -> Iterator[None]:
        modules = [m for _, _, m in self._named_modules()]
        modes = [m.training for m in modules]
        try:
            for m in modules:
                m.eval()
            # no_grad, not inference_mode: inference tensors could not be used later in
            # autograd (e.g. codes from encode() fed to prior.loss() for fine-tuning).
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def check_condition_names(self, names: Iterable[str]) -> None:
        """Refuse a set of condition names this pipeline cannot draw from: an unknown name, or
        one left out that the prior never learned to do without (``cond_dropout_each``; with
        no name given, every condition counts as left out)."""
        given = set(names)
        optional = set(getattr(self.prior.config, "optional_conditions", tuple)())
        unknown = sorted(given - set(self.conditioners))
        left_out = set(self.conditioners) - given
        missing = sorted(left_out - optional) if given else sorted(left_out)
        if unknown or missing:
            parts = ([f"unknown {unknown}"] if unknown else []) + (
                [f"missing {missing}"] if missing else []
            )
            may = f" ({', '.join(sorted(optional))} may be left out)" if optional else ""
            raise InputError(
                f"conditions do not match this pipeline ({'; '.join(parts)}): it takes "
                f"{', '.join(f'{n}=...' for n in self.conditioners) or 'no conditions'}{may}."
            )

    def condition(
        self, size: tuple[int, int] | int | None = None, **raw: Any
    ) -> dict[str, Conditioning]:
        """Encode raw conditions by conditioner name; unknown or missing names are errors.

        ``size`` is the image size ``(H, W)``: each spatial condition must fit it and its grid
        is then the code grid. None: the size the spatial conditions imply, else the card's.
        A condition the prior learned to do without (``cond_dropout_each``) may be left out
        when another is given: it is passed as the prior's null condition.
        """
        self.check_condition_names(raw)
        optional = set(getattr(self.prior.config, "optional_conditions", tuple)())
        left_out = set(self.conditioners) - set(raw)
        device = self.device
        spatial = {n for n, c in self.conditioners.items() if isinstance(c, SpatialConditioner)}
        if not spatial or not raw:
            out = {n: self.conditioners[n].encode(v).to(device) for n, v in raw.items()}
            self._check_null_rows(out, optional)
            return self._null_conditions(out, left_out, None)
        hw = self._size(size, raw)
        grid = self.tokenizer.code_grid(hw)
        out = {}
        for n, v in raw.items():
            cond = self.conditioners[n]
            c = cond.encode(v, size=hw) if n in spatial else cond.encode(v)  # type: ignore[call-arg]
            if n in spatial and c.grid != self._condition_grid(cond, grid):
                raise InputError(
                    f"condition '{n}' makes a {c.grid} token grid but a {hw[0]}x{hw[1]} image "
                    f"has a {grid} code grid; give a {n} map for that size."
                )
            out[n] = c.to(device)
        self._check_null_rows(out, optional)
        return self._null_conditions(out, left_out, grid)

    def _check_null_rows(self, conds: Mapping[str, Conditioning], optional: set[str]) -> None:
        """Rows a conditioner gave as dropped (a label of -1) need a null the prior learned."""
        learned = float(getattr(self.prior.config, "cond_dropout", 0.0) or 0.0) > 0
        for n, c in conds.items():
            if c.drop is not None and bool(c.drop.any()) and not (learned or n in optional):
                raise InputError(
                    f"condition '{n}' has unlabelled rows (-1), which stand for the prior's "
                    f"null {n}, but this prior was trained without dropping it (cond_dropout "
                    f"0 and no cond_dropout_each.{n}), so its null means nothing: give a value "
                    f"for every row, or train the prior with cond_dropout > 0."
                )

    def _null_conditions(
        self,
        given: dict[str, Conditioning],
        names: set[str],
        grid: tuple[int, int] | None,
    ) -> dict[str, Conditioning]:
        """``given`` plus each of ``names`` as the prior's null condition, batched alike."""
        if not names or not given:
            return given
        b = next(iter(given.values())).batch_size
        out = dict(given)
        for n in sorted(names):
            slot = self.prior.config.conditions[n]
            cond = self.conditioners[n]
            g = self._condition_grid(cond, grid) if isinstance(cond, SpatialConditioner) else None
            count = g[0] * g[1] if g is not None else slot.num_tokens
            tokens = torch.zeros(b, count, dtype=torch.long, device=self.device)  # [B, n]
            out[n] = Conditioning(tokens, cond.vocab_size, grid=g).null()
        return out

    def _condition_grid(
        self, cond: Conditioner, grid: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        """The token grid of spatial ``cond`` for code ``grid``: the same, or a factor coarser."""
        if grid is None:
            return None
        k = int(getattr(cond, "image_downsample", 0) or 0) // self.tokenizer.downsample
        return grid if k <= 1 else (grid[0] // k, grid[1] // k)

    def _size(self, size: tuple[int, int] | int | None, raw: Mapping[str, Any]) -> tuple[int, int]:
        """The image size: ``size``, else the one the spatial conditions imply, else the card's."""
        if size is not None:
            return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        implied = {}
        for n, v in raw.items():
            cond = self.conditioners.get(n)
            if isinstance(cond, SpatialConditioner):
                hw = cond.image_size_of(v)
                if hw is not None:
                    implied[n] = hw
        if len(set(implied.values())) > 1:
            sizes = ", ".join(f"{n}: {h}x{w}" for n, (h, w) in implied.items())
            raise InputError(
                f"the spatial conditions imply different image sizes ({sizes}); give maps "
                "for one image size."
            )
        if implied:
            return next(iter(implied.values()))
        card = self.card.get("image_size")
        if card is None:
            for n in raw:
                cond = self.conditioners.get(n)
                default = (
                    cond.default_image_size() if isinstance(cond, SpatialConditioner) else None
                )
                if default is not None:
                    return default  # e.g. a pose's heatmap size: keypoints imply no size
            raise InputError(
                "no image size given and the pipeline card has none: pass size=(H, W) "
                "(`--size HxW` on the command line)."
            )
        return (card, card) if isinstance(card, int) else (int(card[0]), int(card[1]))

    def _grid(self, size: tuple[int, int] | int | None) -> tuple[int, int]:
        if size is None:
            size = self.card.get("image_size")
            if size is None:
                raise InputError(
                    "no image size given and the pipeline card has none: pass size=(H, W) "
                    "(`--size HxW` on the command line)."
                )
        if isinstance(size, int):
            size = (size, size)
        return self.tokenizer.code_grid((int(size[0]), int(size[1])))

    def sample_codes(
        self,
        num_images: int | None = None,
        *,
        size: tuple[int, int] | int | None = None,
        sampler: SamplerConfig | Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        prefix: Tensor | None = None,
        progress: bool = False,
        on_code: Callable[[int, int], None] | None = None,
        **conditions: Any,
    ) -> Tensor:
        """Draw code grids ``[B, h, w]`` from the prior (see ``__call__``)."""
        _check_num_images(num_images)
        if sampler is not None and not isinstance(sampler, SamplerConfig):
            sampler = SamplerConfig(**sampler)
        with self._eval():
            spatial = any(isinstance(c, SpatialConditioner) for c in self.conditioners.values())
            if spatial and conditions:
                size = self._size(size, conditions)
            grid = self._grid(size)
            conds = self.condition(size, **conditions)
            if conds:
                b = next(iter(conds.values())).batch_size
                n = b if num_images is None else num_images
                if n % b:
                    raise InputError(
                        f"num_images={n} must be a multiple of the {b} conditions given "
                        f"(each condition gets num_images / {b} images): ask for {b} or "
                        f"{2 * b} images (`-n` on the command line), or give a number of "
                        f"conditions that divides {n}."
                    )
                if n != b:
                    conds = {k: c.repeat(n // b) for k, c in conds.items()}
            else:
                n = 1 if num_images is None else num_images
            if n < 1:
                raise InputError(f"num_images must be >= 1, got {n}.")
            # Only when asked: a plugin prior that overrides sample() may not take them.
            extra: dict[str, Any] = {}
            if progress:
                extra["progress"] = True
            if on_code is not None:
                extra["on_code"] = on_code
            if self.rejection is not None:
                return self._sample_rejected(
                    conds, grid, sampler or self.sampler, generator, prefix, extra
                )
            return self.prior.sample(
                conds or None,
                grid=grid,
                sampler=sampler or self.sampler,
                generator=generator,
                num_samples=n,
                prefix=prefix,
                **extra,
            )

    def _sample_rejected(
        self,
        conds: dict[str, Conditioning],
        grid: tuple[int, int],
        sampler: SamplerConfig,
        generator: torch.Generator | None,
        prefix: Tensor | None,
        extra: Mapping[str, Any],
    ) -> Tensor:
        """Codes of the candidates ``self.rejection``'s classifier scores highest (see there).

        ``extra`` (progress, on_code) applies to each batch of candidates.
        """
        from latentgen.conditioners.label import ClassLabelConditioner
        from latentgen.rejection import check_classifier, reject, take_rows

        cfg = self.rejection
        assert cfg is not None
        classes = [n for n, c in self.conditioners.items() if isinstance(c, ClassLabelConditioner)]
        name = cfg.condition
        if name is None and len(classes) == 1:
            name = classes[0]
        if name not in classes:
            raise InputError(
                "rejection sampling keeps the candidates a classifier scores highest for the "
                f"requested class, so it needs a class_label condition; this pipeline has "
                f"{sorted(self.conditioners) or 'no conditions'} (class_label: "
                f"{classes or 'none'}). "
                + (
                    f"Set RejectionConfig(condition=...) to one of {classes}."
                    if classes
                    else "Sample without rejection, or use a class-conditional pipeline."
                )
            )
        k = self.conditioners[name].vocab_size
        f = self.tokenizer.downsample
        check_classifier(
            cfg.classifier,
            num_classes=k,
            image_size=(grid[0] * f, grid[1] * f),
            in_channels=self.tokenizer.in_channels,
            what=f"this pipeline (condition '{name}')",
        )
        n = conds[name].batch_size

        def draw(index: Tensor) -> Tensor:
            rows = None
            if prefix is not None:
                rows = prefix[index.to(prefix.device)] if prefix.shape[0] == n else prefix
            return self.prior.sample(
                take_rows(conds, index),
                grid=grid,
                sampler=sampler,
                generator=generator,
                num_samples=int(index.numel()),
                prefix=rows,
                **extra,
            )

        codes, self.last_rejection = reject(
            cfg,
            labels=conds[name].tokens[:, 0],
            num_classes=k,
            conds=conds,
            draw=draw,
            decode=self.tokenizer.decode,
            prefix=prefix if prefix is not None and prefix.shape[0] == n else None,
        )
        return codes

    def __call__(
        self,
        num_images: int | None = None,
        *,
        size: tuple[int, int] | int | None = None,
        sampler: SamplerConfig | Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        output_type: Literal["pil", "tensor"] = "pil",
        prefix: Tensor | None = None,
        progress: bool = False,
        on_code: Callable[[int, int], None] | None = None,
        tile_mode: TileMode = "blend",
        **conditions: Any,
    ) -> Any:
        """Generate images.

        Args:
            num_images: how many; with conditions, a multiple of their batch (default: one each).
            size: image size ``(H, W)`` or one int; defaults to the card's ``image_size``. A
                size whose code grid is larger than the prior's trained window is drawn with
                the sliding window (``sampler.window``: ``"cached"`` or ``"exact"``) and
                decoded in tiles (``decode``).
            sampler: overrides the pipeline's default sampler for this call (a
                ``SamplerConfig`` or a mapping of its fields, e.g. ``{"window": "exact"}``).
            generator: a seeded ``torch.Generator`` makes the draw reproducible.
            output_type: ``"pil"`` for a list of PIL images, ``"tensor"`` for ``[B, C, H, W]``.
            prefix: codes ``[B, h, w]`` with -1 where codes are to be drawn (completion).
            progress: show a progress bar over the codes of a sliding-window draw.
            on_code: called as ``on_code(done, total)`` as codes are drawn (``Prior.sample``);
                raising in it stops the draw (a UI's cancel button).
            tile_mode: how a grid larger than a tile is decoded (``decode``): ``"blend"``
                (cross-faded tiles) or ``"exact"`` (the whole decode's result, slower).
            **conditions: raw conditions by conditioner name, e.g. ``label=[3, 7]``.
        """
        if tile_mode == "exact" and not exact_tiling_supported(self.tokenizer):
            raise InputError(exact_tiling_error(self.tokenizer))  # before the draw, not after
        codes = self.sample_codes(
            num_images,
            size=size,
            sampler=sampler,
            generator=generator,
            prefix=prefix,
            progress=progress,
            on_code=on_code,
            **conditions,
        )
        images = self.decode(codes, tile_mode=tile_mode)
        if output_type == "tensor":
            return images
        if output_type != "pil":
            raise InputError(f"output_type must be 'pil' or 'tensor', got {output_type!r}.")
        from latentgen.data.base import to_pil

        return to_pil(images)

    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> codes ``[B, h, w]``."""
        with self._eval():
            return self.tokenizer.encode(images.to(self.device))

    def decode(
        self,
        codes: Tensor,
        *,
        tiled: bool | None = None,
        tile: int | tuple[int, int] = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        tile_mode: TileMode = "blend",
    ) -> Tensor:
        """Codes ``[B, h, w]`` -> images ``[B, C, H, W]``.

        A grid larger than ``tile`` codes on a side is decoded in tiles
        (``latentgen.tokenizers.tiling``), so memory follows the tile, not the image;
        ``tiled=False`` always decodes whole, ``tiled=True`` always tiles. ``tile_mode``:
        ``"blend"`` (overlapping tiles cross-faded, one decode's work) or ``"exact"`` (the
        whole decode's result, for VQ-VAE / VQGAN decoders, at several decodes' work).
        """
        self.tokenizer.check_codes(codes)
        grid = (int(codes.shape[1]), int(codes.shape[2]))
        with self._eval():
            codes = codes.to(self.device)
            if tiled or (tiled is None and needs_tiling(grid, tile)):
                return decode_tiled(self.tokenizer, codes, tile, overlap, tile_mode)
            return self.tokenizer.decode(codes)

    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images))

    def log_likelihood(
        self,
        images: Tensor,
        *,
        window: Literal["exact", "cached"] | None = None,
        **conditions: Any,
    ) -> Tensor:
        """Log-likelihood ``[B]`` in nats of each image's code grid under the prior.

        ``window`` scores with the sliding window of that mode (``Prior.window_log_prob``); by
        default a grid larger than the prior models directly is scored with the mode of the
        pipeline's sampler, and any other grid with ``Prior.log_prob``. The window's size,
        stride, band and margin are the sampler's, so a code is scored from the window that
        draws it.
        """
        codes = self.encode(images)
        with self._eval():
            conds = self.condition((int(images.shape[2]), int(images.shape[3])), **conditions)
            grid = (int(codes.shape[1]), int(codes.shape[2]))
            windowed = window is not None or self.prior.resolve_window(grid, None) is not None
            if not windowed:
                return self.prior.log_prob(codes, conds or None)
            return self.prior.window_log_prob(
                codes,
                conds or None,
                window=window or self.sampler.window,
                window_size=self.sampler.window_size,
                window_band=self.sampler.window_band,
                window_stride=self.sampler.window_stride,
                window_margin=self.sampler.window_margin,
            )

    def __repr__(self) -> str:
        conds = ", ".join(f"{n}={c.config.type}" for n, c in self.conditioners.items())
        return (
            f"Pipeline(tokenizer={self.tokenizer.config.type}, prior={self.prior.config.type}"
            + (f", conditioners[{conds}]" if conds else "")
            + ")"
        )


def _check_num_images(num_images: Any) -> None:
    """``num_images`` is None (one per condition, or one) or a whole number >= 1."""
    if num_images is None:
        return
    if isinstance(num_images, bool) or not isinstance(num_images, Integral):
        raise InputError(
            f"num_images must be a whole number >= 1 (or None), got {num_images!r} of type "
            f"{type(num_images).__name__}."
        )
    if num_images < 1:
        raise InputError(
            f"num_images must be >= 1, got {num_images}; leave it out (None) for one image, or "
            "one per condition when conditions are given."
        )
