"""latentgen-toy: a palette tokenizer and an n-gram prior, registered as a latentgen plugin."""

from __future__ import annotations

import latentgen
from latentgen.hookspecs import RegisterFn
from latentgen_toy.ngram import NGramPrior, NGramPriorConfig
from latentgen_toy.palette import PaletteTokenizer, PaletteTokenizerConfig

__all__ = ["NGramPrior", "NGramPriorConfig", "PaletteTokenizer", "PaletteTokenizerConfig"]
__version__ = "0.1.0"


@latentgen.hookimpl
def register_tokenizers(register: RegisterFn) -> None:
    register(PaletteTokenizer)


@latentgen.hookimpl
def register_priors(register: RegisterFn) -> None:
    register(NGramPrior)
