"""convbackends: convolution operators over numpy, OpenCL, CUDA and Vulkan, checked against cv2.dnn.

Importing the package loads no GPU library: backends are imported when first asked for.
"""
from .ops.base import clear_one_shot_cache
from .ops.conv2d import Conv2d, conv2d
from .ops.conv_transpose2d import ConvTranspose2d, ConvTranspose2dGeometry, ConvTranspose2dSpec, conv_transpose2d
from .ops.deform_conv2d import (DeformConv2d, DeformConv2dGeometry, DeformConv2dSpec, deform_conv2d,
                                deform_conv2d_backward)
from .runtime import Availability, BackendUnavailable, DeviceInfo, available_backends, devices, opencl_queue
from .runtime.numpy import get_num_threads, set_num_threads
from .spec import Activation, Conv2dGeometry, Conv2dSpec

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Availability",
    "BackendUnavailable",
    "Conv2d",
    "Conv2dGeometry",
    "Conv2dSpec",
    "ConvTranspose2d",
    "ConvTranspose2dGeometry",
    "ConvTranspose2dSpec",
    "DeformConv2d",
    "DeformConv2dGeometry",
    "DeformConv2dSpec",
    "DeviceInfo",
    "available_backends",
    "clear_one_shot_cache",
    "conv2d",
    "conv_transpose2d",
    "deform_conv2d",
    "deform_conv2d_backward",
    "devices",
    "get_num_threads",
    "opencl_queue",
    "set_num_threads",
]
