"""Training tasks, and (for now) the directory format of a trained tokenizer.

The public names of ``latentgen.training``'s tasks live here; each is defined in its own module:

- ``Task``, ``StepContext``: the interface the ``Trainer`` drives (``task.py``);
- ``TokenizerTask``: stage 1, a tokenizer on images (``tokenizer_task.py``);
- ``PriorTask``: stage 2, a prior on cached codes (``prior_task.py``);
- ``warmup_cosine``: the learning-rate schedule, a ``LambdaLR`` (``schedule.py``);
- ``decay_groups``: AdamW parameter groups (``optim.py``);
- ``image_grid``: progress pictures (``grid.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentgen.checkpoint import (
    atomic_directory,
    atomic_write_json,
    load_module,
    read_json,
    save_tensors,
    sha256_file,
)
from latentgen.errors import CheckpointError
from latentgen.training.grid import image_grid
from latentgen.training.optim import decay_groups
from latentgen.training.prior_task import PriorTask
from latentgen.training.schedule import warmup_cosine
from latentgen.training.task import StepContext, Task
from latentgen.training.tokenizer_task import TokenizerTask

if TYPE_CHECKING:
    from latentgen.tokenizers.base import Tokenizer

__all__ = [
    "TOKENIZER_FILE",
    "PriorTask",
    "StepContext",
    "Task",
    "TokenizerTask",
    "decay_groups",
    "image_grid",
    "load_tokenizer",
    "save_tokenizer",
    "warmup_cosine",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FORMAT = "latentgen.tokenizer"


# -- a trained tokenizer on disk -------------------------------------------------------------------
def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` (config, sha256) + ``tokenizer.safetensors``, atomically.

    This is stage 1's product: ``latentgen train prior`` builds its pipeline from it.
    """
    from latentgen import __version__
    from latentgen.data.code_cache import tokenizer_fingerprint

    path = Path(path)
    with atomic_directory(path) as tmp:
        save_tensors(
            tmp / "tokenizer.safetensors",
            tokenizer.state_dict(),
            {"latentgen.component": "tokenizer", "latentgen.type": tokenizer.config.type},
        )
        atomic_write_json(
            tmp / TOKENIZER_FILE,
            {
                "format": TOKENIZER_FORMAT,
                "format_version": 1,
                "latentgen_version": __version__,
                "config": tokenizer.config.model_dump(mode="json"),
                "file": "tokenizer.safetensors",
                "sha256": sha256_file(tmp / "tokenizer.safetensors"),
                "fingerprint": tokenizer_fingerprint(tokenizer),
            },
        )
    return path


def _locate_tokenizer(path: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """``("pipeline" | "tokenizer", dir, its JSON)`` for a pipeline, tokenizer or run dir."""
    path = Path(path)
    if (path / "pipeline.json").is_file():
        from latentgen.pipeline import Pipeline

        return "pipeline", path, Pipeline.read_manifest(path)
    if (path / TOKENIZER_FILE).is_file():
        meta = read_json(path / TOKENIZER_FILE, what="tokenizer file")
        if not isinstance(meta, dict) or meta.get("format") != TOKENIZER_FORMAT:
            raise CheckpointError(f"{path / TOKENIZER_FILE} is not a latentgen tokenizer file.")
        return "tokenizer", path, meta
    if (path / "final").is_dir():
        return _locate_tokenizer(path / "final")
    raise CheckpointError(
        f"{path} holds no trained tokenizer: expected pipeline.json, {TOKENIZER_FILE}, or a run "
        "dir with final/. Train one with `latentgen train tokenizer --config cfg.yaml`."
    )


def tokenizer_config_at(path: str | Path) -> dict[str, Any]:
    """The config (as JSON) of the trained tokenizer at ``path``, without loading its weights."""
    kind, _, meta = _locate_tokenizer(path)
    return dict(meta["spec"]["tokenizer"] if kind == "pipeline" else meta["config"])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a trained tokenizer from a pipeline dir, a ``save_tokenizer`` dir or a run dir."""
    from latentgen import registry
    from latentgen.checkpoint import load_tensors

    kind, path, meta = _locate_tokenizer(path)
    if kind == "pipeline":
        from latentgen.pipeline import Pipeline

        return Pipeline.from_pretrained(path).tokenizer
    weights = path / str(meta.get("file", "tokenizer.safetensors"))
    if weights.is_file() and meta.get("sha256") and sha256_file(weights) != meta["sha256"]:
        raise CheckpointError(
            f"{weights} does not match the sha256 in {path / TOKENIZER_FILE}; the file was "
            "changed or damaged. Export the tokenizer again."
        )
    tok: Tokenizer = registry.build("tokenizer", meta["config"])
    load_module(tok, load_tensors(weights, what=str(weights)), what=str(weights))
    return tok
