"""What the device backends of sparse_conv3d share (kernels/sparse_conv3d_*.h for OpenCL and CUDA,
shaders/sparse_conv3d_*.comp for Vulkan): the rulebook kept on the device as a neighbour map, its canonical
pairs, the key width and the radix passes a grid needs, the geometry table the kernels read.

The neighbour map nbr (n_out, K) int32 holds, for output row r and tap t, the input row r reads through t,
or -1. It is the output-stationary form of the rulebook: the compute sums each output row over its taps in
order (no atomics, the same bits on every run), and the canonical pairs are its columns read top down.
"""
from __future__ import annotations

import math
import threading

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


def canonical_pairs(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, in_rows, out_rows) of ops/sparse_conv3d.py `Rulebook.pairs` from a host neighbour map."""
    taps = neighbours.shape[1]
    offsets = np.zeros(taps + 1, np.int64)
    in_rows, out_rows = [], []
    for t in range(taps):
        rows = np.flatnonzero(neighbours[:, t] >= 0).astype(np.int32)
        out_rows.append(rows)
        in_rows.append(neighbours[rows, t])
        offsets[t + 1] = offsets[t] + len(rows)
    empty = np.zeros(0, np.int32)
    return (offsets, np.concatenate(in_rows) if taps else empty,
            np.concatenate(out_rows) if taps else empty)


class NeighbourRulebook(Rulebook):
    """A rulebook held on the device as its neighbour map. The backend gives `read` (the map to the host, for
    `pairs()` only) and `transpose` (the inverse layer's map, built on the device, once)."""

    def __init__(self, geometry: RulebookGeometry, in_indices, out_indices, n_in: int, n_out: int, neighbours,
                 backend: str, device: int, read, transpose):
        self.geometry, self.in_indices, self.out_indices = geometry, in_indices, out_indices
        self.n_in, self.n_out, self.neighbours = n_in, n_out, neighbours
        self.backend, self.device = backend, device
        self._read, self._transpose = read, transpose
        self._swapped: NeighbourRulebook | None = None
        self._lock = threading.Lock()

    def pairs(self):
        return canonical_pairs(self._read(self.neighbours, self.n_out, self.geometry.kernel_volume))

    def swapped(self) -> "NeighbourRulebook":
        with self._lock:
            if self._swapped is None:
                taps = self.geometry.kernel_volume
                self._swapped = NeighbourRulebook(
                    self.geometry.swapped(), self.out_indices, self.in_indices, self.n_out, self.n_in,
                    self._transpose(self.neighbours, self.n_out, self.n_in, taps), self.backend, self.device,
                    self._read, self._transpose)
            return self._swapped
