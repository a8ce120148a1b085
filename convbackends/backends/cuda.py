"""CUDA backend: CuPy RawModule over the shared kernels/ sources.

CuPy imports without a GPU; the driver answers only when asked, so `probe` asks and reports the
CUDA error (e.g. cudaErrorInsufficientDriver) as the reason the backend is unavailable. Modules are
built once per (device, source, options); CuPy keeps the compiled binaries on disk.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from ..spec import Conv2dGeometry
from . import _kernels
from .base import BackendUnavailable, DeviceInfo

_COMPILE_OPTIONS = ("-std=c++17",)


class Runtime:
    """One GPU's compiled kernels."""

    def __init__(self, info: DeviceInfo):
        self.info = info
        self.device = cp.cuda.Device(info.index)
        facts = info.facts
        self.limits = _kernels.DeviceLimits(info.type, facts["max_threads_per_block"], facts["shared_memory_per_block"],
                                            facts["global_memory"] // 4)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cp.RawKernel] = {}

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cp.RawKernel:
        """The kernel `name` of `source` compiled with `options`; KernelBuildError carries the NVRTC log."""
        key = (source, name, tuple(options))
        if key not in self._kernels:
            with self.device:
                try:
                    module = cp.RawModule(code=source, options=_COMPILE_OPTIONS + tuple(options))
                    self._kernels[key] = module.get_function(name)
                except cp.cuda.compiler.CompileException as exc:
                    raise _kernels.KernelBuildError(f"CUDA build of {name} failed on {self.info}: {exc}") from exc
        return self._kernels[key]

    @staticmethod
    def max_threads(kernel: cp.RawKernel) -> int:
        return kernel.max_threads_per_block


class CudaPrepared(_kernels.KernelPrepared):
    def _upload(self, array: np.ndarray):
        with self._rt.device:
            return cp.asarray(array)

    def _empty(self, shape):
        with self._rt.device:
            return cp.empty(shape, np.float32)

    def _run(self, x, geom: Conv2dGeometry, timed: bool):
        """Everything goes on the caller's current stream, so it orders with the caller's own work."""
        rt = self._rt
        self._check_open()
        with rt.device:
            stream = cp.cuda.get_current_stream()
            host = isinstance(x, np.ndarray)
            winograd = self.uses_winograd(x, geom)
            if host:
                xdev, y = self._staging.get(geom)
                xdev.set(x, stream=stream)
            else:
                if x.device.id != rt.info.index:
                    raise ValueError(f"x is on CUDA device {x.device.id}, this layer on {rt.info.index}")
                xdev = cp.ascontiguousarray(x)
                y = cp.empty(geom.output_shape, np.float32)
            start = stream.record() if timed else None
            for kernel, launch, buffers in self._steps(xdev, y, geom, winograd):
                kernel(launch.grid, launch.local_size, (*buffers, *launch.scalars))
            seconds = None
            if timed:
                end = stream.record()
                end.synchronize()
                seconds = cp.cuda.get_elapsed_time(start, end) * 1e-3
            return (y.get(stream=stream) if host else y), seconds

    def run(self, x, geom: Conv2dGeometry):
        return self._run(x, geom, timed=False)[0]

    def profile(self, x, geom: Conv2dGeometry):
        return self._run(x, geom, timed=True)


class CudaBackend(_kernels.KernelBackend):
    name = "cuda"
    prepared_class = CudaPrepared

    def _enumerate(self) -> list[DeviceInfo]:
        try:
            count = cp.cuda.runtime.getDeviceCount()
            found = []
            for index in range(count):
                props = cp.cuda.runtime.getDeviceProperties(index)
                name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
                facts = {
                    "compute_capability": f"{props['major']}.{props['minor']}",
                    "driver": cp.cuda.runtime.driverGetVersion(),
                    "runtime": cp.cuda.runtime.runtimeGetVersion(),
                    "multiprocessors": props["multiProcessorCount"],
                    "global_memory": props["totalGlobalMem"],
                    "max_threads_per_block": props["maxThreadsPerBlock"],
                    "shared_memory_per_block": props["sharedMemPerBlock"],
                }
                kind = "integrated-gpu" if props["integrated"] else "gpu"
                found.append(DeviceInfo(self.name, index, name, kind, facts))
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise BackendUnavailable(f"CUDA driver unavailable: {exc}") from exc
        return found

    def _make_runtime(self, info: DeviceInfo) -> Runtime:
        return Runtime(info)

    def owns(self, x) -> bool:
        return isinstance(x, cp.ndarray)


BACKEND = CudaBackend()
