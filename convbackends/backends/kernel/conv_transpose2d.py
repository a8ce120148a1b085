"""conv_transpose2d on OpenCL and CUDA: its stride phases as conv2d layers of the same device; host arrays
are interleaved on the host, device arrays on the device by kernels/conv_transpose2d_phases.h."""
from __future__ import annotations

import numpy as np

from ...runtime.kernels import i32, linear_launch, source
from .._phases import PhasesPrepared


class KernelPhasesPrepared(PhasesPrepared):
    def __init__(self, backend, spec, w, b, device):
        super().__init__(backend, spec, w, b, device)
        self._rt = backend.runtime(device)
        self._interleave = self._rt.kernel(source("conv_transpose2d_phases.h"), "conv_transpose2d_phases")

    def empty_on_device(self, x, shape):
        self._rt.device_input(x)  # the same refusal as conv2d for an array of another context or device
        return self._rt.empty_array(shape)

    def interleave_on_device(self, part, y, row0: int, col0: int, sh: int, sw: int) -> None:
        n, o, ph, pw = part.shape
        total = n * o * ph * pw
        launch = linear_launch(total, i32(ph, pw, y.shape[2], y.shape[3], row0, col0, sh, sw) + (np.int64(total),))
        self._rt.launch(self._interleave, launch, [part, y])

    def _run(self, x, geom, timed: bool):
        y, seconds = super()._run(x, geom, timed)
        return (y if isinstance(y, np.ndarray) else self._rt.returned(y)), seconds


def prepare(backend, spec, w, b, device) -> KernelPhasesPrepared:
    return KernelPhasesPrepared(backend, spec, w, b, device)
