"""Built-in attention backends, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_attention_backends(register: RegisterFn) -> None:
    from latentgen.priors.attention import (
        FlexAttention,
        MathAttention,
        SDPAttention,
        XFormersAttention,
    )

    register(SDPAttention)
    register(MathAttention)
    register(XFormersAttention)
    register(FlexAttention)
