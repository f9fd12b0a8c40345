"""Quantization primitives: integer ranges, fake-quantizers and observers.

Nothing in this subpackage knows about models."""
from .channel_factor import ChannelFactorQuantizer, PTFQuantizer
from .nbits import DynamicBlockQuantizer
from .observers import (
    OBSERVERS,
    WEIGHT_ONLY_OBSERVERS,
    EMAObserver,
    MinMaxObserver,
    Observer,
    OMSEObserver,
    PercentileObserver,
    StatsQObserver,
    make_observer,
)
from .quantizers import Log2Quantizer, Quantizer, UniformQuantizer, bias_correct
from .range import fake_quant, fake_quant_axis, int_range, qparams_from_range, split_zero_point, statsq_qparams

__all__ = [
    "OBSERVERS", "WEIGHT_ONLY_OBSERVERS", "EMAObserver", "MinMaxObserver", "Observer", "OMSEObserver",
    "PercentileObserver", "StatsQObserver", "make_observer",
    "ChannelFactorQuantizer", "DynamicBlockQuantizer",
    "Log2Quantizer", "PTFQuantizer", "Quantizer", "UniformQuantizer", "bias_correct",
    "fake_quant", "fake_quant_axis", "int_range", "qparams_from_range", "split_zero_point",
    "statsq_qparams",
]
