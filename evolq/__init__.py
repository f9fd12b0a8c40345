"""evolq: post-training quantization by evolutionary search over quantization scales.

    from evolq import quantize_model, EvolQConfig
    qmodel, report = quantize_model(model, calib_images, EvolQConfig.make(w_bits=4, passes=2))
"""
from .adapters import list_adapters, register_adapter
from .api import allocate_bits, load_quantized, prepare_model, quantize_model, save_quantized
from .config import AllocationConfig, EvolQConfig, QuantConfig, SearchConfig
from .errors import (
                     CheckpointError,
                     ConfigError,
                     DataError,
                     EvolQError,
                     ExportError,
                     ScaleOutError,
                     UnknownModelError,
                     UnsupportedModelError,
                     WeightsError,
)
from .export import check_onnx, export_onnx, export_pt2
from .losses import list_losses, register_loss
from .qnn.calibrate import calibrate
from .qnn.qmodel import Block, QModel
from .qnn.scales import ScaleSpace
from .search import list_searchers, register_searcher

__version__ = "0.1.0"

__all__ = [
    "quantize_model", "prepare_model", "allocate_bits", "AllocationConfig", "save_quantized", "load_quantized",
    "calibrate",
    "EvolQConfig", "QuantConfig", "SearchConfig", "Block", "QModel", "ScaleSpace",
    "EvolQError", "ConfigError", "DataError", "UnknownModelError", "UnsupportedModelError",
    "WeightsError", "CheckpointError", "ExportError", "ScaleOutError", "export_onnx", "check_onnx", "export_pt2",
    "list_adapters", "register_adapter", "list_searchers",
    "register_searcher", "list_losses", "register_loss", "__version__",
]
