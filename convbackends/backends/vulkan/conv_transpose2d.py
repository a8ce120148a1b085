"""conv_transpose2d on Vulkan: its stride phases as Vulkan conv2d layers (host arrays in and out, as every
Vulkan layer), interleaved on the host (`_phases`)."""
from .._phases import prepare

__all__ = ["prepare"]
