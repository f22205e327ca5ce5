"""Built-in quantizers, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_quantizers(register: RegisterFn) -> None:
    # Imported here, not at module level: loading the plugin list must stay cheap.
    from latentgen.tokenizers.quantizers.fsq import FSQuantizer
    from latentgen.tokenizers.quantizers.gumbel import GumbelQuantizer
    from latentgen.tokenizers.quantizers.vq import EMAQuantizer, VectorQuantizer

    register(VectorQuantizer)
    register(EMAQuantizer)
    register(GumbelQuantizer)
    register(FSQuantizer)
