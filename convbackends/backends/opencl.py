"""OpenCL backend: pyopencl over the shared kernels/ sources.

One context and one profiling queue per device; programs are built once per (source, options) and
their kernel objects kept. Built binaries persist on disk between processes: pyopencl caches them
under ~/.cache/convbackends/opencl (keyed by source, options, device and driver) where the driver
does not, and PoCL and NVIDIA keep their own build caches.
"""
from __future__ import annotations

import math
import threading

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
    """One device's context, in-order profiling queue, memory pool and built kernels.

    Threads share it: builds and launches take locks, since one built kernel object serves every layer
    that needs it, and setting a kernel's arguments then enqueueing it is two OpenCL calls that another
    thread's launch of that kernel must not come between. The queue is in order, so a pooled buffer
    freed after its last enqueue is safe to hand to the next allocation.
    """

    max_alloc_name = "CL_DEVICE_MAX_MEM_ALLOC_SIZE"

    def __init__(self, device: cl.Device, info: DeviceInfo):
        self.device = device
        self.info = info
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self.pool = MemoryPool(ImmediateAllocator(self.queue))
        self.limits = _kernels.DeviceLimits(info.type, device.max_work_group_size, device.local_mem_size,
                                            device.max_mem_alloc_size)
        # Host and device share memory (CPU devices, integrated GPUs): host arrays are used in place.
        self.unified = bool(device.host_unified_memory)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cl.Kernel] = {}
        self._build_lock = threading.Lock()
        self._launch_lock = threading.Lock()

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cl.Kernel:
        """The kernel `name` of `source` built with `options`; KernelBuildError carries the build log."""
        key = (source, name, tuple(options))
        with self._build_lock:
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

    def launch(self, kernel: cl.Kernel, launch: _kernels.Launch, buffers, wait_for=None) -> cl.Event:
        """Set the kernel's arguments and enqueue it, as one step with respect to other threads."""
        with self._launch_lock:
            return kernel(self.queue, launch.global_size, launch.local_size, *buffers, *launch.scalars,
                          wait_for=wait_for)

    def upload(self, array: np.ndarray) -> cl.Buffer:
        return cl.Buffer(self.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=array)

    def empty(self, shape) -> cl.Buffer:
        """A pooled buffer for float32 `shape` (a plain buffer: a pyopencl Array costs ~20 us to make)."""
        return self.pool.allocate(4 * math.prod(shape))

    def host_buffer(self, array: np.ndarray, flags) -> cl.Buffer:
        """A buffer over a contiguous, non-empty host array's own memory (CL_MEM_USE_HOST_PTR)."""
        return cl.Buffer(self.context, flags | cl.mem_flags.USE_HOST_PTR, hostbuf=array)

    def contiguous(self, x: cla.Array) -> cla.Array:
        """x itself when it is C-contiguous at offset 0, else a contiguous device copy of the view."""
        if x.flags.c_contiguous and x.offset == 0:
            return x
        kernel = self.kernel(_kernels.source("copy_strided"), "copy_strided")
        launch = _kernels.copy_launch(x.shape, [s // x.dtype.itemsize for s in x.strides], x.offset // x.dtype.itemsize)
        out = cla.empty(self.queue, x.shape, np.float32, allocator=self.pool)
        out.add_event(self.launch(kernel, launch, [x.base_data, out.data], wait_for=x.events))
        return out


class OpenCLPrepared(_kernels.KernelPrepared):
    def _enqueue(self, x, y, geom: Conv2dGeometry, wait_for, winograd: bool) -> list[cl.Event]:
        """The launches of one part; x and y are buffers, x None when the input is empty."""
        events = []
        for kernel, launch, buffers in self._steps(x, y, geom, winograd):
            # An empty input has no buffer; no kernel reads it, so any buffer stands in.
            buffers = [self._direct.bias if b is None else b for b in buffers]
            events.append(self._rt.launch(kernel, launch, buffers, wait_for))
            wait_for = events[-1:]
        return events

    def _run_host(self, x: np.ndarray, y: np.ndarray, geom: Conv2dGeometry, winograd: bool) -> list[cl.Event]:
        """One part of a numpy call, finished on return: where host memory is device memory the kernels
        read x and write y in place (and a map makes y current), else through pooled device copies."""
        rt, mf = self._rt, cl.mem_flags
        if rt.unified and x.size:
            ydev = rt.host_buffer(y, mf.WRITE_ONLY)
            events = self._enqueue(rt.host_buffer(x, mf.READ_ONLY), ydev, geom, None, winograd)
            mapped, _ = cl.enqueue_map_buffer(rt.queue, ydev, cl.map_flags.READ, 0, y.shape, y.dtype,
                                              wait_for=events[-1:], is_blocking=False)
            mapped.base.release(rt.queue).wait()
            return events
        xdev, ydev = rt.empty(x.shape) if x.size else None, rt.empty(y.shape)
        upload = [cl.enqueue_copy(rt.queue, xdev, x, is_blocking=False)] if x.size else None
        events = self._enqueue(xdev, ydev, geom, upload, winograd)
        cl.enqueue_copy(rt.queue, y, ydev, wait_for=events[-1:])
        return events

    def _run(self, x, geom: Conv2dGeometry):
        rt = self._rt
        self._check_open()
        if isinstance(x, np.ndarray):
            winograd = self.uses_winograd(x, geom)
            y = np.empty(geom.output_shape, np.float32)
            events = []
            for start, part in self.chunks(geom, winograd):
                images = slice(start, start + part.n)
                events += self._run_host(x[images], y[images], part, winograd)
            return y, events
        if x.context != rt.context:
            raise ValueError(f"x lives in another OpenCL context; create it on the queue of runtime({self.device.index})")
        chunks = self.chunks(geom, winograd=False, one_output=True)  # device arrays: see uses_winograd
        x = rt.contiguous(x)
        y = cla.empty(rt.queue, geom.output_shape, np.float32, allocator=rt.pool)
        if len(chunks) == 1:
            events = self._enqueue(x.base_data, y.data, geom, x.events, winograd=False)
            y.add_event(events[-1])
            return y, events
        events = []
        for start, part in chunks:
            xpart, ypart = rt.contiguous(x[start:start + part.n]), rt.empty(part.output_shape)
            events += self._enqueue(xpart.base_data, ypart, part, xpart.events, winograd=False)
            nbytes = 4 * math.prod(part.output_shape)
            y.add_event(cl.enqueue_copy(rt.queue, y.data, ypart, byte_count=nbytes, dst_offset=start * nbytes // part.n,
                                        wait_for=events[-1:]))
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
        found, cl_devices = [], []
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
                cl_devices.append(device)
                found.append(DeviceInfo(self.name, len(found), device.name.strip(), _device_type(device), facts))
        self._cl_devices = cl_devices  # whole, so a second thread's enumeration cannot interleave
        return found

    def _make_runtime(self, info: DeviceInfo) -> Runtime:
        return Runtime(self._cl_devices[info.index], info)

    def owns(self, x) -> bool:
        return isinstance(x, cla.Array)


BACKEND = OpenCLBackend()
