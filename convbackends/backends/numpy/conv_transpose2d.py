"""conv_transpose2d on numpy: the stride phases (`_phases`) where they run as one stacked conv2d, else
`conv_transpose2d_col2im`.

col2im: one GEMM gives every tap's contribution of every input pixel, Z = w^T x ((O/groups * kh * kw) x C/groups
per group, batched over images and groups), and each tap's block of Z is added into its strided positions of y,
which starts as the bias. Where the phases have different numbers of taps (3x3 stride 2: 1, 2, 2 and 4) and so
would run as several conv2d layers, BLAS sees one well-shaped product instead, and no zero is ever multiplied, so
a NaN or inf in x reaches only the outputs it reaches by definition. Z is made for a band of input rows at a time,
`TILE_BYTES` at most. Where the phases stack into one conv2d (4x4 and 2x2 stride 2, and every stride-1 layer,
Winograd included) that conv2d was as fast or faster, and much faster for depthwise layers (docs/performance-notes.md).
"""
from __future__ import annotations

import numpy as np

from .. import Prepared
from .._phases import PhasesPrepared
from ...runtime.numpy import in_parts, scratch
from .conv2d import TILE_BYTES, activate

_F32 = np.dtype(np.float32).itemsize


def _tap_range(size: int, out: int, s: int, offset: int, lo: int, hi: int) -> tuple[int, int, int]:
    """For input indices lo..hi-1 of one axis and a tap at output offset `offset` (tap * dilation - pad_begin):
    (first input index, count, first output index) of those landing inside 0..out-1 (output = s * input + offset)."""
    first = max(lo, -(offset // s) if offset < 0 else 0)
    last = min(hi - 1, (out - 1 - offset) // s)
    return first, max(0, last - first + 1), s * first + offset


def conv_transpose2d_col2im(x, w_t, bias, act, geom, out, tile_bytes: int = TILE_BYTES) -> None:
    """w_t is (groups, O/groups * kh * kw, C/groups), rows ordered (o, tap row, tap column); bias (O,) or None."""
    g = geom
    groups = g.groups
    cg, taps = g.c // groups, g.kh * g.kw
    in_parts(g.o, out.size, lambda o0, o1: out[:, o0:o1].fill(0) if bias is None else
              np.copyto(out[:, o0:o1], bias[o0:o1, None, None]))
    per_row = g.o * taps * g.w  # elements of Z per input row of one image
    rows = max(1, min(g.h, tile_bytes // _F32 // per_row))
    images = max(1, min(g.n, tile_bytes // _F32 // (per_row * g.h))) if rows == g.h else 1
    for n0 in range(0, g.n, images):
        nb = min(images, g.n - n0)
        for r0 in range(0, g.h, rows):
            nr = min(rows, g.h - r0)
            xb = x[n0:n0 + nb, :, r0:r0 + nr].reshape(nb, groups, cg, nr * g.w)
            z = scratch("col2im", nb * g.o * taps * nr * g.w).reshape(nb, groups, w_t.shape[1], nr * g.w)
            with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 gives NaN, as in the reference
                np.matmul(w_t, xb, out=z)
            z6 = z.reshape(nb, g.o, g.kh, g.kw, nr, g.w)
            ranges = [(i, j, _tap_range(g.h, g.oh, g.sh, i * g.dh - g.pt, r0, r0 + nr),
                       _tap_range(g.w, g.ow, g.sw, j * g.dw - g.pl, 0, g.w)) for i in range(g.kh) for j in range(g.kw)]
            dst = out[n0:n0 + nb]

            def add(o0: int, o1: int) -> None:
                for i, j, (iy, ny, oy), (ix, nx, ox) in ranges:
                    if ny and nx:
                        dst[:, o0:o1, oy:oy + g.sh * (ny - 1) + 1:g.sh, ox:ox + g.sw * (nx - 1) + 1:g.sw] += \
                            z6[:, o0:o1, i, j, iy - r0:iy - r0 + ny, ix:ix + nx]

            with np.errstate(invalid="ignore", over="ignore"):
                in_parts(g.o, nb * g.o * taps * nr * g.w, add)
    in_parts(g.o, out.size, lambda o0, o1: activate(out[:, o0:o1], act))


class NumpyTransposedPrepared(PhasesPrepared):
    """The phases' stacked conv2d where there is one, col2im where the phases split into several."""

    def __init__(self, backend, spec, w: np.ndarray, b: np.ndarray | None, device):
        super().__init__(backend, spec, w, b, device)
        c, og, kh, kw = w.shape
        groups = spec.groups
        # Copies, never views: the caller may change its arrays after prepare.
        self.w_t = np.ascontiguousarray(
            w.reshape(groups, c // groups, og, kh, kw).transpose(0, 2, 3, 4, 1).reshape(groups, og * kh * kw, c // groups))
        self.bias = None if b is None else b.copy()

    def uses_col2im(self, geom) -> bool:
        return sum(not stack.constant for stack in self.plan(geom)[1]) > 1

    def _run(self, x, geom, timed: bool):
        if not self.uses_col2im(geom):
            return super()._run(x, geom, timed)
        out = np.empty(geom.output_shape, np.float32)
        conv_transpose2d_col2im(x, self.w_t, self.bias, self.spec.activation, geom, out)
        return out, None


def prepare(backend, spec, w: np.ndarray, b: np.ndarray | None, device) -> Prepared:
    return NumpyTransposedPrepared(backend, spec, w, b, device)
