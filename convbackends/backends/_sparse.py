"""What the device backends of sparse_conv3d share (kernels/sparse_conv3d_*.h for OpenCL and CUDA,
shaders/sparse_conv3d_*.comp for Vulkan): the rulebook kept on the device in its two forms, the key width
and the radix passes a grid needs, the geometry table the kernels read.

The neighbour map nbr (n_out, K) int32 holds, for output row r and tap t, the input row r reads through t,
or -1: what the builds make, and what CPU devices compute over (output-stationary: each output row summed
over its taps in order). The pair lists are its columns read top down, per tap (in_rows, out_rows): the
canonical form of ops/sparse_conv3d.py `Rulebook.pairs`, and what GPUs compute over (a gather-GEMM-scatter
pass per tap). Neither needs atomics: the same bits on every run.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np

from ..ops.sparse_conv3d import Rulebook, RulebookGeometry

# Keys fit 31 bits (int32 keys) while batch * D * H * W stays below this; else 64-bit keys.
NARROW_KEY_LIMIT = 1 << 31
# Rows of the neighbour map, pair counts and scan sums are int32 on the device.
INT32_LIMIT = (1 << 31) - 1


def wide_keys(batch: int, shape) -> bool:
    """Whether the linear keys of a batch of grids of `shape` need 64 bits."""
    return batch * math.prod(shape) >= NARROW_KEY_LIMIT


def radix_shifts(batch: int, shape, bits: int) -> list[int]:
    """The digit shifts of an LSD radix sort of keys below batch * D * H * W, `bits` per digit."""
    span_bits = max(1, (batch * math.prod(shape) - 1).bit_length())
    return list(range(0, span_bits, bits))


def geometry_table(rules: RulebookGeometry) -> np.ndarray:
    """The kernels' geo: input grid, output grid, kernel, stride, padding, dilation (18 int32)."""
    return np.array([*rules.in_shape, *rules.out_shape, *rules.kernel, *rules.stride, *rules.padding,
                     *rules.dilation], np.int32)


def check_rows(name: str, rows: int, taps: int) -> None:
    """Device indices are int32: refuse site counts whose neighbour maps they cannot address."""
    if rows * taps > INT32_LIMIT:
        raise ValueError(f"{name}: {rows} sites x {taps} kernel taps exceed the device kernels' int32 row "
                         f"indices ({INT32_LIMIT}); split the batch")


class RulebookForms:
    """The device forms of one rulebook, each made once, on first use: the neighbour map nbr (n_out, K)
    (the build's result; output-stationary compute on CPU devices) and the pair lists (offsets (K + 1,)
    int64 on the host, in_rows and out_rows on the device: the canonical form, per-tap compute on GPUs).
    An inverse rulebook's forms derive from its regular rulebook's: the map transposed, the lists swapped.

    `ops` is the backend's: read_ints(buffer, count), transpose(nbr, n_out, n_in, taps) and
    pair_lists(nbr, n_out, taps), each on the device, and release(buffers), called with what these forms
    made once they are collected (the rulebook lives in the tensors' indice_dict)."""

    def __init__(self, ops, taps: int, n_out: int, n_in: int, neighbours=None, regular: "RulebookForms | None" = None):
        self.ops, self.taps, self.n_out, self.n_in = ops, taps, n_out, n_in
        self._neighbours, self._pair_lists, self._regular = neighbours, None, regular
        self._lock = threading.Lock()
        self._made = [] if neighbours is None else [neighbours]
        weakref.finalize(self, ops.release, self._made)

    def _map(self):
        if self._neighbours is None:
            regular = self._regular
            self._neighbours = self.ops.transpose(regular.neighbours(), regular.n_out, regular.n_in, self.taps)
            self._made.append(self._neighbours)
        return self._neighbours

    def neighbours(self):
        with self._lock:
            return self._map()

    def pair_lists(self):
        with self._lock:
            if self._pair_lists is None:
                if self._regular is not None:
                    offsets, in_rows, out_rows = self._regular.pair_lists()
                    self._pair_lists = offsets, out_rows, in_rows
                else:
                    self._pair_lists = self.ops.pair_lists(self._map(), self.n_out, self.taps)
                    self._made.extend(self._pair_lists[1:])
            return self._pair_lists


class NeighbourRulebook(Rulebook):
    """A rulebook held on the device (`forms`); `pairs()` downloads the pair lists (made on the device if
    no compute has made them yet)."""

    def __init__(self, geometry: RulebookGeometry, in_indices, out_indices, n_in: int, n_out: int,
                 forms: RulebookForms, backend: str, device: int):
        self.geometry, self.in_indices, self.out_indices = geometry, in_indices, out_indices
        self.n_in, self.n_out, self.forms = n_in, n_out, forms
        self.backend, self.device = backend, device
        self._swapped: NeighbourRulebook | None = None
        self._lock = threading.Lock()

    def pairs(self):
        offsets, in_rows, out_rows = self.forms.pair_lists()
        count = int(offsets[-1])
        read = self.forms.ops.read_ints
        return offsets.copy(), read(in_rows, count), read(out_rows, count)

    def swapped(self) -> "NeighbourRulebook":
        with self._lock:
            if self._swapped is None:
                forms = RulebookForms(self.forms.ops, self.forms.taps, self.n_in, self.n_out, regular=self.forms)
                self._swapped = NeighbourRulebook(self.geometry.swapped(), self.out_indices, self.in_indices,
                                                  self.n_out, self.n_in, forms, self.backend, self.device)
            return self._swapped
