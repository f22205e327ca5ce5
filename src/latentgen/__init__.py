"""latentgen: two-stage image generation (VQGAN tokenizers + autoregressive priors) as plugins.

The public API is small: ``Pipeline``, the specs, the registry, the ``hookimpl`` marker for
plugins, and the base classes a plugin subclasses.
"""

from latentgen import registry
from latentgen.components import Component
from latentgen.conditioners.base import Conditioner, Conditioning
from latentgen.data.base import ImageDataset
from latentgen.errors import (
    CheckpointError,
    DataError,
    DuplicateComponentError,
    InputError,
    LatentgenError,
    PluginLoadError,
    SpecError,
    UnknownComponentError,
    WeightsNotFoundError,
)
from latentgen.hookspecs import hookimpl
from latentgen.pipeline import Pipeline
from latentgen.priors.base import ConditionSlot, Prior, PriorConfig, SampleRequest
from latentgen.specs import ComponentConfig, PipelineSpec, SamplerConfig, load_spec
from latentgen.tokenizers.base import Tokenizer, TokenizerOutput, TrainableTokenizer
from latentgen.tokenizers.quantizers.base import Quantizer, QuantizerOutput
from latentgen.version import __version__

__all__ = [
    "CheckpointError",
    "Component",
    "ComponentConfig",
    "ConditionSlot",
    "Conditioner",
    "Conditioning",
    "DataError",
    "DuplicateComponentError",
    "ImageDataset",
    "InputError",
    "LatentgenError",
    "Pipeline",
    "PipelineSpec",
    "PluginLoadError",
    "Prior",
    "PriorConfig",
    "Quantizer",
    "QuantizerOutput",
    "SampleRequest",
    "SamplerConfig",
    "SpecError",
    "Tokenizer",
    "TokenizerOutput",
    "TrainableTokenizer",
    "UnknownComponentError",
    "WeightsNotFoundError",
    "__version__",
    "hookimpl",
    "load_spec",
    "registry",
]
