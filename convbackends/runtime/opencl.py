"""OpenCL runtime: pyopencl over the shared kernels/ sources.

One context and one in-order profiling queue per device; programs are built once per (source, options)
and their kernel objects kept. Built binaries persist on disk between processes: pyopencl caches them
under ~/.cache/convbackends/opencl (keyed by source, options, device and driver) where the driver does
not, and PoCL and NVIDIA keep their own build caches.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
from pyopencl.tools import ImmediateAllocator, MemoryPool

from .base import BackendUnavailable, DeviceInfo
from .kernels import DeviceLimits, KernelBackend, KernelBuildError, KernelRuntime, cache_dir, copy_launch, source


def _device_type(device: cl.Device) -> str:
    if device.type & cl.device_type.GPU:
        return "integrated-gpu" if device.host_unified_memory else "gpu"
    if device.type & cl.device_type.CPU:
        return "cpu"
    return "other"


class Runtime(KernelRuntime):
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
        self.limits = DeviceLimits(info.type, device.max_work_group_size, device.local_mem_size,
                                   device.max_mem_alloc_size)
        # Host and device share memory (CPU devices, integrated GPUs): host arrays are used in place.
        self.unified = bool(device.host_unified_memory)
        self._kernels: dict[tuple[str, str, tuple[str, ...]], cl.Kernel] = {}
        self._build_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._typed: set[cl.Kernel] = set()  # kernels whose scalar argument types are declared
        self._timing = threading.local()
        self._placeholder = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, 4)

    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()) -> cl.Kernel:
        key = (source, name, tuple(options))
        with self._build_lock:
            if key not in self._kernels:
                try:
                    program = cl.Program(self.context, source).build(
                        options=list(options), cache_dir=str(cache_dir("opencl")))
                except cl.Error as exc:
                    raise KernelBuildError(f"OpenCL build of {name} failed on {self.info}: {exc}") from exc
                self._kernels[key] = cl.Kernel(program, name)
            return self._kernels[key]

    def max_threads(self, kernel: cl.Kernel) -> int:
        return kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device)

    def upload(self, array: np.ndarray) -> cl.Buffer:
        return cl.Buffer(self.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=array)

    def empty(self, shape, dtype=np.float32):
        """A pooled buffer for `shape` (a plain buffer: a pyopencl Array costs ~20 us to make)."""
        return self.pool.allocate(np.dtype(dtype).itemsize * math.prod(shape))

    def zero(self, buf, start: int, count: int) -> None:
        if count:
            cl.enqueue_fill_buffer(self.queue, buf, np.float32(0), 4 * start, 4 * count)

    def empty_array(self, shape, dtype=np.float32) -> cla.Array:
        return cla.empty(self.queue, shape, dtype, allocator=self.pool)

    def read(self, device, out: np.ndarray) -> None:
        cl.enqueue_copy(self.queue, out, device.base_data if isinstance(device, cla.Array) else device)

    def _host_buffer(self, array: np.ndarray, flags) -> cl.Buffer:
        """A buffer over a contiguous, non-empty host array's own memory (CL_MEM_USE_HOST_PTR)."""
        return cl.Buffer(self.context, flags | cl.mem_flags.USE_HOST_PTR, hostbuf=array)

    def run_host(self, x: np.ndarray, y: np.ndarray, launch) -> None:
        mf = cl.mem_flags
        if self.unified and x.size:
            ydev = self._host_buffer(y, mf.WRITE_ONLY)
            launch(self._host_buffer(x, mf.READ_ONLY), ydev)
            mapped, _ = cl.enqueue_map_buffer(self.queue, ydev, cl.map_flags.READ, 0, y.shape, y.dtype,
                                              is_blocking=False)
            mapped.base.release(self.queue).wait()  # the map makes y current; the unmap ends the call
            return
        xdev, ydev = (self.empty(x.shape) if x.size else None), self.empty(y.shape)
        if x.size:
            cl.enqueue_copy(self.queue, xdev, x, is_blocking=False)
        launch(xdev, ydev)
        cl.enqueue_copy(self.queue, y, ydev)

    def run_part(self, x: cla.Array, y: cla.Array, start: int, count: int, launch) -> None:
        if start == 0 and count == x.shape[0]:
            launch(x, y)
            return
        part = self.device_input(x[start:start + count])
        out = self.empty((count, *y.shape[1:]))
        launch(part, out)
        nbytes = 4 * math.prod((count, *y.shape[1:]))
        cl.enqueue_copy(self.queue, y.base_data, out, byte_count=nbytes, dst_offset=y.offset + start * nbytes // count)

    def device_input(self, x: cla.Array) -> cla.Array:
        if x.context != self.context:
            raise ValueError(f"x lives in another OpenCL context; create it on the queue of runtime({self.info.index})")
        if x.events:  # work queued on another queue of this context
            cl.wait_for_events(x.events)
        if x.flags.c_contiguous and x.offset == 0:
            return x
        kernel = self.kernel(source("copy_strided.h"), "copy_strided")
        out = self.empty_array(x.shape)
        shape = (1,) * (4 - x.ndim) + tuple(x.shape)
        strides = (0,) * (4 - x.ndim) + tuple(s // x.dtype.itemsize for s in x.strides)
        self.launch(kernel, copy_launch(shape, strides, x.offset // x.dtype.itemsize), [x, out])
        return out

    def launch(self, kernel, launch, buffers) -> None:
        args = [self._placeholder if a is None else a.base_data if isinstance(a, cla.Array) else a for a in buffers]
        with self._launch_lock:
            if kernel not in self._typed:
                # Declared once (every launch of a kernel passes the same numpy scalar types), pyopencl packs the
                # scalars itself: on PoCL its generic path cost ~0.5 ms a launch for 30 of them, this ~15 us.
                kernel.set_scalar_arg_dtypes([None] * len(args) + [s.dtype for s in launch.scalars])
                self._typed.add(kernel)
            event = kernel(self.queue, launch.global_size, launch.local_size, *args, *launch.scalars)
        events = getattr(self._timing, "events", None)
        if events is not None:
            events.append(event)

    def returned(self, y: cla.Array) -> cla.Array:
        y.add_event(cl.enqueue_marker(self.queue))
        return y

    def finish(self) -> None:
        self.queue.finish()

    @contextlib.contextmanager
    def timer(self):
        result, self._timing.events = [None], []
        try:
            yield result
        finally:
            events, self._timing.events = self._timing.events, None
        if events:
            cl.wait_for_events(events)
            result[0] = (events[-1].profile.end - events[0].profile.start) * 1e-9


class OpenCLBackend(KernelBackend):
    name = "opencl"

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

    def adopt(self, x, device: DeviceInfo):
        """Arrays of the runtime's own context stay on the device; an array of another context is read
        through the host and its result written back with its own queue (a round trip per call: make
        arrays on `runtime(device).queue` to avoid it)."""
        if not self.owns(x):
            return None
        if x.context == self.runtime(device).context:
            return x, lambda y: y
        queue = x.queue
        return np.ascontiguousarray(x.get()), lambda y: cla.to_device(queue, y)


BACKEND = OpenCLBackend()
