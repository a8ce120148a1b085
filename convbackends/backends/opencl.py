"""OpenCL backend: pyopencl over the shared kernels/ sources.

One context and one profiling queue per device; programs are built once per (source, options) and
their kernel objects kept. Built binaries persist on disk between processes: pyopencl caches them
under ~/.cache/convbackends/opencl (keyed by source, options, device and driver) where the driver
does not, and PoCL and NVIDIA keep their own build caches.
"""
from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
from pyopencl.tools import ImmediateAllocator, MemoryPool

from ..spec import Conv2dGeometry
from . import _kernels
from .base import BackendUnavailable, DeviceInfo


def _device_type(device: cl.Device) -> str:
    if device.type & cl.device_type.GPU:
        return "integrated-gpu" if device.host_unified_memory else "gpu"
    if device.type & cl.device_type.CPU:
        return "cpu"
    return "other"


class Runtime:
    """One device's context, in-order profiling queue, memory pool and built kernels."""

    def __init__(self, device: cl.Device, info: DeviceInfo):
        self.device = device
        self.info = info
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self.pool = MemoryPool(ImmediateAllocator(self.queue))
        self.limits = _kernels.DeviceLimits(info.type, device.max_work_group_size, device.local_mem_size,
                                            device.max_mem_alloc_size)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cl.Kernel] = {}

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cl.Kernel:
        """The kernel `name` of `source` built with `options`; KernelBuildError carries the build log."""
        key = (source, name, tuple(options))
        if key not in self._kernels:
            try:
                program = cl.Program(self.context, source).build(
                    options=list(options), cache_dir=str(_kernels.cache_dir("opencl"))
                )
            except cl.Error as exc:
                raise _kernels.KernelBuildError(f"OpenCL build of {name} failed on {self.info}: {exc}") from exc
            self._kernels[key] = cl.Kernel(program, name)
        return self._kernels[key]

    def max_threads(self, kernel: cl.Kernel) -> int:
        return kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device)

    def contiguous(self, x: cla.Array) -> cla.Array:
        """x itself when it is C-contiguous at offset 0, else a contiguous device copy of the view."""
        if x.flags.c_contiguous and x.offset == 0:
            return x
        kernel = self.kernel(_kernels.source("copy_strided"), "copy_strided")
        launch = _kernels.copy_launch(x.shape, [s // x.dtype.itemsize for s in x.strides], x.offset // x.dtype.itemsize)
        out = cla.empty(self.queue, x.shape, np.float32, allocator=self.pool)
        event = kernel(self.queue, launch.global_size, launch.local_size, x.base_data, out.data, *launch.scalars,
                       wait_for=x.events)
        out.add_event(event)
        return out


class OpenCLPrepared(_kernels.KernelPrepared):
    def _upload(self, array: np.ndarray) -> cla.Array:
        return cla.to_device(self._rt.queue, array, allocator=self._rt.pool)

    def _empty(self, shape) -> cla.Array:
        return cla.empty(self._rt.queue, shape, np.float32, allocator=self._rt.pool)

    def _enqueue(self, x: cla.Array, y: cla.Array, geom: Conv2dGeometry, wait_for, winograd: bool) -> list[cl.Event]:
        events = []
        for kernel, launch, arrays in self._steps(x, y, geom, winograd):
            # A 0-sized input has no buffer; no kernel reads it, so any buffer stands in.
            buffers = [a.data if a.size else self._direct.bias.data for a in arrays]
            events.append(kernel(self._rt.queue, launch.global_size, launch.local_size, *buffers, *launch.scalars,
                                 wait_for=wait_for))
            wait_for = events[-1:]
        return events

    def _run(self, x, geom: Conv2dGeometry):
        rt = self._rt
        self._check_open()
        if isinstance(x, np.ndarray):
            xdev, ydev = self._staging.get(geom)
            upload = cl.enqueue_copy(rt.queue, xdev.base_data, x, is_blocking=False) if x.size else None
            events = self._enqueue(xdev, ydev, geom, [upload] if upload else None, self.uses_winograd(x, geom))
            y = np.empty(geom.output_shape, np.float32)
            cl.enqueue_copy(rt.queue, y, ydev.base_data, wait_for=events[-1:])
            return y, events
        if x.context != rt.context:
            raise ValueError(f"x lives in another OpenCL context; create it on the queue of runtime({self.device.index})")
        x = rt.contiguous(x)
        y = self._empty(geom.output_shape)
        events = self._enqueue(x, y, geom, x.events, winograd=False)  # device arrays: see uses_winograd
        y.add_event(events[-1])
        return y, events

    def run(self, x, geom: Conv2dGeometry):
        return self._run(x, geom)[0]

    def profile(self, x, geom: Conv2dGeometry):
        y, events = self._run(x, geom)
        cl.wait_for_events(events)
        return y, (events[-1].profile.end - events[0].profile.start) * 1e-9


class OpenCLBackend(_kernels.KernelBackend):
    name = "opencl"
    prepared_class = OpenCLPrepared

    def __init__(self) -> None:
        super().__init__()
        self._cl_devices: list[cl.Device] = []

    def _enumerate(self) -> list[DeviceInfo]:
        try:
            platforms = cl.get_platforms()
        except cl.Error as exc:
            raise BackendUnavailable(f"no OpenCL platform: {exc}") from exc
        found = []
        for platform in platforms:
            try:
                devices = platform.get_devices()
            except cl.Error:  # a platform without devices answers DEVICE_NOT_FOUND
                continue
            for device in devices:
                facts = {
                    "platform": platform.name.strip(),
                    "vendor": device.vendor.strip(),
                    "driver": device.driver_version.strip(),
                    "opencl": device.version.strip(),
                    "compute_units": device.max_compute_units,
                    "global_memory": device.global_mem_size,
                    "max_work_group_size": device.max_work_group_size,
                    "local_memory": device.local_mem_size,
                    "max_buffer": device.max_mem_alloc_size,
                }
                self._cl_devices.append(device)
                found.append(DeviceInfo(self.name, len(found), device.name.strip(), _device_type(device), facts))
        return found

    def _make_runtime(self, info: DeviceInfo) -> Runtime:
        return Runtime(self._cl_devices[info.index], info)

    def owns(self, x) -> bool:
        return isinstance(x, cla.Array)


BACKEND = OpenCLBackend()
