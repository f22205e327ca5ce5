"""The shipped configs agree with each other: a prior predicts as many codes as the tokenizer it
reads has. The configs name the tokenizer by its run directory, so a tokenizer config whose
codebook changes without its priors would only fail minutes into a user's training run."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = Path(str(resources.files("latentgen") / "configs"))


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def _tokenizers() -> dict[str, int]:
    """``runs/<run_name>`` -> codebook size, for every shipped image tokenizer config."""
    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = _load(path)
        quantizer = cfg.get("tokenizer", {}).get("quantizer")
        if quantizer is None or "codebook_size" not in quantizer:
            continue
        out[f"runs/{cfg['trainer']['run_name']}"] = int(quantizer["codebook_size"])
    return out


def _priors_reading_a_tokenizer() -> list[tuple[str, str, str, int]]:
    """(config file, prior name, tokenizer_path, vocab_size) of every shipped prior."""
    rows = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = _load(path)
        if "tokenizer_path" not in cfg:
            continue
        priors = cfg.get("priors") or {"prior": cfg["spec"]["prior"]}  # compare or train prior
        for name, prior in priors.items():
            rows.append((path.name, name, cfg["tokenizer_path"], int(prior["vocab_size"])))
    return rows


def test_the_shipped_priors_were_found() -> None:
    files = {row[0] for row in _priors_reading_a_tokenizer()}
    assert {"shapes-transformer.yaml", "compare-shapes-table1.yaml"} <= files
    assert _tokenizers()["runs/shapes-vqgan"] == 32


@pytest.mark.parametrize("row", _priors_reading_a_tokenizer(), ids=lambda r: f"{r[0]}:{r[1]}")
def test_each_prior_predicts_its_tokenizers_codes(row: tuple[str, str, str, int]) -> None:
    file, name, tokenizer_path, vocab = row
    tokenizers = _tokenizers()
    assert tokenizer_path in tokenizers, (
        f"{file} reads {tokenizer_path}, which no shipped tokenizer config writes"
    )
    assert vocab == tokenizers[tokenizer_path], (
        f"{file}: prior '{name}' has vocab_size {vocab}, but {tokenizer_path} has "
        f"{tokenizers[tokenizer_path]} codes"
    )
