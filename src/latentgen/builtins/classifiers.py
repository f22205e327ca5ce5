"""Built-in classifiers, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_classifiers(register: RegisterFn) -> None:
    from latentgen.classifiers.cnn import CNNClassifier

    register(CNNClassifier)
