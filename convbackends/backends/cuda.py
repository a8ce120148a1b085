"""CUDA backend: CuPy RawModule over the shared kernels/ sources.

CuPy imports without a GPU; the driver answers only when asked, so `probe` asks and reports the
CUDA error (e.g. cudaErrorInsufficientDriver) as the reason the backend is unavailable. Modules are
built once per (device, source, options); CuPy keeps the compiled binaries on disk.
"""
from __future__ import annotations

import threading

import cupy as cp
import numpy as np

from ..spec import Conv2dGeometry
from . import _kernels
from .base import BackendUnavailable, DeviceInfo

_COMPILE_OPTIONS = ("-std=c++17",)


class Runtime:
    """One GPU's compiled kernels. Threads share it: CuPy passes a kernel's arguments with each launch,
    and its memory pool hands a freed block only to later work on the same stream, so per-call buffers
    need no lock; builds take one."""

    # CUDA has no per-buffer limit: a quarter of the memory caps each buffer, so a call's set fits.
    max_alloc_name = "a quarter of the GPU's memory"

    def __init__(self, info: DeviceInfo):
        self.info = info
        self.device = cp.cuda.Device(info.index)
        facts = info.facts
        self.limits = _kernels.DeviceLimits(info.type, facts["max_threads_per_block"], facts["shared_memory_per_block"],
                                            facts["global_memory"] // 4)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cp.RawKernel] = {}
        self._build_lock = threading.Lock()

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cp.RawKernel:
        """The kernel `name` of `source` compiled with `options`; KernelBuildError carries the NVRTC log."""
        key = (source, name, tuple(options))
        with self._build_lock, self.device:
            if key not in self._kernels:
                try:
                    module = cp.RawModule(code=source, options=_COMPILE_OPTIONS + tuple(options))
                    self._kernels[key] = module.get_function(name)
                except cp.cuda.compiler.CompileException as exc:
                    raise _kernels.KernelBuildError(f"CUDA build of {name} failed on {self.info}: {exc}") from exc
            return self._kernels[key]

    @staticmethod
    def max_threads(kernel: cp.RawKernel) -> int:
        return kernel.max_threads_per_block

    def upload(self, array: np.ndarray):
        """A device copy that is complete on return, so work on any stream (any thread's) may read it."""
        with self.device:
            out = cp.asarray(array)
            cp.cuda.get_current_stream().synchronize()
            return out

    def empty(self, shape):
        """A float32 array from CuPy's pool, ordered on the current stream."""
        with self.device:
            return cp.empty(shape, np.float32)


class CudaPrepared(_kernels.KernelPrepared):
    def _launch(self, x, y, geom: Conv2dGeometry, winograd: bool, marks: list | None) -> None:
        """The kernels of one part; `marks` (when timed) gets stream events before the first and after the last."""
        stream = cp.cuda.get_current_stream()
        if marks is not None and not marks:
            marks.append(stream.record())
        for kernel, launch, buffers in self._steps(x, y, geom, winograd):
            kernel(launch.grid, launch.local_size, (*buffers, *launch.scalars))
        if marks is not None:
            marks[1:] = [stream.record()]

    def _run(self, x, geom: Conv2dGeometry, timed: bool):
        """Everything goes on the caller's current stream, so it orders with the caller's own work. A
        batch whose buffers pass the cap runs in parts: slices along the batch are plain device pointers."""
        rt = self._rt
        self._check_open()
        with rt.device:
            stream = cp.cuda.get_current_stream()
            host = isinstance(x, np.ndarray)
            winograd = self.uses_winograd(x, geom)
            chunks = self.chunks(geom, winograd, one_output=not host)
            marks = [] if timed else None
            if host:
                y = np.empty(geom.output_shape, np.float32)
                for start, part in chunks:
                    images = slice(start, start + part.n)
                    xdev, ydev = rt.empty(part.input_shape), rt.empty(part.output_shape)
                    xdev.set(x[images], stream=stream)
                    self._launch(xdev, ydev, part, winograd, marks)
                    ydev.get(stream=stream, out=y[images])
            else:
                if x.device.id != rt.info.index:
                    raise ValueError(f"x is on CUDA device {x.device.id}, this layer on {rt.info.index}")
                xdev = cp.ascontiguousarray(x)
                y = cp.empty(geom.output_shape, np.float32)
                for start, part in chunks:
                    images = slice(start, start + part.n)
                    self._launch(xdev[images], y[images], part, winograd, marks)
            seconds = None
            if timed:
                marks[-1].synchronize()
                seconds = cp.cuda.get_elapsed_time(marks[0], marks[-1]) * 1e-3
            return y, seconds

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
