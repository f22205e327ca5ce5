"""Built-in conditioners, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_conditioners(register: RegisterFn) -> None:
    from latentgen.conditioners.label import ClassLabelConditioner

    register(ClassLabelConditioner)
