"""What the OpenCL and CUDA runtimes share: kernel sources, the device facts tile choice needs, launch sizes,
and the one interface (`KernelRuntime`) that the ops in backends/kernel/ program against. A runtime compiles,
allocates, copies and launches; it knows no op.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from .base import Backend, DeviceInfo

# Work-group size of the one-element-per-work-item kernels (copy_strided).
LINEAR_LOCAL_SIZE = 256


class KernelBuildError(RuntimeError):
    """A kernel failed to compile; the message holds the compiler's log."""


def cache_dir(api: str) -> Path:
    """Where compiled binaries persist between processes: the platform's user cache folder
    ($XDG_CACHE_HOME or ~/.cache on Linux), as platformdirs (a pyopencl dependency) knows it."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("convbackends")) / api


@functools.cache
def read_kernel(name: str) -> str:
    return files("convbackends.kernels").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def source(*names: str) -> str:
    """One program's source: kernels/prelude.h, then the named kernel files, in one string."""
    return "\n".join(read_kernel(name) for name in ("prelude.h", *names))


@dataclass(frozen=True)
class DeviceLimits:
    """What tile choice needs to know about a device, queried from the driver."""

    type: str  # a DeviceInfo.type
    max_threads: int  # work-items per work-group
    local_mem: int  # bytes of local/shared memory per work-group
    max_alloc: int = 1 << 62  # bytes of the largest buffer

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    @property
    def index_type(self) -> str:
        """INDEX_T of kernels/prelude.h: 64-bit on CPU compilers, which vectorise only then."""
        return "long" if self.is_cpu else "int"


@dataclass(frozen=True)
class Launch:
    """One dispatch in OpenCL terms: global and local sizes in work-items, then the scalar arguments."""

    global_size: tuple[int, int, int]
    local_size: tuple[int, int, int]
    scalars: tuple

    @property
    def grid(self) -> tuple[int, int, int]:
        """CUDA's grid: work-groups per dimension."""
        return tuple(g // l for g, l in zip(self.global_size, self.local_size))


def i32(*values) -> tuple:
    return tuple(np.int32(v) for v in values)


def linear_launch(total: int, scalars: tuple) -> Launch:
    size = max(1, math.ceil(total / LINEAR_LOCAL_SIZE)) * LINEAR_LOCAL_SIZE
    return Launch((size, 1, 1), (LINEAR_LOCAL_SIZE, 1, 1), scalars)


def copy_launch(shape, strides, offset) -> Launch:
    """copy_strided over a 4-D view: element strides and offset, into a contiguous array."""
    total = math.prod(shape)
    return linear_launch(total, i32(offset, *shape[1:], *strides) + (np.int64(total),))


class GeometryCache:
    """Per-input-size device objects (gather tables), a few sizes kept; safe to share between threads."""

    def __init__(self, make, size: int = 8):
        self._make = make
        self._size = size
        self._items: dict = {}
        self._lock = threading.Lock()

    def get(self, geom):
        with self._lock:
            item = self._items.get(geom)
        if item is None:
            item = self._make(geom)  # outside the lock: an upload may wait for the queue
            with self._lock:
                item = self._items.setdefault(geom, item)  # a thread that made it first wins
                while len(self._items) > self._size:
                    del self._items[next(iter(self._items))]
        return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass(frozen=True)
class CallBuffer:
    """A device buffer one call allocates: `per_image` bytes for each image of the batch plus up to
    `extra`, within `cap` bytes where the path sets its own cap (else the device's largest buffer)."""

    name: str
    per_image: int
    extra: int = 0
    cap: int | None = None

    def nbytes(self, images: int) -> int:
        return self.per_image * images + self.extra


def images_per_chunk(n: int, buffers: list[CallBuffer], max_alloc: int, limit_name: str, backend: str) -> int:
    """The most images of the batch one call may take so that each buffer stays within its cap and the
    device's largest buffer; a ValueError naming the buffer and the limit when one image is too many."""
    fit = n
    for buf in buffers:
        cap = max_alloc if buf.cap is None else min(buf.cap, max_alloc)
        images = (cap - buf.extra) // max(buf.per_image, 1)
        if images < 1:
            raise ValueError(
                f"{backend}: one image needs a {buf.name} of {buf.nbytes(1)} bytes, more than the device's largest "
                f"buffer ({limit_name}: {max_alloc} bytes)"
            )
        fit = min(fit, images)
    return fit


class KernelRuntime(ABC):
    """One device of a kernel API: compiled kernels, device arrays, launches, a device timer.

    Launches go to one in-order queue (OpenCL) or the caller's current stream (CUDA), so a sequence of
    launches needs no events between them.
    """

    info: DeviceInfo
    limits: DeviceLimits
    max_alloc_name: str  # what limits.max_alloc is called on this API, for error messages

    @abstractmethod
    def kernel(self, source: str, name: str, options: tuple[str, ...] = ()):
        """The kernel `name` of `source` built with `options`, built once; KernelBuildError with the log."""

    @abstractmethod
    def max_threads(self, kernel) -> int:
        """Work-items per group the built kernel allows (register pressure can lower the device's)."""

    @abstractmethod
    def upload(self, array: np.ndarray):
        """A read-only device buffer holding a copy of `array`, complete before any later launch reads it."""

    @abstractmethod
    def empty(self, shape, dtype=np.float32):
        """A scratch buffer (float32 unless told) from the device's pool, for one call (freed when dropped)."""

    @abstractmethod
    def zero(self, buf, start: int, count: int) -> None:
        """Fill float32 elements [start, start + count) of an `empty` buffer with zeros, in launch order."""

    @abstractmethod
    def empty_array(self, shape, dtype=np.float32):
        """A device array (float32 unless told) of the API's array type, to hand to the user or read back."""

    @abstractmethod
    def read(self, device, out: np.ndarray) -> None:
        """Copy a device buffer or array (float32, out's size) into the host array `out`, finished on return."""

    @abstractmethod
    def run_host(self, x: np.ndarray, y: np.ndarray, launch) -> None:
        """Run `launch(x_device, y_device)` on host arrays x (read) and y (written), finished on return:
        in place where host memory is device memory, else through pooled device copies."""

    @abstractmethod
    def run_part(self, x, y, start: int, count: int, launch) -> None:
        """Run `launch(x_part, y_part)` on images [start, start + count) of device arrays x and y."""

    @abstractmethod
    def device_input(self, x):
        """A device array of this runtime given by the user, as a C-contiguous array of this device
        (a copy only when x is a strided view); ValueError when x lives elsewhere."""

    @abstractmethod
    def launch(self, kernel, launch: Launch, buffers: list) -> None:
        """Enqueue one kernel over device buffers or arrays (None: an empty input no kernel reads) then
        scalars; as one step with respect to other threads."""

    @abstractmethod
    def returned(self, y):
        """A device array being handed back to the user: the API's completion marker attached."""

    @abstractmethod
    def finish(self) -> None:
        """Wait until the work queued so far is done (benchmarks time device work with it)."""

    @contextlib.contextmanager
    def timer(self):
        """Time the launches made inside, on the device: yields a list that gets the seconds (or None)."""
        result = [None]
        yield result


class KernelBackend(Backend):
    """A backend over kernels/: one runtime (context, compiled kernels) per device, made lazily."""

    family = "kernel"

    def __init__(self) -> None:
        super().__init__()
        self._runtimes: dict[int, KernelRuntime] = {}
        self._runtimes_lock = threading.Lock()

    @abstractmethod
    def _make_runtime(self, info: DeviceInfo) -> KernelRuntime:
        """The API's context and kernel cache for one device."""

    def runtime(self, device=None) -> KernelRuntime:
        """The runtime of a device, given as `select` takes it."""
        info = self.select(device)
        with self._runtimes_lock:
            if info.index not in self._runtimes:
                self._runtimes[info.index] = self._make_runtime(info)
            return self._runtimes[info.index]
