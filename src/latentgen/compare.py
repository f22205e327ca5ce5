"""``latentgen compare``: train several priors on the same codes with the same budget, measure each.

    from latentgen.compare import load_compare_config, run_compare

    result = run_compare(load_compare_config("compare.yaml"))
    print(result.table())                    # one row per budget and prior
    # result.curves_png: learning curves; result.jsonl: the rows as JSON lines

The paper's Table 1 (Esser et al.) compares a transformer with PixelSNAIL at equal training
steps and at equal wall-clock time. Every prior here trains on one code cache (one tokenizer,
encoded once) with the same trainer options; a ``seconds`` budget becomes each prior's own step
count from its measured time per step (a short calibration run), so each finishes its learning
rate schedule within the same wall-clock time. Each is then measured the same way: held-out NLL
in bits per code, sampling speed in codes per second, and, given a classifier, the figures of
``latentgen eval samples`` (class accuracy, KID, FID in the classifier's feature space).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from latentgen.errors import SpecError
from latentgen.specs import SamplerConfig, component_field, load_model, spec_error

if TYPE_CHECKING:
    from latentgen.specs import ComponentConfig

    DatasetField = ComponentConfig
    PriorField = ComponentConfig
    TokenizerField = ComponentConfig
    ConditionerField = ComponentConfig
else:
    DatasetField = component_field("dataset")
    PriorField = component_field("prior")
    TokenizerField = component_field("tokenizer")
    ConditionerField = component_field("conditioner")

__all__ = [
    "SHIPPED",
    "Budget",
    "CompareConfig",
    "CompareResult",
    "load_compare_config",
    "run_compare",
    "shipped_weights",
]

#: Prefix of a shipped weights name in a config (``latentgen:shapes-classifier``).
SHIPPED = "latentgen:"


def shipped_weights(name: str) -> Path:
    """The directory of the weights named ``name`` shipped in ``latentgen/weights``."""
    from importlib import resources

    root = Path(str(resources.files("latentgen") / "weights"))
    path = root / name
    if not name or "/" in name or not (path / "component.json").is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "component.json").is_file())
        raise ValueError(
            f"no weights {SHIPPED}{name} ship with latentgen; the shipped ones are "
            f"{', '.join(SHIPPED + k for k in known)} (or give the path of a saved classifier)."
        )
    return path


# Trainer options a compare config may not set per se: the budget and the run's place are its own.
_RESERVED = ("run_name", "runs_dir", "max_steps")


class Budget(BaseModel):
    """Train every prior for ``steps`` optimizer steps, or for ``seconds`` of wall-clock time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(None, ge=1, description="Equal optimizer steps.")
    seconds: float | None = Field(None, gt=0, description="Equal wall-clock training time.")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError(
                "a budget is either {steps: N} (equal steps) or {seconds: T} (equal time), "
                f"got {'both' if self.steps else 'neither'}."
            )
        return self

    @property
    def label(self) -> str:
        """``steps=N`` or ``time=Ts``."""
        return f"steps={self.steps}" if self.steps is not None else f"time={self.seconds:g}s"


class Evaluation(BaseModel):
    """How each trained prior is measured after training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    held_out_images: int = Field(256, ge=1, description="Held-out images scored for the NLL.")
    sample_batch: int = Field(16, ge=1, description="Samples drawn at once to time sampling.")
    classifier: Path | None = Field(
        None,
        description="Saved classifier: adds eval-samples figures (accuracy, KID, FID) to a "
        "comparison of priors, and the share of reconstructions read as their class to one of "
        "tokenizers. "
        "`latentgen:NAME` names one shipped with latentgen (latentgen:shapes-classifier, the "
        "reference for the shapes data).",
    )
    num_samples: int = Field(20, ge=1, description="eval samples: samples per class (or in all).")
    kid_subset_size: int = Field(50, ge=2, description="eval samples: KID subset size.")
    kid_subsets: int = Field(50, ge=1, description="eval samples: KID subsets.")
    acceptance_rate: float | None = Field(
        None, gt=0, le=1, description="eval samples: also with rejection sampling at this rate."
    )
    steps: list[int] = Field(
        default_factory=list,
        description="Sampling passes T to measure one by one for a prior that decodes in passes "
        "(the masked prior): one row per T, each with its own codes/s and eval-samples figures. "
        "Empty: the sampler's steps only. Autoregressive priors get one row.",
    )

    refine_steps: list[int] = Field(
        default_factory=list,
        description="Refinement passes K (SamplerConfig.refine_steps) to measure one by one for "
        "a prior that decodes in passes: one row per T and K, with a refine_steps column. "
        "Empty: the sampler's refine_steps only.",
    )

    @field_validator("classifier", mode="before")
    @classmethod
    def _shipped(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(SHIPPED):
            return shipped_weights(value[len(SHIPPED) :])
        return value

    @field_validator("steps", "refine_steps")
    @classmethod
    def _counts(cls, value: list[int], info: ValidationInfo) -> list[int]:
        passes = info.field_name == "steps"
        bad = [t for t in value if t < (1 if passes else 0)]
        if bad:
            raise ValueError(
                f"steps {bad}: a sampling pass count is at least 1; list values such as "
                "[8, 12, 16]."
                if passes
                else f"refine_steps {bad}: a count of refinement passes is at least 0 (0: "
                "none); list values such as [0, 2]."
            )
        return value


class CompareConfig(BaseModel):
    """``latentgen compare --config``: priors, shared codes and trainer options, budgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("compare", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out_dir: Path = Field(Path("runs/compare"), description="Runs, table, curves go here.")
    tokenizer_path: Path | None = Field(
        None, description="Priors: the trained tokenizer whose codes they all model."
    )
    data: DatasetField = Field(description="Training images (encoded once to a code cache).")
    held_out: DatasetField = Field(description="Held-out images for NLL and eval samples.")
    conditioners: dict[str, ConditionerField] = Field(
        default_factory=dict, description="Conditioners every prior is conditioned on."
    )
    condition_keys: dict[str, str] = Field(
        default_factory=dict, description="Dataset key of each conditioner (default: its name)."
    )
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    priors: dict[str, PriorField] = Field(
        default_factory=dict, description="Priors to compare, by name (on tokenizer_path's codes)."
    )
    tokenizers: dict[str, TokenizerField] = Field(
        default_factory=dict, description="Or tokenizers to compare, by name (trained on data)."
    )
    budgets: list[Budget] = Field(min_length=1, description="Each is a separate set of runs.")
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainerConfig options shared by every run (not run_name, runs_dir, "
        "max_steps: the budget and out_dir set them).",
    )
    calibration_steps: int = Field(
        20, ge=6, description="Steps timed to turn a seconds budget into each prior's steps."
    )
    evaluation: Evaluation = Field(default_factory=Evaluation)

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if bool(self.priors) == bool(self.tokenizers):
            which = "both are given" if self.priors else "both are empty"
            raise ValueError(
                "give `priors` (trained on the codes of tokenizer_path) or `tokenizers` (trained "
                f"on data), one kind per comparison; {which}."
            )
        if self.priors and self.tokenizer_path is None:
            raise ValueError(
                "priors are trained on a tokenizer's codes: set tokenizer_path to a trained "
                "tokenizer (latentgen train tokenizer ...)."
            )
        if self.tokenizers and self.conditioners:
            raise ValueError(
                "conditioners condition priors; a tokenizer comparison takes none: remove them."
            )
        reserved = sorted(set(self.trainer) & set(_RESERVED))
        if reserved:
            raise ValueError(
                f"trainer sets {reserved}, which compare sets itself: give the length of "
                "training in `budgets` ({steps: N} or {seconds: T}) and the place in `out_dir`."
            )
        from latentgen.training.config import TrainerConfig

        # Validated at the shortest step budget (a warmup must fit in it); a time budget's
        # steps are only known once timed, so it is checked when its run starts.
        shortest = min((b.steps for b in self.budgets if b.steps is not None), default=None)
        TrainerConfig(run_name="check", max_steps=shortest or 1_000_000, **self.trainer)
        for name, prior in self.priors.items():
            want = set(getattr(prior, "conditions", None) or {})
            if want != set(self.conditioners):
                raise ValueError(
                    f"prior '{name}' is built for conditions {sorted(want) or 'none'} but the "
                    f"config's conditioners are {sorted(self.conditioners) or 'none'}; make "
                    "them name the same conditions."
                )
        return self


def load_compare_config(source: str | Path | Mapping[str, Any]) -> CompareConfig:
    """Read and validate a compare config (``.yaml``/``.json`` file or mapping)."""
    if isinstance(source, Mapping):
        try:
            return CompareConfig.model_validate(dict(source))
        except ValidationError as e:
            raise spec_error(e, "the compare config", "compare config") from None
    return load_model(source, CompareConfig, "compare config")


@dataclass
class CompareResult:
    """The rows (one per budget and prior), learning curves and the files written."""

    rows: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    jsonl: Path | None = None
    curves_png: Path | None = None

    def table(self) -> str:
        """The rows as an aligned text table."""
        from latentgen.sample_eval import format_table

        return format_table(self.rows)


def _curve(run_dir: Path, start: float, scale: float = 1.0) -> list[tuple[int, float, float]]:
    """(step, seconds since start, training loss * scale) from the run's ``metrics.jsonl``."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append((int(rec["step"]), float(rec["time"]) - start, rec["loss"] * scale))
    return out


class _Runner:
    """Trains and measures the priors (on one code cache) or tokenizers of a compare config."""

    def __init__(self, cfg: CompareConfig, tokenizer: Any, data: Any, device: torch.device):
        # data: the code cache (priors) or the image dataset (tokenizers)
        self.cfg, self.tokenizer, self.data, self.device = cfg, tokenizer, data, device
        self.keys = {n: cfg.condition_keys.get(n, n) for n in cfg.conditioners}

    def _task(self, name: str) -> Any:
        from torch.utils.data import default_collate

        from latentgen import registry
        from latentgen.training.tasks import PriorTask, TokenizerTask

        cfg = self.cfg
        if cfg.tokenizers:
            return TokenizerTask(registry.build("tokenizer", cfg.tokenizers[name]))
        prior = registry.build("prior", cfg.priors[name])
        conds = {n: registry.build("conditioner", c) for n, c in cfg.conditioners.items()}
        n = min(8, len(self.data))
        return PriorTask(
            prior,
            conds,
            tokenizer=self.tokenizer,
            condition_keys=self.keys,
            grid_batch=default_collate([self.data[i] for i in range(n)]),
            data_fingerprint=self.data.fingerprint,
            sampler=cfg.sampler,
        )

    def train(
        self,
        name: str,
        steps: int,
        run_name: str,
        progress: bool,
        log_every: int | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> tuple[Any, float]:
        from latentgen.training.config import TrainerConfig
        from latentgen.training.loop import Trainer

        cfg = self.cfg
        seed = int(cfg.trainer.get("seed", 0))
        torch.manual_seed(seed)  # every model starts from its config's seeded weights
        task = self._task(name)
        options = {
            "device": "cuda" if self.device.type == "cuda" else "cpu",
            "log_every": max(1, steps // 50),
            "checkpoint_every": steps,
            "grid_every": None,
            "progress": "auto" if progress else "off",
            **cfg.trainer,
            **({"log_every": log_every} if log_every else {}),
            **(overrides or {}),
        }
        tcfg = TrainerConfig(
            run_name=run_name, runs_dir=cfg.out_dir / cfg.name, max_steps=steps, **options
        )
        if tcfg.run_dir.exists():  # a finished or broken earlier run: compare trains afresh
            shutil.rmtree(tcfg.run_dir)
        t0 = time.time()
        result = Trainer(task, self.data, tcfg).fit()
        return result, t0

    def seconds_per_step(self, name: str) -> float:
        """Measured time per optimizer step of model ``name`` (first steps excluded)."""
        k = self.cfg.calibration_steps
        # A constant schedule: a warmup longer than these few steps is refused with a cosine
        # one, and the learning rate does not change what a step costs.
        result, _ = self.train(
            name,
            k,
            f"calibrate-{name}",
            progress=False,
            log_every=1,
            overrides={"lr_schedule": "constant"},
        )
        times = [
            json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        shutil.rmtree(result.run_dir, ignore_errors=True)
        # one metrics line per step: time from the 5th to the last (start-up excluded)
        first = next(r for r in times if r["step"] >= 5)
        last = times[-1]
        return (last["time"] - first["time"]) / max(1, last["step"] - first["step"])

    def measure_tokenizer(self, path: Path) -> dict[str, Any]:
        from latentgen.artifact import load_component
        from latentgen.evaluation import evaluate_tokenizer

        ev = self.cfg.evaluation
        held = _dataset(self.cfg.held_out)
        tok = load_component(path, "tokenizer").to(self.device).eval()
        t0 = time.perf_counter()
        # With a classifier, also the share of reconstructions it reads as their class (the
        # per-class figures stay out of the table: `latentgen eval tokenizer` prints them).
        scores = evaluate_tokenizer(
            tok,
            held,
            limit=ev.held_out_images,
            lpips=False,
            classifier=ev.classifier,
            device=self.device,
        )
        out = {
            k: v
            for k, v in scores.as_dict().items()
            if k not in ("images", "labelled_images") and not k.startswith("class_accuracy/")
        }
        out["eval_images_per_s"] = scores.images / (time.perf_counter() - t0)
        return out

    def measure(self, pipe: Any) -> list[dict[str, Any]]:
        """Held-out NLL, then sampling figures: one row, or for a prior that decodes in passes
        one per T of ``evaluation.steps`` and K of ``evaluation.refine_steps``."""
        from latentgen.evaluation import evaluate_prior

        cfg, ev = self.cfg, self.cfg.evaluation
        held = _dataset(cfg.held_out)
        nll = evaluate_prior(
            pipe, held, limit=ev.held_out_images, condition_keys=self.keys, device=self.device
        )
        row: dict[str, Any] = {"held_out_bits_per_code": nll.bits_per_code}
        # A masked prior's figure is its ELBO: an upper bound on the NLL, not the exact NLL.
        row["nll_is_upper_bound"] = nll.nll_is_upper_bound
        if not pipe.prior.decodes_in_passes:
            mode: dict[str, int | None] = {"sample_steps": None, "refine_steps": None}
            return [row | mode | self.measure_samples(pipe, cfg.sampler, held)]
        rows = []
        steps: list[int | None] = list(ev.steps) or [cfg.sampler.steps]
        for t in steps:
            for k in ev.refine_steps or [cfg.sampler.refine_steps]:
                sampler = cfg.sampler.model_copy(update={"steps": t, "refine_steps": k})
                mode = {"sample_steps": t, "refine_steps": k}
                rows.append(row | mode | self.measure_samples(pipe, sampler, held))
        return rows

    def measure_samples(self, pipe: Any, sampler: Any, held: Any) -> dict[str, Any]:
        """Sampling speed in codes/s and, given a classifier, the eval-samples figures."""
        ev = self.cfg.evaluation
        row: dict[str, Any] = {}
        raw = {}
        if pipe.conditioners:
            from torch.utils.data import default_collate

            batch = default_collate([held[i] for i in range(min(ev.sample_batch, len(held)))])
            raw = {n: batch[k] for n, k in self.keys.items()}
        gen = torch.Generator(self.device).manual_seed(0)
        n = None if raw else ev.sample_batch
        t0 = time.perf_counter()
        codes = pipe.sample_codes(n, generator=gen, sampler=sampler, **raw)
        row["sample_codes_per_s"] = codes.numel() / (time.perf_counter() - t0)
        if ev.classifier is not None:
            from latentgen.sample_eval import evaluate_samples

            results = evaluate_samples(
                pipe,
                ev.classifier,
                held,
                num_samples=ev.num_samples,
                rejection=ev.acceptance_rate,
                kid_subset_size=ev.kid_subset_size,
                kid_subsets=ev.kid_subsets,
                sampler=sampler,
                condition_keys=self.keys,
            )
            for r in results:
                tag = "" if r.name == "plain" else f"{r.name}_"
                d = r.as_dict()
                # the condition agreement measures (e.g. segmentation_main_class_accuracy)
                # follow, so a spatially conditioned comparison has its own quality column
                for key in ("class_accuracy", "kid", "kid_std_error", "fid", *r.agreement):
                    if key in d:
                        row[tag + key] = d[key]
        return row


def _dataset(config: Any) -> Any:
    from latentgen import registry

    return registry.build("dataset", config)


def run_compare(
    config: CompareConfig | str | Path | Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> CompareResult:
    """Train every prior (or tokenizer) under every budget alike, measure each; write the files.

    Priors train on one code cache of ``tokenizer_path``'s codes and are measured by held-out
    NLL, sampling speed and eval-samples figures; tokenizers train on ``data`` and are measured
    by held-out PSNR, SSIM and codebook usage. Writes ``out_dir/name/``: one run per budget and
    model, ``results.jsonl`` (the rows) and ``curves.png`` (training loss against steps, or
    against seconds for time budgets), each atomically.
    """
    from latentgen.artifact import load_component
    from latentgen.data.code_cache import open_or_build_code_cache
    from latentgen.pipeline import Pipeline
    from latentgen.plot import Panel, save_line_chart
    from latentgen.training.loop import FLUSH_DENORMAL_DEFAULT, flush_denormals

    cfg = config if isinstance(config, CompareConfig) else load_compare_config(config)
    # before any model or data is built, as `latentgen train` does (TrainerConfig.flush_denormal)
    flush_denormals(bool(cfg.trainer.get("flush_denormal", FLUSH_DENORMAL_DEFAULT)))
    dev = torch.device(device)
    root = cfg.out_dir / cfg.name
    kind = "tokenizer" if cfg.tokenizers else "prior"
    tokenizer = None
    if kind == "prior":
        assert cfg.tokenizer_path is not None  # the config checks it
        tokenizer = load_component(cfg.tokenizer_path, "tokenizer").to(dev).eval()
        for name, prior in cfg.priors.items():
            vocab = getattr(prior, "vocab_size", None)
            if vocab is not None and vocab != tokenizer.vocab_size:
                raise SpecError(
                    f"prior '{name}' predicts {vocab} codes but the tokenizer in "
                    f"{cfg.tokenizer_path} has {tokenizer.vocab_size}: set "
                    f"priors.{name}.vocab_size = {tokenizer.vocab_size}."
                )
        keys = {n: cfg.condition_keys.get(n, n) for n in cfg.conditioners}
        data = open_or_build_code_cache(
            tokenizer,
            _dataset(cfg.data),
            root / "code_cache",
            64,
            sorted(set(keys.values())),
            device=dev,
        )
    else:
        data = _dataset(cfg.data)
    runner = _Runner(cfg, tokenizer, data, dev)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[int, float, float]]] = {}
    panels = []
    names = list(cfg.priors or cfg.tokenizers)
    for budget in cfg.budgets:
        series: dict[str, list[tuple[float, float]]] = {}
        for name in names:
            per_step = None
            if budget.seconds is not None:
                per_step = runner.seconds_per_step(name)
                steps = max(1, int(budget.seconds / per_step))
            else:
                steps = int(budget.steps or 1)
            run_name = f"{budget.label.replace('=', '-')}-{name}"
            result, start = runner.train(name, steps, run_name, progress)
            train_s = time.time() - start
            row: dict[str, Any] = {"budget": budget.label, kind: name}
            if kind == "prior":
                pipe = Pipeline.from_pretrained(result.export).to(dev)
                row["params"] = sum(p.numel() for p in pipe.prior.parameters())
            row["steps"] = result.step
            row["train_s"] = train_s
            row["s_per_step"] = per_step if per_step is not None else train_s / result.step
            if kind == "prior":
                rows.extend(row | measured for measured in runner.measure(pipe))
            else:
                rows.append(row | runner.measure_tokenizer(result.export))
            # a prior's loss is its NLL in nats per code: plotted in bits
            curve = _curve(result.run_dir, start, 1 / math.log(2) if kind == "prior" else 1.0)
            curves[f"{budget.label} {name}"] = curve
            by_time = budget.seconds is not None
            series[name] = [(t if by_time else s, y) for s, t, y in curve]
        panels.append(
            Panel(
                f"{budget.label}: training loss",
                "seconds" if budget.seconds is not None else "step",
                "bits/code" if kind == "prior" else "loss",
                series,
            )
        )
    from latentgen.files import atomic_write_bytes

    jsonl = root / "results.jsonl"
    atomic_write_bytes(jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
    png = root / "curves.png"
    save_line_chart(panels, png)
    return CompareResult(rows, curves, jsonl, png)
