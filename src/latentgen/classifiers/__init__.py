"""Reference classifiers: a registered component kind that says what class an image shows.

    from latentgen.classifiers import load_classifier
    clf = load_classifier("runs/shapes-classifier")     # a run dir, its final/, or a component dir
    clf.probs(images)                                    # [B, num_classes]
    clf.features(images)                                 # [B, D], for KID/FID
    clf.held_out_accuracy                                # measured when it was trained

Built-ins register through ``register_classifiers``, the hook a plugin uses for its own.
"""

from __future__ import annotations

import os

from latentgen.classifiers.base import Classifier
from latentgen.classifiers.cnn import ClassifierConfig, CNNClassifier
from latentgen.errors import CheckpointError

__all__ = ["CNNClassifier", "Classifier", "ClassifierConfig", "load_classifier"]


def load_classifier(path: str | os.PathLike[str]) -> Classifier:
    """The trained classifier at ``path`` (component dir or run dir with ``final/``), eval mode."""
    from latentgen.artifact import load_component

    module = load_component(path, "classifier")
    if not isinstance(module, Classifier):  # a plugin registered something else as a classifier
        raise CheckpointError(
            f"{path} holds a {type(module).__qualname__}, which is not a "
            "latentgen.classifiers.Classifier; its plugin must register a Classifier subclass."
        )
    return module.eval()
