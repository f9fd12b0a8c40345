"""The quantized-model layer: quantized wrappers of torch layers (``layers``), the
builders that make them from a ``QuantConfig`` (``builder``), the one BatchNorm fold
(``fold``), the block view ``QModel`` (``qmodel``), flat scale vectors (``scales``)
and calibration (``calibrate``). It knows quantizers (``evolq.quant``) but no model
family: those are the adapters'."""
from .calibrate import calibrate
from .layers import QAct, QConv2d, QLinear, QNorm, quantizers_of
from .qmodel import Block, QModel
from .scales import ScaleSpace

__all__ = ["calibrate", "QAct", "QConv2d", "QLinear", "QNorm", "quantizers_of", "Block", "QModel", "ScaleSpace"]
