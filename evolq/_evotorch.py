"""Import EvoTorch quietly (it is slow and logs at INFO on import): only modules that
need it import this one, so ``import evolq`` stays fast."""
import logging
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import evotorch
    import evotorch.algorithms

for _name in ("evotorch", "evotorch.core", "evotorch.logging"):
    logging.getLogger(_name).setLevel(logging.WARNING)

__all__ = ["evotorch"]

# EvoTorch copy-constructs tensors it is given (bounds, centers) and warns each time
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
