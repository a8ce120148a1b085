"""conv_transpose2d on OpenCL and CUDA: its stride phases as conv2d layers of the same device (stacked, `_phases`);
host arrays are interleaved on the host, device arrays on the device by kernels/conv_transpose2d_phases.h."""
from __future__ import annotations

import numpy as np

from ...runtime.kernels import i32, linear_launch, source
from .._phases import STACK_MAX_WORK_CPU_DEVICE, PhasesPrepared


class KernelPhasesPrepared(PhasesPrepared):
    def __init__(self, backend, spec, w, b, device):
        super().__init__(backend, spec, w, b, device)
        self._rt = backend.runtime(device)
        if self._rt.limits.is_cpu:
            self.stack_max_work = STACK_MAX_WORK_CPU_DEVICE
        self._interleave = self._rt.kernel(source("conv_transpose2d_phases.h"), "conv_transpose2d_phases")

    def empty_on_device(self, x, shape):
        self._rt.device_input(x)  # the same refusal as conv2d for an array of another context or device
        return self._rt.empty_array(shape)

    def zeros_on_device(self, shape):
        return self._rt.upload(np.zeros(shape, np.float32))

    def interleave_on_device(self, out, y, stack, index: int, geom) -> None:
        phase, (dr, dc) = stack.phases[index], stack.offsets[index]
        ch, cw = phase.rows.count, phase.cols.count
        total = geom.n * geom.o * ch * cw
        scalars = i32(out.shape[2], out.shape[3], len(stack.phases), index, geom.o // self.spec.groups, dr, dc, ch, cw,
                      geom.o, geom.oh, geom.ow, phase.rows.start, phase.cols.start, geom.sh, geom.sw)
        self._rt.launch(self._interleave, linear_launch(total, scalars + (np.int64(total),)), [out, y])

    def _run(self, x, geom, timed: bool):
        y, seconds = super()._run(x, geom, timed)
        return (y if isinstance(y, np.ndarray) else self._rt.returned(y)), seconds


def prepare(backend, spec, w, b, device) -> KernelPhasesPrepared:
    return KernelPhasesPrepared(backend, spec, w, b, device)
