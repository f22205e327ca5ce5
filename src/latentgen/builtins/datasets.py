"""Built-in datasets registered through the same hook as third-party plugins."""

from latentgen.hookspecs import hookimpl


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    pass
