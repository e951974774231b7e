"""odconv: Omni-Dimensional Dynamic Convolution for PyTorch, with fused C++/CUDA kernels.

Public API:
    odconv2d, backend_info                      the operator (odconv.ops)
    odconv2d_reference                          the pure-PyTorch formulation (odconv.reference)
    ODConv2d, Attention, MultiScaleFeatureFusion, set_temperature, TemperatureSchedule
    AdaptiveLoss, class_balanced_weights
    keep_freed_memory                           CPU training: glibc keeps freed memory for reuse (odconv.allocator)
"""
from .allocator import keep_freed_memory
from .loss import AdaptiveLoss, class_balanced_weights
from .modules import Attention, MultiScaleFeatureFusion, ODConv2d, TemperatureSchedule, set_temperature
from .ops import backend_info, odconv2d
from .reference import odconv2d_reference

__version__ = "0.1.0"

__all__ = [
    "odconv2d", "backend_info", "odconv2d_reference",
    "ODConv2d", "Attention", "MultiScaleFeatureFusion", "set_temperature", "TemperatureSchedule",
    "AdaptiveLoss", "class_balanced_weights", "keep_freed_memory",
]
