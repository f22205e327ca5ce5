"""Test kit for plugin authors: contract suites to subclass, and pytest fixtures.

from latentgen.testing import TokenizerContract

class TestMyTokenizer(TokenizerContract):
    config = {"type": "my.tokenizer", "vocab_size": 16}
    image_size = 16
    plugin = "latentgen-my"      # optional: the distribution expected to register it
"""

from latentgen.testing.contracts import ConditionerContract, PriorContract, TokenizerContract

__all__ = ["ConditionerContract", "PriorContract", "TokenizerContract"]
