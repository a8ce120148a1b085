"""conv_transpose2d on Vulkan: its stride phases as Vulkan conv2d layers (stacked, host arrays in and out, as every
Vulkan layer), interleaved on the host (`_phases`)."""
from __future__ import annotations

from ...runtime import vulkan as _vk
from .._phases import STACK_MAX_WORK_CPU_DEVICE, PhasesPrepared


class VulkanPhasesPrepared(PhasesPrepared):
    def __init__(self, backend, spec, w, b, device):
        super().__init__(backend, spec, w, b, device)
        if _vk.device(device.index).type == "cpu":
            self.stack_max_work = STACK_MAX_WORK_CPU_DEVICE


def prepare(backend, spec, w, b, device) -> VulkanPhasesPrepared:
    return VulkanPhasesPrepared(backend, spec, w, b, device)
