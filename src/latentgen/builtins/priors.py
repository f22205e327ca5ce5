"""Built-in priors registered through the same hook as third-party plugins."""

from latentgen.hookspecs import hookimpl


@hookimpl
def register_priors(register):  # type: ignore[no-untyped-def]
    pass
