"""Built-in tokenizers, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_tokenizers(register: RegisterFn) -> None:
    # Imported here, not at module level: loading the plugin list must stay cheap.
    from latentgen.tokenizers.vqgan import VQGAN
    from latentgen.tokenizers.vqvae import VQVAE

    register(VQVAE)
    register(VQGAN)
