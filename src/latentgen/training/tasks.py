"""Training tasks.

The public names of ``latentgen.training``'s tasks live here; each is defined in its own module:

- ``Task``, ``StepContext``: the interface the ``Trainer`` drives (``task.py``);
- ``TokenizerTask``: stage 1, a tokenizer on images (``tokenizer_task.py``);
- ``PriorTask``: stage 2, a prior on cached codes (``prior_task.py``);
- ``warmup_cosine``: the learning-rate schedule, a ``LambdaLR`` (``schedule.py``);
- ``decay_groups``: AdamW parameter groups (``optim.py``);
- ``image_grid``: progress pictures (``grid.py``).
"""

from __future__ import annotations

from latentgen.training.grid import image_grid
from latentgen.training.optim import decay_groups
from latentgen.training.prior_task import PriorTask
from latentgen.training.schedule import warmup_cosine
from latentgen.training.task import StepContext, Task
from latentgen.training.tokenizer_task import TokenizerTask

__all__ = [
    "PriorTask",
    "StepContext",
    "Task",
    "TokenizerTask",
    "decay_groups",
    "image_grid",
    "warmup_cosine",
]
