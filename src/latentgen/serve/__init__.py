"""``latentgen serve``: a web page (Gradio, the ``ui`` extra) to generate and inspect.

``latentgen.serve.session`` does the work without Gradio; ``latentgen.serve.app`` builds the
page from what the pipeline's conditioners declare (``Conditioner.raw_input``).
"""

from latentgen.serve.session import GenerateRequest, Studio

__all__ = ["GenerateRequest", "Studio"]
