"""The numpy runtime: the CPU as one device, its BLAS named, and the threads every numpy op runs on.

The ops (backends/numpy/) leave the GEMMs to BLAS, which threads them; the copies and elementwise
passes around them, which BLAS does not thread, they split over this runtime's pool with `in_parts`.
`set_num_threads(n)` sets the pool and BLAS's threads together (BLAS through threadpoolctl: that
limit holds for the whole process, numpy's own products included); `set_num_threads(None)` goes back
to the default, the cores this process may run on. `get_num_threads()` reads it back.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .base import Backend, DeviceInfo


def _blas_name() -> str:
    """The BLAS numpy was built against, from its build config (no printing, no import of extras)."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    except (AttributeError, KeyError, TypeError):
        return "unknown BLAS"
    name, version = blas.get("name", "unknown BLAS"), blas.get("version", "")
    return f"{name} {version}".strip()


# Copies and elementwise passes split over the cores from this many elements per part (512 KB, ~50-100 us):
# below it, waking a worker for a part (~20-30 us) costs about what it saves.
PARALLEL_MIN_ELEMS = 1 << 17

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_num_threads: int | None = None  # None: the cores


def scratch(slot: str, size: int) -> np.ndarray:
    """A per-thread reusable float32 buffer: a fresh tile-sized array each run would page-fault every time.

    Each thread keeps its largest buffer per slot (a few tiles and one padded input) for reuse.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.size < size:
        buf = buffers[slot] = np.empty(size, np.float32)
    return buf[:size]


def cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def workers() -> int:
    """Threads the numpy ops split their passes and blocks over: `set_num_threads`, else the cores."""
    return _num_threads or cores()


def get_num_threads() -> int:
    """The threads the numpy backend runs on (`set_num_threads`; by default the cores)."""
    return workers()


def set_num_threads(num_threads: int | None) -> None:
    """Run the numpy backend, and BLAS, on num_threads threads; None: the cores this process may run on.

    BLAS is set through threadpoolctl, for the whole process: every BLAS loaded by then (a library
    loaded later with a BLAS of its own, as cv2 bundles one, keeps its count: call it again after
    importing it); without threadpoolctl a warning says that BLAS keeps its own count. Set it between runs: a layer running meanwhile on another
    thread finishes on the threads it started with.
    """
    global _num_threads, _pool
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__} {num_threads!r}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    with _pool_lock:
        # The old pool is dropped, not shut down: a run still holding it can finish; its idle
        # threads exit once it is collected.
        _num_threads, _pool = num_threads, None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        warnings.warn("threadpoolctl is not installed, so BLAS keeps its own thread count "
                      "(pip install threadpoolctl to set it too)", RuntimeWarning, stacklevel=2)
        return
    threadpool_limits(limits=workers(), user_api="blas")


@contextlib.contextmanager
def num_threads(count: int | None):
    """`set_num_threads(count)` for a with-block, then the setting it found again."""
    saved = _num_threads
    set_num_threads(count)
    try:
        yield
    finally:
        set_num_threads(saved)


def _threads() -> ThreadPoolExecutor:
    """Workers for the passes BLAS does not thread (numpy releases the GIL in its loops)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="convbackends-numpy")
    return _pool


def in_parts(count: int, elems: int, fn) -> None:
    """fn(lo, hi) over contiguous parts of range(count), one per core, the calling thread taking one.

    For the copies and elementwise passes around the GEMMs, which BLAS does not thread (numpy
    releases the GIL in them). `elems` is the work in all; small jobs stay on the calling thread.
    Never called from a worker: a worker waiting on the pool could wait forever.
    """
    parts = max(1, min(workers(), count, elems // PARALLEL_MIN_ELEMS))
    if parts == 1:
        fn(0, count)
        return
    bounds = [count * i // parts for i in range(parts + 1)]
    futures = [_threads().submit(fn, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
    fn(bounds[0], bounds[1])
    for future in futures:
        future.result()


class NumpyBackend(Backend):
    name = "numpy"
    family = "numpy"

    def _enumerate(self) -> list[DeviceInfo]:
        blas = _blas_name()
        facts = {"cores": os.cpu_count(), "numpy": np.__version__, "blas": blas}
        return [DeviceInfo(self.name, 0, f"CPU (numpy {np.__version__}, {blas})", "cpu", facts)]


BACKEND = NumpyBackend()
