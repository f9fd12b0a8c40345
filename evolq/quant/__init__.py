"""Quantization primitives: integer ranges, fake-quantizers and observers.

Nothing in this subpackage knows about models."""
from .observers import OBSERVERS, EMAObserver, MinMaxObserver, Observer, OMSEObserver, PercentileObserver, make_observer
from .quantizers import ChannelFactorQuantizer, Log2Quantizer, PTFQuantizer, Quantizer, UniformQuantizer, bias_correct
from .range import fake_quant, fake_quant_axis, int_range, qparams_from_range

__all__ = [
    "OBSERVERS", "EMAObserver", "MinMaxObserver", "Observer", "OMSEObserver", "PercentileObserver",
    "make_observer",
    "ChannelFactorQuantizer", "Log2Quantizer", "PTFQuantizer", "Quantizer", "UniformQuantizer", "bias_correct",
    "fake_quant", "fake_quant_axis", "int_range", "qparams_from_range",
]
