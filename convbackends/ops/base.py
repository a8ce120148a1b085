"""What every op object shares: one spec, one backend and device, one prepared implementation.

`Layer` resolves the backend, finds the op's implementation for it (`backends.implementation`), prepares the
weights once and releases them when closed or collected. `OneShotCache` lets the functional forms
(`conv2d(x, w, ...)`) reuse a prepared layer across calls with the same weights.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import numpy as np

from ..backends import implementation, unsupported
from ..runtime import get_backend


def host_array(name: str, array) -> np.ndarray:
    """A weight-like argument as a C-contiguous numpy array (a copy only when it is a strided view)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    return np.ascontiguousarray(array)


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

    def _input(self, x, name: str = "x"):
        """The array handed to the backend: C-contiguous numpy, or a device array the backend owns."""
        if self._prepared is None:
            raise ValueError(f"this {type(self).__name__} is closed")
        if isinstance(x, np.ndarray):
            return np.ascontiguousarray(x)
        if self.backend.owns(x):
            return x
        raise TypeError(
            f"{name} must be a numpy.ndarray or a device array of backend {self.backend.name!r}, got {type(x).__name__}"
        )

    def _run(self, x, geom):
        x = self._input(x)
        return self._prepared.run(x, geom)

    def _profile(self, x, geom):
        """Run once; returns (y, device seconds or None where the API gives no device timer)."""
        x = self._input(x)
        return self._prepared.profile(x, geom)

    def close(self) -> None:
        if self._prepared is not None:
            self._finalizer()
            self._prepared = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

    def layer(self, key: tuple, arrays: tuple, make) -> Layer:
        """The cached layer for `key` prepared from `arrays` (numpy or None), or `make()` stored anew."""
        key = (*key, tuple(None if a is None else (id(a), a.shape) for a in arrays))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and all(_same_bytes(a, c) for a, c in zip(arrays, entry[1])):
                self._entries.move_to_end(key)
                return entry[0]
        layer = make()
        copies = tuple(None if a is None else a.copy() for a in arrays)
        size = sum(c.nbytes for c in copies if c is not None)
        if size <= self.max_bytes:
            with self._lock:
                self._entries[key] = (layer, copies)
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_layers or self._bytes() > self.max_bytes:
                    self._entries.popitem(last=False)
        return layer

    def _bytes(self) -> int:
        return sum(c.nbytes for _, copies in self._entries.values() for c in copies if c is not None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _same_bytes(array, copy) -> bool:
    if array is None or copy is None:
        return array is copy
    # Bit patterns, so NaN weights compare equal to themselves and -0.0 differs from 0.0.
    bits = np.ascontiguousarray(array).view(np.uint32)
    return bits.shape == copy.shape and np.array_equal(bits, copy.view(np.uint32))


ONE_SHOT = OneShotCache()


def clear_one_shot_cache() -> None:
    """Release the layers the functional forms keep (conv2d(...), ...)."""
    ONE_SHOT.clear()
