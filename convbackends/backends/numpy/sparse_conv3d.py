"""sparse_conv3d on the CPU: the rulebook by sort + search over int64 site keys, the compute as one
gather -> GEMM -> scatter-add per kernel tap. Nothing is ever the size of the grid.

Rulebook (the canonical form of ops/sparse_conv3d.py `Rulebook`):
- submanifold: input and output sites are the same sorted keys; tap t's neighbour of site r is key(r) + delta_t
  (when its coordinates stay in the grid), found by `searchsorted`. Taps t and K-1-t are mirror images (delta and
  -delta), so only the first half is searched: the mirror's pairs are the same pairs swapped, still sorted.
- regular: every (input, tap) gives its output key where the division by the stride is exact and the output is in
  the grid; `np.unique` of those keys is the sorted output sites, its inverse each candidate's output row.
Compute: y starts as the bias (SubM: the centre tap's GEMM over every row, plus the bias); each other tap adds
x[in_rows] @ W_t into y[out_rows]. A row appears at most once per tap, so the indexed add is exact and the
result is the same bit for bit on every run.
"""
from __future__ import annotations

import numpy as np

from ...ops.sparse_conv3d import Rulebook, RulebookGeometry, SparseConv3dGeometry, SparseConv3dSpec, linear_keys
from ...runtime import DeviceInfo
from .. import Prepared
from ...runtime.numpy import in_parts
from .conv2d import activate

# OpenBLAS runs a GEMM on the calling thread while M * N * K stays at or below 65536 * 4 (its
# GEMM_MULTITHREAD_THRESHOLD): above it, each call hands work to its threads, which costs a scheduler
# period whenever the cores are busy. The cores take contiguous ranges of output rows instead (one
# hand-off per layer, not one per tap and block).
SERIAL_GEMM_MNK = 65536 * 4


class HostRulebook(Rulebook):
    """A rulebook held as its canonical numpy arrays."""

    def __init__(self, geometry: RulebookGeometry, in_indices: np.ndarray, out_indices: np.ndarray,
                 offsets: np.ndarray, in_rows: np.ndarray, out_rows: np.ndarray, backend: str, device: int):
        self.geometry, self.in_indices, self.out_indices = geometry, in_indices, out_indices
        self.n_in, self.n_out = len(in_indices), len(out_indices)
        self.offsets, self.in_rows, self.out_rows = offsets, in_rows, out_rows
        self.backend, self.device = backend, device
        self._swapped: HostRulebook | None = None

    def pairs(self):
        return self.offsets, self.in_rows, self.out_rows

    def swapped(self) -> "HostRulebook":
        if self._swapped is None:
            self._swapped = HostRulebook(self.geometry.swapped(), self.out_indices, self.in_indices, self.offsets,
                                         self.out_rows, self.in_rows, self.backend, self.device)
        return self._swapped


def _within(coords: np.ndarray, low: int, high: int, shift: int) -> np.ndarray | None:
    """Which coords + shift lie in [low, high), or None when all of them do (the usual case away from borders)."""
    if not len(coords) or (coords.min() + shift >= low and coords.max() + shift < high):
        return None
    return (coords >= low - shift) & (coords < high - shift)


def _submanifold_pairs(indices: np.ndarray, rules: RulebookGeometry):
    """Per tap (in_rows, out_rows) of a SubM layer on sorted unique sites.

    Taps come in rows along x: for each (i, j) the sites whose z and y neighbours stay in the grid look up
    key + delta_z + delta_y + (l * dilation_x - pad_x). With dilation_x 1 those keys are consecutive, so one
    search finds the first and the others follow by stepping over matches; otherwise each tap searches. A match
    whose x left the grid is another row's site and is dropped. Only the taps before the centre are searched:
    tap K-1-t is tap t mirrored, its pairs swapped."""
    n = len(indices)
    (kd, kh, kw), (dd, dh, dw), (pd, ph, pw) = rules.kernel, rules.dilation, rules.padding
    d, h, w = rules.in_shape
    keys = _compact(linear_keys(indices, rules.in_shape), rules.batch_size * d * h * w)
    # One past the last key, a value no lookup wants: a search that runs off the end meets it.
    padded = np.append(keys, np.iinfo(keys.dtype).max)
    z, y, x = (np.ascontiguousarray(indices[:, a]) for a in (1, 2, 3))
    k = kd * kh * kw
    centre = k // 2
    pairs: list[tuple[np.ndarray, np.ndarray] | None] = [None] * k
    every = np.arange(n, dtype=np.int32)
    for i in range(kd):
        for j in range(kh):
            first_tap = (i * kh + j) * kw
            if first_tap > centre:
                break
            inside_z, inside_y = _within(z, 0, d, i * dd - pd), _within(y, 0, h, j * dh - ph)
            inside = inside_z if inside_y is None else inside_y if inside_z is None else inside_z & inside_y
            shift = keys.dtype.type(((i * dd - pd) * h + (j * dh - ph)) * w - pw)
            if inside is None:
                sites, base = every, keys + shift
            else:
                sites = np.flatnonzero(inside).astype(np.int32)
                base = keys[sites] + shift
            found = None
            for l in range(kw):
                t = first_tap + l
                if t >= centre:
                    break
                wanted = base + keys.dtype.type(l * dw)
                if found is None or dw != 1:
                    found = np.searchsorted(keys, wanted)
                match = padded[found] == wanted
                hit = np.flatnonzero(match)
                out_rows, in_rows = sites[hit], found[hit].astype(np.int32)
                inside_x = _within(x[out_rows], 0, w, l * dw - pw)
                if inside_x is not None:
                    out_rows, in_rows = out_rows[inside_x], in_rows[inside_x]
                pairs[t], pairs[k - 1 - t] = (in_rows, out_rows), (out_rows, in_rows)
                found += match  # the next key along x lies past this one when this one is a site
    pairs[centre] = (every, every)
    return pairs, indices


def _compact(keys: np.ndarray, span: int) -> np.ndarray:
    """int32 keys when every key fits with room for the tap offsets looked up: searches move half the bytes."""
    return keys.astype(np.int32) if span < (1 << 30) else keys


def _regular_pairs(indices: np.ndarray, rules: RulebookGeometry):
    """Per tap (in_rows, out_rows) of a regular layer, and the sorted output sites.

    Every (input, tap) that lands on the output grid gives a candidate output key: sorted, the distinct keys are
    the output sites, and each candidate's rank among them is its output row."""
    (od, oh, ow), kernel = rules.out_shape, rules.kernel
    dtype = np.int32 if rules.batch_size * od * oh * ow < (1 << 31) else np.int64
    # Per axis and kernel index: which inputs reach an output coordinate, and which one.
    reach, where = [], []
    for axis in range(3):
        q = indices[:, 1 + axis][None, :] + rules.padding[axis] - (
            np.arange(kernel[axis], dtype=np.int32)[:, None] * rules.dilation[axis])
        s = rules.stride[axis]
        reach.append((q >= 0) & (q < s * rules.out_shape[axis]) & (q % s == 0 if s > 1 else True))
        where.append((q // s).astype(dtype))
    batch = indices[:, 0].astype(dtype)
    rows, keys = [], []
    for i in range(kernel[0]):
        z_key = batch * dtype(od) + where[0][i]
        for j in range(kernel[1]):
            zy_reach = reach[0][i] & reach[1][j]
            zy_key = (z_key * dtype(oh) + where[1][j]) * dtype(ow)
            for l in range(kernel[2]):
                inputs = np.flatnonzero(zy_reach & reach[2][l])
                rows.append(inputs.astype(np.int32))
                keys.append(zy_key[inputs] + where[2][l][inputs])
    candidates = np.concatenate(keys)
    order = np.argsort(candidates)  # any order among equal keys: each gets the same rank
    ranked = candidates[order]
    first = np.empty(len(ranked), bool)
    first[:1] = True
    np.not_equal(ranked[1:], ranked[:-1], out=first[1:])
    out_keys = ranked[first]
    out_row = np.empty(len(candidates), np.int32)
    out_row[order] = np.cumsum(first, dtype=np.int32) - 1
    out_indices = np.empty((len(out_keys), 4), np.int32)
    rest = out_keys
    for column, size in ((3, ow), (2, oh), (1, od)):
        rest, out_indices[:, column] = np.divmod(rest, size)
    out_indices[:, 0] = rest
    bounds = np.cumsum([0] + [len(r) for r in rows])
    return [(rows[t], out_row[bounds[t]:bounds[t + 1]]) for t in range(len(rows))], out_indices


def build_rulebook(indices: np.ndarray, rules: RulebookGeometry, backend: str, device: int) -> HostRulebook:
    """The rulebook of a regular or submanifold layer on sorted unique sites."""
    indices = np.ascontiguousarray(indices)
    k = rules.kernel_volume
    if not len(indices):
        empty = np.zeros(0, np.int32)
        out_indices = indices if rules.subm else np.zeros((0, 4), np.int32)
        return HostRulebook(rules, indices, out_indices, np.zeros(k + 1, np.int64), empty, empty, backend, device)
    pairs, out_indices = (_submanifold_pairs if rules.subm else _regular_pairs)(indices, rules)
    offsets = np.zeros(k + 1, np.int64)
    offsets[1:] = np.cumsum([len(p[0]) for p in pairs])
    in_rows = np.concatenate([p[0] for p in pairs])
    out_rows = np.concatenate([p[1] for p in pairs])
    return HostRulebook(rules, indices, out_indices, offsets, in_rows, out_rows, backend, device)


class NumpySparsePrepared(Prepared):
    """w repacked as one (C, O) matrix per tap; the rulebook and the compute on the host."""

    def __init__(self, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.spec, self.device = spec, device
        o, c = spec.out_channels, spec.in_channels
        self.taps = np.ascontiguousarray(w.reshape(o, c, -1).transpose(2, 1, 0))  # (K, C, O), a copy
        self.bias = None if b is None else b.copy()
        # Rows per GEMM block: OpenBLAS keeps a GEMM on the calling thread up to this size, so each core's
        # blocks never wait on BLAS threads; at least a few dozen rows keep the call overhead small.
        self.block_rows = max(32, SERIAL_GEMM_MNK // (c * o))

    def rulebook(self, indices, rules: RulebookGeometry) -> HostRulebook:
        return build_rulebook(indices, rules, self.device.backend, self.device.index)

    def run(self, features, rulebook: Rulebook, geom: SparseConv3dGeometry) -> np.ndarray:
        offsets, in_rows, out_rows = rulebook.pairs()
        y = np.empty((geom.n_out, geom.o), np.float32)
        centre = len(self.taps) // 2 if geom.rules.subm and not geom.rules.inverse else None
        block, act = self.block_rows, self.spec.activation

        def rows(r0: int, r1: int) -> None:
            """Output rows [r0, r1): every tap in order, then the epilogue; rows of other parts untouched."""
            if centre is None:
                y[r0:r1] = 0 if self.bias is None else self.bias
            else:  # the centre tap of a SubM layer maps every row to itself: a plain GEMM
                for b0 in range(r0, r1, block):
                    b1 = min(b0 + block, r1)
                    np.matmul(features[b0:b1], self.taps[centre], out=y[b0:b1])
                if self.bias is not None:
                    y[r0:r1] += self.bias
            for t in range(len(self.taps)):
                lo, hi = int(offsets[t]), int(offsets[t + 1])
                if t == centre or lo == hi:
                    continue
                a, b = lo + np.searchsorted(out_rows[lo:hi], (r0, r1))
                for b0 in range(a, b, block):
                    b1 = min(b0 + block, b)
                    targets = out_rows[b0:b1]
                    y[targets] += np.take(features, in_rows[b0:b1], axis=0) @ self.taps[t]
            activate(y[r0:r1], act)

        in_parts(geom.n_out, int(offsets[-1]) * (geom.c + geom.o), rows)
        return y

    def profile(self, features, rulebook: Rulebook, geom: SparseConv3dGeometry):
        return self.run(features, rulebook, geom), None  # no device timer on the host

    def take_rows(self, features, order: np.ndarray) -> np.ndarray:
        return features[order]


def prepare(backend, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
    return NumpySparsePrepared(spec, w, b, device)
