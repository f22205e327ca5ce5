"""Training options: ``TrainerConfig`` for the loop, and the files ``latentgen train`` reads.

    trainer = TrainerConfig(run_name="shapes-vqgan", max_steps=20_000, batch_size=16, lr=4.5e-6)
    cfg = load_train_config("cfg.yaml", TokenizerTrainConfig)

``batch_size`` is per process and per micro-batch: one optimizer step sees
``batch_size * grad_accum * world_size`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from latentgen.specs import (
    ComponentConfig,
    PipelineSpec,
    TokenizerSpec,
    component_field,
    load_model,
    spec_error,
)

__all__ = [
    "RESUME_KEYS",
    "PriorTrainConfig",
    "TokenizerTrainConfig",
    "TrainConfig",
    "TrainerConfig",
    "load_train_config",
]

#: Trainer fields that must match for ``--resume`` to continue the same run bit for bit. The
#: others (max_steps, logging, checkpoint cadence, workers, progress bar) may change on resume.
RESUME_KEYS = (
    "batch_size",
    "lr",
    "betas",
    "weight_decay",
    "warmup_steps",
    "decay_steps",
    "min_lr_ratio",
    "lr_schedule",
    "grad_accum",
    "grad_clip",
    "amp",
    "ema_decay",
    "seed",
)


if TYPE_CHECKING:  # the validators dispatch through the registry; mypy sees the base class
    DatasetField = ComponentConfig
    TokenizerField = ComponentConfig
else:
    DatasetField = component_field("dataset")
    TokenizerField = TokenizerSpec


class TrainerConfig(BaseModel):
    """Options of the training loop shared by both stages (``latentgen.training.Trainer``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of the run; files go to `runs_dir/run_name/`. Letters, digits, `._-`.",
    )
    runs_dir: Path = Field(Path("runs"), description="Folder holding one sub-folder per run.")
    max_steps: int = Field(ge=1, le=100_000_000, description="Optimizer steps to train for.")
    batch_size: int = Field(
        ge=1,
        le=65_536,
        description="Samples per micro-batch per process; a step sees batch_size * grad_accum * "
        "world_size samples.",
    )
    lr: float = Field(gt=0, le=10, description="Peak learning rate (reached after warmup).")
    betas: tuple[float, float] = Field(
        (0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1). VQGAN uses (0.5, 0.9)."
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        le=10,
        description="AdamW decoupled weight decay, applied to weights with 2+ dims only "
        "(not biases, norms or embeddings of 1 dim). See arXiv 1711.05101.",
    )
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        description="After warmup: 'cosine' decays to lr * min_lr_ratio over decay_steps "
        "(arXiv 1608.03983, no restarts); 'constant' keeps lr.",
    )
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup from 0 to lr over this many steps."
    )
    decay_steps: int | None = Field(
        None,
        ge=1,
        description="Step at which the cosine reaches its floor (None: max_steps). Set it when "
        "a run will be extended with --resume, so the schedule does not depend on max_steps.",
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Floor of the cosine schedule as a fraction of lr."
    )
    grad_accum: int = Field(
        1, ge=1, le=4096, description="Micro-batches whose gradients are summed per step."
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient L2 norm to this value (None: no clip)."
    )
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto",
        description="Mixed precision: 'auto' is bf16 autocast on CUDA and off on CPU; 'bf16' "
        "forces bf16 autocast (also on CPU); 'off' runs fp32.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights with this decay "
        "(e.g. 0.999); it is saved, and used for grids and the exported model. None: off.",
    )
    log_every: int = Field(
        10, ge=1, description="Write a metrics.jsonl line every this many steps."
    )
    checkpoint_every: int = Field(
        1000, ge=1, description="Write a checkpoint every this many steps (and at the end)."
    )
    grid_every: int | None = Field(
        1000, ge=1, description="Save a reconstruction/sample grid PNG every this many steps."
    )
    keep_last: int = Field(
        3, ge=1, le=1000, description="Checkpoints kept; older ones are deleted."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of weights-independent randomness.")
    max_bad_steps: int = Field(
        10,
        ge=1,
        description="Stop with an error after this many steps in a row with a non-finite loss "
        "or gradient (each such step is skipped).",
    )
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes.")
    flush_denormal: bool = Field(
        True,
        description="Treat subnormal floats (below 1.2e-38) as zero in CPU arithmetic "
        "(torch.set_flush_denormal). On x86 an operation on them costs tens of times a normal "
        "one, and training can drift into them: a PixelSNAIL at lr 3e-3 lost a third of "
        "its speed within 550 steps without this. It holds for the whole process, and for CPU "
        "threads only once set before their first parallel operation, so the CLI sets it first.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when available (cuda:LOCAL_RANK under torchrun)."
    )
    progress: Literal["auto", "on", "off"] = Field(
        "auto", description="tqdm progress bar: 'auto' shows it only on an interactive terminal."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        for b in self.betas:
            if not (0.0 <= b < 1.0) or math.isnan(b):
                raise ValueError(
                    f"betas must each lie in [0, 1), got {self.betas}; e.g. (0.9, 0.95)."
                )
        if self.warmup_steps > self.effective_decay_steps and self.lr_schedule == "cosine":
            raise ValueError(
                f"warmup_steps={self.warmup_steps} is longer than the cosine decay "
                f"({self.effective_decay_steps} steps); lower warmup_steps or raise decay_steps."
            )
        return self

    @property
    def effective_decay_steps(self) -> int:
        """``decay_steps``, or ``max_steps`` when unset."""
        return self.decay_steps if self.decay_steps is not None else self.max_steps

    @property
    def run_dir(self) -> Path:
        """``runs_dir / run_name``."""
        return Path(self.runs_dir) / self.run_name

    def resume_view(self) -> dict[str, Any]:
        """The fields that must match to resume a run, with ``decay_steps`` resolved."""
        data = self.model_dump(mode="json")
        data["decay_steps"] = self.effective_decay_steps
        return {k: data[k] for k in RESUME_KEYS}


class TrainConfig(BaseModel):
    """Fields both ``latentgen train`` config files share: the data and the trainer options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DatasetField = Field(
        description="Dataset config, e.g. {type: shapes, size: 64}; see `latentgen schema dataset`."
    )
    trainer: TrainerConfig = Field(description="Training loop options.")


class TokenizerTrainConfig(TrainConfig):
    """``latentgen train tokenizer --config``: a tokenizer config (or a spec holding one)."""

    tokenizer: TokenizerField | None = Field(
        None, description="Tokenizer config, e.g. {type: vqgan, codebook_size: 1024}."
    )
    spec: PipelineSpec | None = Field(
        None, description="A whole pipeline spec; its tokenizer is trained (the prior is not)."
    )
    grid_images: int = Field(
        8, ge=1, le=256, description="Images in each reconstruction grid (first of the dataset)."
    )
    disc_lr: float | None = Field(
        None, gt=0, le=10, description="Discriminator learning rate (None: trainer.lr)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerTrainConfig:
        if (self.tokenizer is None) == (self.spec is None):
            raise ValueError(
                "give exactly one of `tokenizer` (a tokenizer config) or `spec` (a pipeline "
                f"spec whose tokenizer is trained); got {'both' if self.tokenizer else 'neither'}."
            )
        return self

    @property
    def tokenizer_config(self) -> Any:
        """The tokenizer config, from ``tokenizer`` or ``spec.tokenizer``."""
        return self.tokenizer if self.tokenizer is not None else self.spec.tokenizer  # type: ignore[union-attr]


class PriorTrainConfig(TrainConfig):
    """``latentgen train prior --config``: a pipeline spec, a trained tokenizer, a code cache."""

    spec: PipelineSpec = Field(
        description="Pipeline spec: its prior and conditioners are trained. In a config file "
        "`spec.tokenizer` may be left out: `latentgen train prior` reads it from "
        "`tokenizer_path`; if given, it must match."
    )
    tokenizer_path: Path = Field(
        description="Trained tokenizer: a saved pipeline dir, an exported tokenizer dir (from "
        "`latentgen train tokenizer`), or a run dir (its final export)."
    )
    code_cache: Path | None = Field(
        None,
        description="Where the encoded dataset is cached (None: runs_dir/run_name/code_cache). "
        "Built on first use; refused if another tokenizer made it.",
    )
    cond_tokenizers: dict[str, Path] = Field(
        default_factory=dict,
        description="Trained cond-stage tokenizer of each spatial conditioner, by conditioner "
        "name (a run dir, an exported tokenizer or a pipeline dir, as for tokenizer_path). Its "
        "config fills `spec.conditioners.<name>.tokenizer` when left out (else it must match) "
        "and its weights become the conditioner's.",
    )
    condition_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Dataset key of each conditioner's raw data by conditioner name (default: "
        "the same name, e.g. label -> label).",
    )
    grid_samples: int = Field(8, ge=1, le=256, description="Samples drawn for each sample grid.")
    encode_batch_size: int = Field(64, ge=1, le=65_536, description="Batch size for the cache.")

    @model_validator(mode="before")
    @classmethod
    def _one_condition_dropout(cls, data: Any) -> Any:
        """Condition dropout is the prior's ``cond_dropout``; say so to old configs."""
        if isinstance(data, Mapping) and "cond_drop_prob" in data:
            raise ValueError(
                "cond_drop_prob is no longer a training option: condition dropout is the "
                "prior's own `cond_dropout` (two knobs compounded). Move it to spec.prior: "
                f"`cond_dropout: {data['cond_drop_prob']}` and remove cond_drop_prob."
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _spec_has_tokenizer(cls, data: Any) -> Any:
        # The disk is read by the command (`train prior` fills spec.tokenizer from
        # tokenizer_path), never here: validating a config stays free of I/O.
        if isinstance(data, Mapping):
            spec = data.get("spec")
            if isinstance(spec, Mapping) and "tokenizer" not in spec:
                raise ValueError(
                    "spec.tokenizer is missing. `latentgen train prior` fills it from "
                    "tokenizer_path; from Python, set it to the trained tokenizer's config: "
                    "latentgen.artifact.find_component(tokenizer_path, 'tokenizer').config."
                )
        return data

    @model_validator(mode="after")
    def _cond_tokenizers_name_conditioners(self) -> PriorTrainConfig:
        unknown = sorted(set(self.cond_tokenizers) - set(self.spec.conditioners))
        if unknown:
            raise ValueError(
                f"cond_tokenizers names {unknown}, which are not conditioners of the spec "
                f"({sorted(self.spec.conditioners) or 'none'}); use a conditioner's name."
            )
        return self

    def cache_keys(self) -> dict[str, str]:
        """Conditioner name -> dataset key for every conditioner of the spec."""
        return {name: self.condition_keys.get(name, name) for name in self.spec.conditioners}


C = TypeVar("C", bound=BaseModel)


def load_train_config(
    source: str | Path | Mapping[str, Any], model: type[C], where: str | None = None
) -> C:
    """Read and validate a train config from a mapping or a ``.yaml``/``.yml``/``.json`` file.

    ``where`` names a mapping's origin (the file it was read from) in error messages.
    """
    if where is not None and isinstance(source, Mapping):
        try:
            return model.model_validate(dict(source))
        except ValidationError as e:
            raise spec_error(e, where, "train config") from None
    return load_model(source, model, "train config")
