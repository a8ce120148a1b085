"""CUDA runtime: CuPy RawModule over the shared kernels/ sources.

CuPy imports without a GPU; the driver answers only when asked, so `probe` asks and reports the CUDA
error (e.g. cudaErrorInsufficientDriver) as the reason the backend is unavailable. Modules are built
once per (device, source, options); CuPy keeps the compiled binaries on disk. Everything runs on the
caller's current stream, so it orders with the caller's own work.
"""
from __future__ import annotations

import contextlib
import threading

import cupy as cp
import numpy as np

from .base import BackendUnavailable, DeviceInfo
from .kernels import DeviceLimits, KernelBackend, KernelBuildError, KernelRuntime

_COMPILE_OPTIONS = ("-std=c++17",)


class Runtime(KernelRuntime):
    """One GPU's compiled kernels. Threads share it: CuPy passes a kernel's arguments with each launch,
    and its memory pool hands a freed block only to later work on the same stream, so per-call buffers
    need no lock; builds take one."""

    # CUDA has no per-buffer limit: a quarter of the memory caps each buffer, so a call's set fits.
    max_alloc_name = "a quarter of the GPU's memory"

    def __init__(self, info: DeviceInfo):
        self.info = info
        self.device = cp.cuda.Device(info.index)
        facts = info.facts
        self.limits = DeviceLimits(info.type, facts["max_threads_per_block"], facts["shared_memory_per_block"],
                                   facts["global_memory"] // 4)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cp.RawKernel] = {}
        self._build_lock = threading.Lock()

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cp.RawKernel:
        key = (source, name, tuple(options))
        with self._build_lock, self.device:
            if key not in self._kernels:
                try:
                    module = cp.RawModule(code=source, options=_COMPILE_OPTIONS + tuple(options))
                    self._kernels[key] = module.get_function(name)
                except cp.cuda.compiler.CompileException as exc:
                    raise KernelBuildError(f"CUDA build of {name} failed on {self.info}: {exc}") from exc
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

    def empty(self, shape, dtype=np.float32):
        """An array from CuPy's pool, ordered on the current stream."""
        with self.device:
            return cp.empty(shape, dtype)

    empty_array = empty

    def zero(self, buf, start: int, count: int) -> None:
        with self.device:
            buf.reshape(-1)[start:start + count] = 0  # a fill kernel on the current stream

    def read(self, device, out: np.ndarray) -> None:
        with self.device:
            device.get(stream=cp.cuda.get_current_stream(), out=out)

    def run_host(self, x: np.ndarray, y: np.ndarray, launch) -> None:
        with self.device:
            stream = cp.cuda.get_current_stream()
            xdev, ydev = self.empty(x.shape), self.empty(y.shape)
            xdev.set(x, stream=stream)
            launch(xdev, ydev)
            ydev.get(stream=stream, out=y)

    def run_part(self, x, y, start: int, count: int, launch) -> None:
        launch(x[start:start + count], y[start:start + count])  # slices along the batch: plain pointers

    def device_input(self, x):
        if x.device.id != self.info.index:
            raise ValueError(f"x is on CUDA device {x.device.id}, this layer on {self.info.index}")
        with self.device:
            return cp.ascontiguousarray(x)

    def launch(self, kernel, launch, buffers) -> None:
        with self.device:
            kernel(launch.grid, launch.local_size, (*buffers, *launch.scalars))

    def returned(self, y):
        return y

    def finish(self) -> None:
        with self.device:
            cp.cuda.get_current_stream().synchronize()

    @contextlib.contextmanager
    def timer(self):
        result = [None]
        with self.device:
            stream = cp.cuda.get_current_stream()
            start = stream.record()
            yield result
            end = stream.record()
            end.synchronize()
            result[0] = cp.cuda.get_elapsed_time(start, end) * 1e-3


class CudaBackend(KernelBackend):
    name = "cuda"

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
