"""evolq: post-training quantization by evolutionary search over quantization scales.

    from evolq import quantize_model, EvolQConfig
    qmodel, report = quantize_model(model, calib_images, EvolQConfig.make(w_bits=4, passes=2))
"""
from .api import load_quantized, prepare_model, quantize_model, save_quantized
from .calibrate import calibrate
from .config import EvolQConfig, QuantConfig, SearchConfig
from .errors import (CheckpointError, ConfigError, DataError, EvolQError, UnknownModelError,
                     UnsupportedModelError, WeightsError)
from .qmodel import Block, QModel
from .scales import ScaleSpace

__version__ = "0.1.0"

__all__ = [
    "quantize_model", "prepare_model", "save_quantized", "load_quantized", "calibrate",
    "EvolQConfig", "QuantConfig", "SearchConfig", "Block", "QModel", "ScaleSpace",
    "EvolQError", "ConfigError", "DataError", "UnknownModelError", "UnsupportedModelError",
    "WeightsError", "CheckpointError", "__version__",
]
