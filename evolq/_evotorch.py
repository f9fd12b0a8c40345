"""EvoTorch, imported lazily and quietly.

EvoTorch is slow to import and logs at INFO (problem construction, dtypes, devices)
through handlers of its own; it also warns each time it copy-constructs a tensor it
is given. ``quiet()`` silences both, and only inside evolq's own calls: the import
below and the engine's block searches. Other code that uses EvoTorch keeps its
loggers and warning filters as they were.
"""
import logging
import warnings
from contextlib import contextmanager

__all__ = ["evotorch", "quiet"]

_LOGGERS = ("evotorch", "evotorch.core", "evotorch.logging")


@contextmanager
def quiet():
    """EvoTorch's INFO logs and its tensor-copy warnings off, for the duration of the block."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="evotorch")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


with quiet(), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # import-time deprecation noise of EvoTorch's dependencies
    import evotorch
    import evotorch.algorithms
