"""Built-in priors, registered through the same hook as third-party plugins."""

from latentgen.hookspecs import RegisterFn, hookimpl


@hookimpl
def register_priors(register: RegisterFn) -> None:
    from latentgen.priors.masked import MaskedPrior
    from latentgen.priors.pixelsnail import PixelSNAILPrior
    from latentgen.priors.transformer import TransformerPrior

    register(TransformerPrior)
    register(PixelSNAILPrior)
    register(MaskedPrior)
