"""The hooks a latentgen plugin implements: one ``register_<kind>s(register)`` per component kind.

Each hook receives a ``register`` callback. Call ``register(cls)`` once per class: ``cls``
subclasses the kind's base class and has ``cls.Config``, a ``latentgen.ComponentConfig`` whose
``type: Literal["..."]`` field names it. Built-in components register through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("latentgen")
hookimpl = pluggy.HookimplMarker("latentgen")

#: ``register(cls)``: add one component class to the registry.
RegisterFn = Callable[[type[Any]], None]


@hookspec
def register_tokenizers(register: RegisterFn) -> None:
    """Register ``latentgen.Tokenizer`` subclasses (stage 1: image <-> code grid).

    Example::

        @latentgen.hookimpl
        def register_tokenizers(register):
            register(MyTokenizer)
    """


@hookspec
def register_priors(register: RegisterFn) -> None:
    """Register ``latentgen.Prior`` subclasses (stage 2: models of code grids).

    Example::

        @latentgen.hookimpl
        def register_priors(register):
            register(MyPrior)
    """


@hookspec
def register_conditioners(register: RegisterFn) -> None:
    """Register ``latentgen.Conditioner`` subclasses (raw condition -> tokens).

    Example::

        @latentgen.hookimpl
        def register_conditioners(register):
            register(MyConditioner)
    """


@hookspec
def register_quantizers(register: RegisterFn) -> None:
    """Register ``latentgen.Quantizer`` subclasses, used inside tokenizers' ``quantizer`` field.

    Example::

        @latentgen.hookimpl
        def register_quantizers(register):
            register(MyQuantizer)
    """


@hookspec
def register_attention_backends(register: RegisterFn) -> None:
    """Register ``latentgen.AttentionBackend`` subclasses (``attend(q, k, v, causal, mask)``).

    Example::

        @latentgen.hookimpl
        def register_attention_backends(register):
            register(MyAttention)
    """


@hookspec
def register_datasets(register: RegisterFn) -> None:
    """Register ``latentgen.ImageDataset`` subclasses (training and evaluation data).

    Example::

        @latentgen.hookimpl
        def register_datasets(register):
            register(MyDataset)
    """


@hookspec
def register_classifiers(register: RegisterFn) -> None:
    """Register ``latentgen.classifiers.Classifier`` subclasses (measure samples' classes).

    Example::

        @latentgen.hookimpl
        def register_classifiers(register):
            register(MyClassifier)
    """
