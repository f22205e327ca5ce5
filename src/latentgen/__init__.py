"""latentgen: two-stage image generation (VQGAN tokenizers + autoregressive priors) as plugins."""

__version__ = "0.1.0"
