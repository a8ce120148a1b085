"""What every op object shares: one spec, one backend and device, one prepared implementation.

`Layer` resolves the backend, finds the op's implementation for it (`backends.implementation`), prepares the
weights once and releases them when closed or collected. `OneShotCache` lets the functional forms
(`conv2d(x, w, ...)`) reuse a prepared layer across calls with the same weights.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..arrays import host_array, to_backend
from ..backends import implementation, unsupported
from ..runtime import get_backend

__all__ = ["Layer", "OneShotCache", "ONE_SHOT", "clear_one_shot_cache", "host_array"]


class Layer:
    """An op prepared for one backend and device. Subclasses build their spec, then call `_prepare`.

    Device memory is released by `close()` (or the context manager), or else when the layer is
    garbage-collected: the finalizer holds the prepared implementation, never the layer.
    """

    op: str  # the op's module name in backends/<family>/

    def _prepare(self, spec, backend, device, *arrays) -> None:
        self.spec = spec
        self.backend = get_backend(backend)
        self.device = self.backend.select(device)
        reason = unsupported(self.op, self.backend, spec, self.device)
        if reason:
            raise ValueError(f"backend {self.backend.name!r} cannot run this layer: {reason}")
        module = implementation(self.op, self.backend)
        self._prepared = module.prepare(self.backend, spec, *arrays, self.device)
        self._finalizer = weakref.finalize(self, self._prepared.close)

    def _input(self, name: str, x):
        """(the array handed to the backend, the function returning a result in x's kind): see arrays.py."""
        if self._prepared is None:
            raise ValueError(f"this {type(self).__name__} is closed")
        return to_backend(name, x, self.backend, self.device)

    def _run(self, x, geom):
        x, restore = self._input("x", x)
        return restore(self._prepared.run(x, geom))

    def _profile(self, x, geom):
        """Run once; returns (y, device seconds or None where the API gives no device timer)."""
        x, restore = self._input("x", x)
        y, seconds = self._prepared.profile(x, geom)
        return restore(y), seconds

    def close(self) -> None:
        if self._prepared is not None:
            self._finalizer()
            self._prepared = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Weights below this are compared on the calling thread, not alongside a device call: 1 MiB takes memcmp
# about 0.05 ms, about what handing the compare to another thread costs on a busy 2-core machine.
OVERLAP_MIN_BYTES = 1 << 20


class OneShotCache:
    """Prepared layers kept for the functional forms, so `conv2d(x, w)` in a loop prepares once.

    An entry is found by the op, backend, device, spec and the identity of the weight arrays, and is
    used only if every weight array still holds exactly the bytes it was prepared from (compared with
    a private copy, a memory-speed pass): a weight changed in place between two calls is prepared
    afresh. At most `max_layers` entries and `max_bytes` of weight copies are kept, least recently
    used first out; an evicted layer is released when no call uses it any more (its finalizer).
    """

    def __init__(self, max_layers: int = 8, max_bytes: int = 512 << 20):
        self.max_layers, self.max_bytes = max_layers, max_bytes
        self._entries: OrderedDict[tuple, tuple[Layer, tuple[np.ndarray, ...]]] = OrderedDict()
        self._lock = threading.Lock()
        self._comparer: ThreadPoolExecutor | None = None

    def run(self, key: tuple, arrays: tuple, make, call):
        """call(layer) on the cached layer for `key` and the weight `arrays` (any kind `arrays.host_array`
        takes, or None), or on `make(*host_arrays)` stored anew.

        On a device backend the compare of the weights with their copies runs on another thread while the
        call runs (its thread mostly waits for the device): on PoCL this took a 9.4 MB layer's one-shot
        overhead from 2.3 to 0.8 ms. If they differ, that result is dropped and the call runs again on a
        layer prepared from the new weights. The numpy backend compares first: there the compare would
        take the cores from the call. So do small weights, whose compare takes less than handing it to the
        thread (which waits for a core the device's threads hold).
        """
        hosts, key = self._key(key, arrays)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            layer, copies = entry
            if layer.backend.family == "numpy" or sum(c.nbytes for c in copies if c is not None) < OVERLAP_MIN_BYTES:
                if _all_same(hosts, copies):
                    return call(self._used(key, layer))
            else:
                same = self._compare_thread().submit(_all_same, hosts, copies)
                result = call(layer)
                if same.result():
                    self._used(key, layer)
                    return result
        return call(self._store(key, hosts, make))

    @staticmethod
    def _key(key: tuple, arrays: tuple) -> tuple[tuple, tuple]:
        hosts = tuple(None if a is None else host_array(name, a) for name, a in zip("wb", arrays))
        return hosts, (*key, tuple(None if a is None else (id(a), h.shape) for a, h in zip(arrays, hosts)))

    def _used(self, key: tuple, layer: Layer) -> Layer:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
        return layer

    def _store(self, key: tuple, hosts: tuple, make) -> Layer:
        layer = make(*hosts)
        copies = tuple(None if h is None else h.copy() for h in hosts)
        size = sum(c.nbytes for c in copies if c is not None)
        if size <= self.max_bytes:
            with self._lock:
                self._entries[key] = (layer, copies)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_layers or self._bytes() > self.max_bytes:
                    self._entries.popitem(last=False)
        return layer

    def _compare_thread(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._comparer is None:
                self._comparer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="convbackends-one-shot")
            return self._comparer

    def _bytes(self) -> int:
        return sum(c.nbytes for _, copies in self._entries.values() for c in copies if c is not None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _all_same(hosts: tuple, copies: tuple) -> bool:
    return all(_same_bytes(h, c) for h, c in zip(hosts, copies))


def _same_bytes(array, copy) -> bool:
    """Whether array holds exactly copy's bytes (bit patterns: NaN weights equal themselves, -0.0 differs
    from 0.0). copy is C-contiguous; a C-contiguous array is compared by the C library's memcmp, which
    took 0.73 ms for 9.4 MB where numpy's elementwise compare took 1.7 (docs/performance-notes.md)."""
    if array is None or copy is None:
        return array is copy
    if array.shape != copy.shape or array.dtype != copy.dtype:
        return False
    memcmp = _memcmp()
    if memcmp is not None and array.flags.c_contiguous:
        return memcmp(array.ctypes.data, copy.ctypes.data, array.nbytes) == 0
    return np.array_equal(array.view(np.uint32), copy.view(np.uint32))


@functools.cache
def _memcmp():
    """The C library's memcmp (ctypes lets go of the GIL while it runs), or None where none loads."""
    try:
        memcmp = (ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)).memcmp
    except (OSError, AttributeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return memcmp


ONE_SHOT = OneShotCache()


def clear_one_shot_cache() -> None:
    """Release the layers the functional forms keep (conv2d(...), ...)."""
    ONE_SHOT.clear()
