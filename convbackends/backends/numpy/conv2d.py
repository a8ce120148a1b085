"""conv2d on the CPU: numpy strided views feed BLAS GEMMs; the reference point every GPU backend must beat.

Four paths, named after the GPU kernels: `conv2d_gemm_1x1` (a plain GEMM), `conv2d_depthwise`
(per block of channels, every tap gathered by one copy, then small GEMVs), `conv2d_implicit_gemm`
(im2col from a strided view, tiled so the column buffer stays under `TILE_BYTES`) and
`conv2d_winograd` (F(4,3) for 3x3 stride-1 layers with enough channels and finite inputs; dilated
ones run over their dilation phases).
Grouped stride-1 layers with few channels per group take `conv2d_tap_gemms` (one GEMM per tap).
Weights are repacked once in `prepare`; bias and activation are applied in place on each output
tile while it is still in cache. BLAS threads the GEMMs; the copies and elementwise passes around
them, which it does not, are split over the cores by the runtime's `in_parts`, and depthwise and tap-GEMM blocks
run on the same thread pool.

Threads: `convbackends.set_num_threads` (runtime/numpy.py) sets the pool and BLAS together.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...runtime import DeviceInfo
from ...runtime.numpy import in_parts, scratch, workers
from ...spec import Activation, Conv2dGeometry, Conv2dSpec
from .. import Prepared, _winograd

# Column buffers (im2col, Winograd tiles) stay under this size: large layers are tiled, never held whole.
TILE_BYTES = 16 << 20
# Grouped layers copy and multiply this many column elements at a time (4 MB: still in cache).
GROUP_COLUMNS_ELEMS = 1 << 20
# Depthwise blocks of channels hold this many elements (padded phases, columns, sums): in L2.
DEPTHWISE_BLOCK_ELEMS = 1 << 18
# OpenBLAS runs a GEMV on the calling thread below this many matrix elements (2304 * its
# GEMM_MULTITHREAD_THRESHOLD of 4), and splits it over its own threads from there.
GEMV_SERIAL_ELEMS = 9216
# ... and a GEMM below this many multiply-adds (M*N*K; 65536 * its GEMM_MULTITHREAD_THRESHOLD of 4).
GEMM_SERIAL_ELEMS = 262144
# Grouped stride-1 layers (`conv2d_tap_gemms`): a block of groups and rows holds this many elements
# (input rows, sum, one tap's products), so it stays in L2 across the taps.
TAP_GEMM_BLOCK_ELEMS = 1 << 18
# ... with up to this many input channels per group; from 64 the im2col GEMM was faster.
TAP_GEMM_MAX_GROUP_CHANNELS = 32
# Winograd pays off with enough channels on both sides (its transforms cost ~36/O and 16/C of its
# GEMM) and enough 4x4 tiles per image (36 GEMMs of O x C by C x tiles are too thin below that).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_TILES = 16
# A Winograd block's tiles pass through four buffers (inputs, transforms, products, outputs): about
# 2 MB each keeps them in the caches, but at least 256 tiles keep its GEMMs wide enough for BLAS.
WINOGRAD_BLOCK_BYTES = 2 << 20
WINOGRAD_BLOCK_MIN_TILES = 256

_F32 = np.dtype(np.float32).itemsize

# Both 2-D transforms as one matrix over the flattened tile, so each is a single GEMM.
_WINO_IN = np.kron(_winograd.BT, _winograd.BT).astype(np.float32)
_WINO_OUT = np.kron(_winograd.AT, _winograd.AT).astype(np.float32)

def activate(y: np.ndarray, act: Activation) -> None:
    """Apply the fused activation in place; overflow-free forms, NaN stays NaN."""
    kind = act.kind
    if kind == "none":
        return
    # Only +-inf inputs reach these (inf - inf, inf * 0); the results are the reference's NaN/inf.
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "relu":
            np.maximum(y, 0, out=y)
        elif kind == "relu6":
            np.clip(y, 0, 6, out=y)
        elif kind == "clip":
            np.clip(y, act.alpha, act.beta, out=y)
        elif kind == "tanh":
            np.tanh(y, out=y)
        elif kind == "sigmoid":
            _sigmoid(y, out=y)
        elif kind == "silu":
            y *= _sigmoid(y)
        elif kind == "mish":
            # softplus(x) = max(x, 0) + log1p(exp(-|x|)): exp never sees a positive argument.
            t = np.abs(y)
            np.negative(t, out=t)
            np.exp(t, out=t)
            np.log1p(t, out=t)
            t += np.maximum(y, 0)
            np.tanh(t, out=t)
            y *= t
        elif kind == "hardswish":
            t = y * np.float32(1 / 6)
            t += np.float32(0.5)
            np.clip(t, 0, 1, out=t)
            y *= t
        elif kind == "leaky_relu":
            # x >= 0 -> x, else alpha*x: that is max(x, alpha*x) for alpha <= 1 and min(...) above.
            t = y * np.float32(act.alpha)
            (np.maximum if act.alpha <= 1 else np.minimum)(y, t, out=y)
        else:
            raise ValueError(f"unknown activation {kind!r}")


def _sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1/(1+exp(-x)) written as 0.5*tanh(x/2)+0.5, which cannot overflow."""
    out = np.multiply(x, np.float32(0.5), out=out)
    np.tanh(out, out=out)
    out *= np.float32(0.5)
    out += np.float32(0.5)
    return out


def _epilogue(y: np.ndarray, bias: np.ndarray | None, act: Activation) -> None:
    if bias is not None:
        y += bias
    activate(y, act)


def _padded(x: np.ndarray, pads: tuple[int, int, int, int], bottom: int = 0, right: int = 0) -> np.ndarray:
    """x with zero borders (plus `bottom`/`right` extra rows/columns), in a reused scratch buffer."""
    pt, pl, pb, pr = pads
    pb, pr = pb + bottom, pr + right
    if not any((pt, pl, pb, pr)):
        return x
    n, c, h, w = x.shape
    hp, wp = h + pt + pb, w + pl + pr
    xp = scratch("pad", n * c * hp * wp).reshape(n, c, hp, wp)

    def fill(c0: int, c1: int) -> None:
        part = xp[:, c0:c1]
        part[:, :, :pt] = 0
        part[:, :, pt + h:] = 0
        part[:, :, pt:pt + h, :pl] = 0
        part[:, :, pt:pt + h, pl + w:] = 0
        part[:, :, pt:pt + h, pl:pl + w] = x[:, c0:c1]

    in_parts(c, xp.size, fill)
    return xp


def _blocks(n: int, rows: int, cols: int, per_pixel: int, cap: int):
    """Split (n images, rows, cols) into blocks of at most `cap` elements of per_pixel each.

    Yields (n0, nb, r0, nr, c0, nc): whole images when one fits, else row bands of one image, else
    column runs of one row. Every block's pixels are contiguous in a row-major image.
    """
    nc = min(cols, max(1, cap // per_pixel))
    nr = min(rows, max(1, cap // (per_pixel * cols))) if nc == cols else 1
    nb = min(n, max(1, cap // (per_pixel * cols * rows))) if nr == rows else 1
    for n0 in range(0, n, nb):
        for r0 in range(0, rows, nr):
            for c0 in range(0, cols, nc):
                yield n0, min(nb, n - n0), r0, min(nr, rows - r0), c0, min(nc, cols - c0)


def conv2d_gemm_1x1(x, w, bias, act, geom: Conv2dGeometry, out) -> None:
    """1x1: pads and strides become a slice, then one batched GEMM over images and groups."""
    g = geom
    if g.sh > 1 or g.sw > 1 or any((g.pt, g.pl, g.pb, g.pr)):
        xp = _padded(x, (g.pt, g.pl, g.pb, g.pr))
        x = np.ascontiguousarray(xp[:, :, :(g.oh - 1) * g.sh + 1:g.sh, :(g.ow - 1) * g.sw + 1:g.sw])
    y = out.reshape(g.n, g.groups, g.og, g.oh * g.ow)
    np.matmul(w, x.reshape(g.n, g.groups, g.cg, g.oh * g.ow), out=y)
    in_parts(g.og, y.size, lambda o0, o1: _epilogue(
        y[:, :, o0:o1], None if bias is None else bias[:, o0:o1], act))


def _columns_gemm(w, view, y, bias, act) -> None:
    """Copy the column view (n, groups, C/groups, kh, kw, pixels...) and multiply into y (n, groups, O/groups, P).

    Grouped layers go a few groups at a time, so each group's columns are still in cache for its GEMM.
    """
    n, groups = view.shape[:2]
    k = view.shape[2] * view.shape[3] * view.shape[4]
    pixels = y.shape[-1]
    step = max(1, min(groups, GROUP_COLUMNS_ELEMS // (n * k * pixels)))
    for g0 in range(0, groups, step):
        part = view[:, g0:g0 + step]
        cols = scratch("cols", part.size).reshape(part.shape)
        in_parts(part.shape[2], part.size, lambda c0, c1: np.copyto(cols[:, :, c0:c1], part[:, :, c0:c1]))
        y_part = y[:, g0:g0 + step]
        np.matmul(w[g0:g0 + step], cols.reshape(n, -1, k, pixels), out=y_part)
        b_part = None if bias is None else bias[g0:g0 + step]
        in_parts(y_part.shape[2], y_part.size, lambda o0, o1: _epilogue(
            y_part[:, :, o0:o1], None if b_part is None else b_part[:, o0:o1], act))


def conv2d_implicit_gemm(x, w, bias, act, geom: Conv2dGeometry, out, tile_bytes: int = TILE_BYTES) -> None:
    """im2col of one block at a time from a strided view, then a GEMM batched over images and groups.

    w is (groups, O/groups, C/groups*kh*kw), the column order of the strided view; bias is (groups,
    O/groups, 1). Stride 1 takes `_implicit_gemm_rows`, whose copies run along whole padded rows.
    """
    g = geom
    cap = tile_bytes // _F32
    k_all = g.c * g.kh * g.kw
    if (g.sh, g.sw) == (1, 1) and k_all * (g.w + g.pl + g.pr) <= cap:
        _implicit_gemm_rows(x, w, bias, act, g, out, cap)
        return
    y_all = out.reshape(g.n, g.groups, g.og, g.oh * g.ow)
    padded_from = None
    for n0, nb, r0, nr, c0, nc in _blocks(g.n, g.oh, g.ow, k_all, cap):
        if padded_from != n0:  # row bands and column runs of one image share its padded copy
            xp, padded_from = _padded(x[n0:n0 + nb], (g.pt, g.pl, g.pb, g.pr)), n0
        sn, sc, sh, sw = xp.strides
        view = as_strided(
            xp[:, :, r0 * g.sh:, c0 * g.sw:],
            shape=(nb, g.groups, g.cg, g.kh, g.kw, nr, nc),
            strides=(sn, g.cg * sc, sc, g.dh * sh, g.dw * sw, g.sh * sh, g.sw * sw),
            writeable=False,
        )
        p0 = r0 * g.ow + c0
        _columns_gemm(w, view, y_all[n0:n0 + nb, :, :, p0:p0 + nr * nc], bias, act)


def conv2d_tap_gemms(x, w_taps, bias, act, geom: Conv2dGeometry, out) -> None:
    """Grouped stride-1 layers: per kernel tap, one GEMM per group over shifted whole rows, summed in cache.

    w_taps is (kh*kw, groups, O/groups, C/groups). As in `_implicit_gemm_rows`, outputs are computed
    over the padded width, so tap (i, j) of a band of output rows reads one contiguous run of each
    input channel: the GEMM's operand is a view of the padded input, with no column buffer. With few
    channels per group an im2col GEMM moves 9 times the input through memory for little arithmetic;
    here each block of groups and rows (`TAP_GEMM_BLOCK_ELEMS`) stays in L2 across its taps. The
    bands keep each GEMM under OpenBLAS's threading threshold, and the blocks run in parts on the cores.
    """
    g = geom
    wp = g.w + g.pl + g.pr
    # One spare row: the last tap's run overhangs the last padded row by (kw-1)*dw.
    xp = _padded(x, (g.pt, g.pl, g.pb, g.pr), bottom=1)
    flat = xp.reshape(g.n, g.groups, g.cg, -1)
    band_rows = min(g.oh, max(1, (GEMM_SERIAL_ELEMS - 1) // (g.og * g.cg * wp)))
    band_len = band_rows * wp
    step = max(1, min(g.groups, TAP_GEMM_BLOCK_ELEMS // (2 * g.og * band_len + g.cg * (band_rows + g.kh * g.dh) * wp)))
    offsets = [i * g.dh * wp + j * g.dw for i in range(g.kh) for j in range(g.kw)]
    y_all = out.reshape(g.n, g.groups, g.og, g.oh, g.ow)
    blocks = [(n0, g0, r0) for n0 in range(g.n) for g0 in range(0, g.groups, step) for r0 in range(0, g.oh, band_rows)]

    def run(n0: int, g0: int, r0: int) -> None:
        g1, nr = min(g.groups, g0 + step), min(band_rows, g.oh - r0)
        length = nr * wp
        acc = scratch("rows", (g1 - g0) * g.og * length).reshape(g1 - g0, g.og, length)
        term = scratch("cols", acc.size).reshape(acc.shape)
        src = flat[n0, g0:g1, :, r0 * wp:]
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 gives NaN, as in the reference
            for t, offset in enumerate(offsets):
                np.matmul(w_taps[t, g0:g1], src[:, :, offset:offset + length], out=term if t else acc)
                if t:
                    acc += term
            _epilogue(acc, None if bias is None else bias[g0:g1], act)
        y_all[n0, g0:g1, :, r0:r0 + nr] = acc.reshape(g1 - g0, g.og, nr, wp)[..., :g.ow]

    def run_blocks(i0: int, i1: int) -> None:
        for block in blocks[i0:i1]:
            run(*block)

    in_parts(len(blocks), out.size * len(offsets), run_blocks)


def _implicit_gemm_rows(x, w, bias, act, geom: Conv2dGeometry, out, cap: int) -> None:
    """Stride 1: output rows computed over the padded width make each tap one contiguous run.

    numpy copies a (.., OH, OW) view one OW-long row at a time; a (.., OH*Wp) run copies at memcpy
    speed. The GEMM does Wp/OW more columns and the surplus ones are dropped when cropping into out.
    """
    g = geom
    wp = g.w + g.pl + g.pr
    padded_from = None
    for n0, nb, r0, nr, _, _ in _blocks(g.n, g.oh, 1, g.c * g.kh * g.kw * wp, cap):
        if padded_from != n0:
            # One spare row: the last tap's run overhangs the last padded row by (kw-1)*dw.
            xp, padded_from = _padded(x[n0:n0 + nb], (g.pt, g.pl, g.pb, g.pr), bottom=1), n0
        sn, sc, sh, sw = xp.strides
        view = as_strided(
            xp[:, :, r0:],
            shape=(nb, g.groups, g.cg, g.kh, g.kw, nr * wp),
            strides=(sn, g.cg * sc, sc, g.dh * sh, g.dw * sw, sw),
            writeable=False,
        )
        y = scratch("rows", nb * g.o * nr * wp).reshape(nb, g.groups, g.og, nr * wp)
        _columns_gemm(w, view, y, bias, act)
        rows = y.reshape(nb, g.o, nr, wp)[..., :g.ow]
        dst = out[n0:n0 + nb, :, r0:r0 + nr]
        in_parts(g.o, rows.size, lambda o0, o1: np.copyto(dst[:, o0:o1], rows[:, o0:o1]))


def _depthwise_layout(geom: Conv2dGeometry):
    """The layout `conv2d_depthwise` reads its taps from: (phase rows, phase columns, band rows, bands,
    per tap (phase slot, row shift, column shift), the (a, b) of each phase slot).

    Phase (a, b) holds padded pixels (r*sh + a, q*sw + b). Tap (i, j) of output (r, q) reads padded
    pixel (r*sh + i*dh, q*sw + j*dw): pixel (r + i*dh // sh, q + j*dw // sw) of phase
    (i*dh % sh, j*dw % sw), so every tap is a shifted stride-1 read of one phase. Outputs are computed
    at the phase width (OW plus the largest column shift; the surplus columns are dropped) in bands of
    rows, so one band of one tap is a contiguous run of its phase. A band's GEMV stays under
    OpenBLAS's threading threshold (GEMV_SERIAL_ELEMS), so it runs on the thread that calls it. The
    bands may cover a few rows past OH, and phases hold one spare row where columns shift: no run
    leaves its phase.
    """
    g = geom
    # Only the phases some tap reads are kept (at most kh * kw of them, whatever the stride).
    phases = sorted({(i * g.dh % g.sh, j * g.dw % g.sw) for i in range(g.kh) for j in range(g.kw)})
    slot = {phase: k for k, phase in enumerate(phases)}
    taps = [(slot[(i * g.dh % g.sh, j * g.dw % g.sw)], i * g.dh // g.sh, j * g.dw // g.sw)
            for i in range(g.kh) for j in range(g.kw)]
    cols = g.ow + (g.kw - 1) * g.dw // g.sw
    band_rows = min(g.oh, max(1, (GEMV_SERIAL_ELEMS - 1) // (len(taps) * g.og * cols)))
    bands = -(-g.oh // band_rows)
    band_rows = -(-g.oh // bands)
    rows = bands * band_rows + (g.kh - 1) * g.dh // g.sh + (cols > g.ow)
    return rows, cols, band_rows, bands, taps, phases


def conv2d_depthwise(x, w, bias, act, geom: Conv2dGeometry, out) -> None:
    """Per block of channels small enough for the cache: pad and split into stride phases, gather
    every tap's bands of rows into columns, then small GEMVs, bias and activation, and the crop into out.

    w is (C, multiplier, kh*kw): output channel c*multiplier + m reads input channel c. Each band of a
    tap is one contiguous run (`_depthwise_layout`), so the gather is plain copies, and a copy plus
    BLAS GEMVs beats a multiply-add pass per tap, which numpy cannot fuse (measured in
    docs/performance-notes.md). The blocks run in parts on the cores.
    """
    g = geom
    mult = g.og
    rows, cols, band_rows, bands, taps, used = _depthwise_layout(g)
    phases = len(used)
    band_len = band_rows * cols
    per_channel = phases * rows * cols + (len(taps) + mult) * bands * band_len
    step = max(1, min(g.c, DEPTHWISE_BLOCK_ELEMS // per_channel))
    if g.n * -(-g.c // step) < workers():  # enough blocks to give every core a part
        step = -(-g.c // -(-workers() // g.n))
    # Per phase (a, b): the phase rows and columns that hold input pixels, and the first input row/column.
    spans = []
    for a, b in used:
        r0, q0 = max(0, -(-(g.pt - a) // g.sh)), max(0, -(-(g.pl - b) // g.sw))
        r1 = max(r0, min(rows, (g.h - 1 + g.pt - a) // g.sh + 1))
        q1 = max(q0, min(cols, (g.w - 1 + g.pl - b) // g.sw + 1))
        spans.append((r0, r1, q0, q1, r0 * g.sh + a - g.pt, q0 * g.sw + b - g.pl))
    y_all = out.reshape(g.n, g.c, mult, g.oh, g.ow)
    w_taps = w[:, None]
    b_all = None if bias is None else bias.reshape(g.c, 1, mult, 1)
    full = g.oh // band_rows  # bands wholly inside the output rows

    def run(n0: int, c0: int) -> None:
        c1 = min(g.c, c0 + step)
        nb = c1 - c0
        image = scratch("pad", nb * phases * rows * cols).reshape(nb, phases, rows, cols)
        image.fill(0)
        for p, (r0, r1, q0, q1, y0, x0) in enumerate(spans):
            if r1 > r0 and q1 > q0:
                image[:, p, r0:r1, q0:q1] = x[n0, c0:c1, y0:y0 + (r1 - r0 - 1) * g.sh + 1:g.sh,
                                              x0:x0 + (q1 - q0 - 1) * g.sw + 1:g.sw]
        columns = scratch("cols", nb * bands * len(taps) * band_len).reshape(nb, bands, len(taps), band_len)
        flat = image.reshape(nb, phases, rows * cols)
        for t, (p, dr, dq) in enumerate(taps):
            start = dr * cols + dq
            np.copyto(columns[:, :, t], flat[:, p, start:start + bands * band_len].reshape(nb, bands, band_len))
        acc = scratch("rows", nb * bands * mult * band_len).reshape(nb, bands, mult, band_len)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 gives NaN, as in the reference
            np.matmul(w_taps[c0:c1], columns, out=acc)
            _epilogue(acc, None if b_all is None else b_all[c0:c1], act)
        # (nb, bands, m, band rows, cols) -> (nb, m, OH, OW): whole bands, then the rows of the last one.
        src = acc.reshape(nb, bands, mult, band_rows, cols).transpose(0, 2, 1, 3, 4)
        dst = y_all[n0, c0:c1]
        np.copyto(dst[:, :, :full * band_rows].reshape(nb, mult, full, band_rows, g.ow), src[:, :, :full, :, :g.ow])
        if full < bands:
            np.copyto(dst[:, :, full * band_rows:], src[:, :, full, :g.oh - full * band_rows, :g.ow])

    starts = [(n0, c0) for n0 in range(g.n) for c0 in range(0, g.c, step)]

    def run_blocks(i0: int, i1: int) -> None:
        for n0, c0 in starts[i0:i1]:
            run(n0, c0)

    in_parts(len(starts), g.n * g.c * per_channel, run_blocks)


def winograd_tiles(geom: Conv2dGeometry) -> int:
    """4x4 output tiles per image."""
    th, tw = _winograd.tile_grid(geom)
    return th * tw


def conv2d_winograd(x, u, bias, act, geom: Conv2dGeometry, out, tile_bytes: int = TILE_BYTES) -> None:
    """Winograd F(4,3): 6x6 input tiles -> 36 GEMMs (O x C by C x tiles) -> 4x4 output tiles.

    u is `_winograd.weights`: (36, C, O) over a contiguous (36, O, C), so each GEMM reads its O x C
    operand in order. With that layout (tiles x C) by (C x O) was slower on every block measured
    (16 to 64 tiles of 512 channels; docs/performance-notes.md), so there is one orientation. Only for finite inputs: a NaN or inf in
    one tile spreads over its 16 outputs (the caller checks).
    """
    g = geom
    th, tw = _winograd.tile_grid(g)
    # The last tile row/column may reach past the input: pad it with zeros, crop its outputs.
    xp = _padded(x, (g.pt, g.pl, g.pb, g.pr), 4 * th + 2 - (g.h + g.pt + g.pb), 4 * tw + 2 - (g.w + g.pl + g.pr))
    full = out if (4 * th, 4 * tw) == (g.oh, g.ow) else np.empty((g.n, g.o, 4 * th, 4 * tw), np.float32)
    sn, sc, sh, sw = xp.strides
    per_tile = 36 * max(g.c, g.o)
    cap = min(tile_bytes, max(WINOGRAD_BLOCK_BYTES, per_tile * _F32 * WINOGRAD_BLOCK_MIN_TILES)) // _F32
    for n0, nb, r0, nr, c0, nc in _blocks(g.n, th, tw, per_tile, cap):
        tiles = nb * nr * nc
        view = as_strided(
            xp[n0:, :, 4 * r0:, 4 * c0:],
            shape=(6, 6, g.c, nb, nr, nc),
            strides=(sh, sw, sc, sn, 4 * sh, 4 * sw),
            writeable=False,
        )
        d = scratch("cols", view.size).reshape(36, g.c * tiles)
        d6 = d.reshape(view.shape)
        in_parts(g.c, d.size, lambda c0, c1: np.copyto(d6[:, :, c0:c1], view[:, :, c0:c1]))
        v = scratch("wino_v", d.size).reshape(36, g.c, tiles)
        np.matmul(_WINO_IN, d, out=v.reshape(d.shape))
        m = scratch("wino_m", 36 * g.o * tiles)
        y = scratch("wino_y", 16 * g.o * tiles)
        dst = full[n0:n0 + nb, :, 4 * r0:4 * (r0 + nr), 4 * c0:4 * (c0 + nc)].reshape(nb, g.o, nr, 4, nc, 4)
        np.matmul(u.transpose(0, 2, 1), v, out=m.reshape(36, g.o, tiles))
        np.matmul(_WINO_OUT, m.reshape(36, -1), out=y.reshape(16, -1))
        y_o, b_o = y.reshape(16, g.o, tiles), None if bias is None else bias[:, None]
        src = y.reshape(4, 4, g.o, nb, nr, nc).transpose(3, 2, 4, 0, 5, 1)

        def finish(o0: int, o1: int) -> None:
            _epilogue(y_o[:, o0:o1], None if b_o is None else b_o[o0:o1], act)
            # One copy per output column of the tile: numpy then loops along tile columns, not along
            # the tile's 4 columns (3x faster).
            for s in range(4):
                np.copyto(dst[:, o0:o1, ..., s], src[:, o0:o1, ..., s])

        in_parts(g.o, y.size, finish)
    if full is not out:
        in_parts(g.o, out.size, lambda o0, o1: np.copyto(out[:, o0:o1], full[:, o0:o1, :g.oh, :g.ow]))


def winograd_phases(geom: Conv2dGeometry) -> Conv2dGeometry | None:
    """The undilated problem of one dilation phase (every dh-th row, dw-th column), batched over phases.

    A dilated 3x3 convolution of phase (a, b) of the input only reads that phase, with an undilated
    kernel; None when the image or its pads do not split evenly into phases.
    """
    g = geom
    dh, dw = g.dh, g.dw
    if (dh, dw) == (1, 1):
        return g
    if any((g.h % dh, g.pt % dh, g.pb % dh, g.w % dw, g.pl % dw, g.pr % dw)):
        return None
    return dataclasses.replace(
        g, n=dh * dw * g.n, h=g.h // dh, w=g.w // dw, oh=g.oh // dh, ow=g.ow // dw, dh=1, dw=1,
        pt=g.pt // dh, pb=g.pb // dh, pl=g.pl // dw, pr=g.pr // dw)


def conv2d_winograd_dilated(x, u, bias, act, geom: Conv2dGeometry, phases: Conv2dGeometry, out,
                            tile_bytes: int = TILE_BYTES) -> None:
    """Dilated 3x3 as Winograd over the input's dilation phases (`winograd_phases`), interleaved back."""
    g = geom
    dh, dw = g.dh, g.dw
    xs = scratch("dilated", x.size).reshape(dh, dw, g.n, g.c, phases.h, phases.w)
    in_parts(g.c, x.size, lambda c0, c1: np.copyto(
        xs[:, :, :, c0:c1],
        x[:, c0:c1].reshape(g.n, c1 - c0, phases.h, dh, phases.w, dw).transpose(3, 5, 0, 1, 2, 4)))
    ys = np.empty(phases.output_shape, np.float32)
    conv2d_winograd(xs.reshape(phases.input_shape), u, bias, act, phases, ys, tile_bytes)
    y6 = ys.reshape(dh, dw, g.n, g.o, phases.oh, phases.ow)
    in_parts(g.o, out.size, lambda o0, o1: np.copyto(
        out[:, o0:o1].reshape(g.n, o1 - o0, phases.oh, dh, phases.ow, dw),
        y6[:, :, :, o0:o1].transpose(2, 3, 4, 0, 5, 1)))


def _winograd_safe(x: np.ndarray) -> bool:
    """`_winograd.safe` over channel ranges on the cores."""
    safe = [True] * x.shape[1]

    def check(c0: int, c1: int) -> None:
        safe[c0] = _winograd.safe(x[:, c0:c1])

    in_parts(x.shape[1], x.size, check)
    return all(safe)


class NumpyPrepared(Prepared):
    """Weights repacked for the chosen path; `tile_bytes` bounds the column buffer of each block."""

    def __init__(self, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device = device
        self.spec = spec
        self.tile_bytes = TILE_BYTES
        self.winograd = None
        groups, o = spec.groups, spec.out_channels
        # Copies, never views: the caller may change its arrays after prepare.
        if spec.is_depthwise:
            self.path = "depthwise"
            self.w = w.reshape(spec.in_channels, o // groups, spec.kh * spec.kw).copy()
            self.bias = None if b is None else b.copy()
            return
        self.path = "gemm_1x1" if (spec.kh, spec.kw) == (1, 1) else "implicit_gemm"
        self.w = w.reshape(groups, o // groups, -1).copy()
        self.bias = None if b is None else b.reshape(groups, o // groups, 1).copy()
        cg = spec.in_channels // groups
        if groups > 1 and spec.stride == (1, 1) and self.path == "implicit_gemm" and cg <= TAP_GEMM_MAX_GROUP_CHANNELS:
            self.path = "tap_gemms"
            self.w = np.ascontiguousarray(w.reshape(groups, o // groups, cg, -1).transpose(3, 0, 1, 2))
        # Winograd sits beside the GEMM weights: unsafe inputs, small images and dilated inputs that do
        # not split evenly into phases still take the GEMM.
        if _winograd.fits(spec, dilated=True) and min(spec.in_channels, o) >= WINOGRAD_MIN_CHANNELS:
            self.winograd = _winograd.weights(w)

    def run(self, x, geom: Conv2dGeometry):
        out = np.empty(geom.output_shape, np.float32)
        act = self.spec.activation
        if self.path == "depthwise":
            conv2d_depthwise(x, self.w, self.bias, act, geom, out)
        elif self.path == "gemm_1x1":
            conv2d_gemm_1x1(x, self.w, self.bias, act, geom, out)
        elif self.path == "tap_gemms":
            conv2d_tap_gemms(x, self.w, self.bias, act, geom, out)
        elif self.winograd is not None and (phases := winograd_phases(geom)) is not None and (
            winograd_tiles(phases) >= WINOGRAD_MIN_TILES and _winograd_safe(x)
        ):
            bias = None if self.bias is None else self.bias.reshape(-1)
            if phases is geom:
                conv2d_winograd(x, self.winograd, bias, act, geom, out, self.tile_bytes)
            else:
                conv2d_winograd_dilated(x, self.winograd, bias, act, geom, phases, out, self.tile_bytes)
        else:
            conv2d_implicit_gemm(x, self.w, self.bias, act, geom, out, self.tile_bytes)
        return out


def prepare(backend, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo) -> Prepared:
    return NumpyPrepared(spec, w, b, device)
