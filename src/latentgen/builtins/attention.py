"""Built-in attention registered through the same hook as third-party plugins."""

from latentgen.hookspecs import hookimpl


@hookimpl
def register_attention_backends(register):  # type: ignore[no-untyped-def]
    pass
