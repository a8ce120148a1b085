"""conv_transpose2d_phases on any backend: each stride phase of the layer (ops/conv_transpose2d.py `phases`) is
a conv2d prepared by the same backend (so it runs that backend's implicit GEMM, 1x1 GEMM, depthwise or
Winograd with the fused bias and activation), and the phases' outputs are interleaved into y.

Host arrays are interleaved on the host (a strided copy per phase, no zeros ever multiplied); a family with
device arrays supplies `interleave_on_device` (kernels/conv_transpose2d_phases.h for OpenCL and CUDA).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from . import Prepared, implementation

# Phase sets kept per layer: one per distinct output_padding (at most max(stride, dilation)^2), or per
# input size in the rare layers whose bias-only phases depend on it.
PHASE_SETS_KEPT = 8


class PhasesPrepared(Prepared):
    """A transposed layer as its phases' conv2d layers, prepared on first use of each phase set."""

    def __init__(self, backend, spec, w: np.ndarray, b: np.ndarray | None, device):
        self.device, self.spec = device, spec
        self._backend, self._conv2d = backend, implementation("conv2d", backend)
        self._w, self._b = w.copy(), None if b is None else b.copy()
        self._sets: OrderedDict[tuple, list] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def _phase_layers(self, geom) -> list[tuple[object, object]]:
        """[(phase, its prepared conv2d)] for this geometry."""
        phases = self.spec.phases(geom)
        key = tuple((p.rows.taps, p.cols.taps, p.spec) for p in phases)
        with self._lock:
            if self._closed:
                raise ValueError("this layer is closed")
            found = self._sets.pop(key, None)
            if found is None:
                found = [(p, self._conv2d.prepare(self._backend, p.spec, p.weights(self._w, self.spec.groups),
                                                  self._b, self.device)) for p in phases]
            self._sets[key] = found
            while len(self._sets) > PHASE_SETS_KEPT:
                for _, prepared in self._sets.popitem(last=False)[1]:
                    prepared.close()
            return found

    def run(self, x, geom):
        return self._run(x, geom, timed=False)[0]

    def profile(self, x, geom):
        return self._run(x, geom, timed=True)

    def _run(self, x, geom, timed: bool):
        layers = self._phase_layers(geom)
        host = isinstance(x, np.ndarray)
        y = np.empty(geom.output_shape, np.float32) if host else self.empty_on_device(x, geom.output_shape)
        total = 0.0 if timed else None
        for phase, prepared in layers:
            rows, cols = phase.crop(geom.h, geom.w)
            part = x[:, :, rows, cols]
            if host:
                part = np.ascontiguousarray(part)
            sub = phase.spec.geometry(part.shape)
            if timed:
                out, seconds = prepared.profile(part, sub)
                total = None if seconds is None or total is None else total + seconds
            else:
                out = prepared.run(part, sub)
            if host:
                y[:, :, phase.rows.start::geom.sh, phase.cols.start::geom.sw] = out
            else:
                self.interleave_on_device(out, y, phase.rows.start, phase.cols.start, geom.sh, geom.sw)
        return y, total

    def empty_on_device(self, x, shape):
        raise TypeError(f"{type(self).__name__} takes host arrays only")

    def interleave_on_device(self, part, y, row0: int, col0: int, sh: int, sw: int) -> None:
        raise TypeError(f"{type(self).__name__} takes host arrays only")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for layers in self._sets.values():
                for _, prepared in layers:
                    prepared.close()
            self._sets.clear()


def prepare(backend, spec, w: np.ndarray, b: np.ndarray | None, device) -> PhasesPrepared:
    return PhasesPrepared(backend, spec, w, b, device)
