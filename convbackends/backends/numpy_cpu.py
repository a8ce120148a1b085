"""CPU backend: numpy strided views feed BLAS GEMMs; the reference point every GPU backend must beat.

Four paths, named after the GPU kernels: `conv2d_gemm_1x1` (a plain GEMM), `conv2d_depthwise`
(vectorised over channels, a loop over taps only), `conv2d_implicit_gemm` (im2col from a strided
view, tiled so the column buffer stays under `TILE_BYTES`) and `conv2d_winograd` (F(4,3) for 3x3
stride-1 layers with enough channels and finite inputs). Weights are repacked once in `prepare`;
bias and activation are applied in place on each output tile while it is still in cache.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..spec import Activation, Conv2dGeometry, Conv2dSpec
from .base import Backend, DeviceInfo, Prepared

# Column buffers (im2col, Winograd tiles) stay under this size: large layers are tiled, never held whole.
TILE_BYTES = 16 << 20
# Grouped layers copy and multiply this many column elements at a time (4 MB: still in cache).
GROUP_COLUMNS_ELEMS = 1 << 20
# Winograd pays off with enough channels on both sides (its transforms cost ~36/O and 16/C of its
# GEMM) and enough 4x4 tiles per image (36 GEMMs of O x C by C x tiles are too thin below that).
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_TILES = 16
# Inputs beyond this (or non-finite) take the GEMM path: a Winograd tile spreads inf/NaN to its neighbours.
WINOGRAD_MAX_ABS = 1e30

_F32 = np.dtype(np.float32).itemsize

# Winograd F(4,3) (Lavin & Gray), interpolation points 0, +-1, +-2, inf.
_WINO_BT = np.array([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=np.float64)
_WINO_G = np.array([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=np.float64)
_WINO_AT = np.array([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=np.float64)
# Both 2-D transforms as one matrix over the flattened tile, so each is a single GEMM.
_WINO_IN = np.kron(_WINO_BT, _WINO_BT).astype(np.float32)
_WINO_OUT = np.kron(_WINO_AT, _WINO_AT).astype(np.float32)

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _scratch(slot: str, size: int) -> np.ndarray:
    """A per-thread reusable float32 buffer: a fresh tile-sized array each run would page-fault every time.

    Each thread keeps its largest buffer per slot (a few tiles and one padded input) for reuse.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(slot)
    if buf is None or buf.size < size:
        buf = buffers[slot] = np.empty(size, np.float32)
    return buf[:size]


def _threads() -> ThreadPoolExecutor:
    """Workers for the depthwise passes, which BLAS does not thread (numpy ufuncs release the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="convbackends-numpy")
    return _pool


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
    xp = _scratch("pad", n * c * hp * wp).reshape(n, c, hp, wp)
    xp[:, :, :pt] = 0
    xp[:, :, pt + h:] = 0
    xp[:, :, pt:pt + h, :pl] = 0
    xp[:, :, pt:pt + h, pl + w:] = 0
    xp[:, :, pt:pt + h, pl:pl + w] = x
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
    _epilogue(y, bias, act)


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
        cols = _scratch("cols", part.size).reshape(part.shape)
        np.copyto(cols, part)
        y_part = y[:, g0:g0 + step]
        np.matmul(w[g0:g0 + step], cols.reshape(n, -1, k, pixels), out=y_part)
        _epilogue(y_part, None if bias is None else bias[g0:g0 + step], act)


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
        y = _scratch("rows", nb * g.o * nr * wp).reshape(nb, g.groups, g.og, nr * wp)
        _columns_gemm(w, view, y, bias, act)
        out[n0:n0 + nb, :, r0:r0 + nr] = y.reshape(nb, g.o, nr, wp)[..., :g.ow]


def _phases(x: np.ndarray, geom: Conv2dGeometry, rows: int, cols: int) -> np.ndarray:
    """The zero-padded input split by stride phase: out[a*sw + b] is xpad[..., a::sh, b::sw].

    Each phase is (rows, cols) and flattened, plus one spare row so that a tap's run over the
    padded width may overhang its last row. Every input pixel is copied exactly once.
    """
    g = geom
    phases = np.zeros((g.sh * g.sw, g.n, g.c, rows + 1, cols), np.float32)
    for a in range(g.sh):
        # Padded row a + r*sh is input row a + r*sh - pt: find the first r inside the input.
        r0 = max(0, -(-(g.pt - a) // g.sh))
        h0 = a + r0 * g.sh - g.pt
        nr = min(rows - r0, len(range(h0, g.h, g.sh)))
        for b in range(g.sw):
            q0 = max(0, -(-(g.pl - b) // g.sw))
            w0 = b + q0 * g.sw - g.pl
            nq = min(cols - q0, len(range(w0, g.w, g.sw)))
            if nr > 0 and nq > 0:
                src = x[:, :, h0:h0 + nr * g.sh:g.sh, w0:w0 + nq * g.sw:g.sw]
                phases[a * g.sw + b, :, :, r0:r0 + nr, q0:q0 + nq] = src
    return phases.reshape(g.sh * g.sw, g.n, g.c, (rows + 1) * cols)


def conv2d_depthwise(x, w, bias, act, geom: Conv2dGeometry, out) -> None:
    """Per tap, one multiply-add over whole rows of every channel; channel halves run on threads.

    w is (C, multiplier, kh*kw): output channel c*multiplier + m reads input channel c. Tap (i, j)
    reads stride phase (i*dh % sh, j*dw % sw) at offset (i*dh // sh, j*dw // sw), so each tap is a
    contiguous run over the flattened phase image; the columns past OW are computed and dropped.
    """
    g = geom
    mult = g.og
    taps = []
    for i in range(g.kh):
        for j in range(g.kw):
            (oi, a), (oj, b) = divmod(i * g.dh, g.sh), divmod(j * g.dw, g.sw)
            taps.append((a * g.sw + b, oi, oj, i * g.kw + j))
    rows = g.oh + max(t[1] for t in taps)
    cols = g.ow + max(t[2] for t in taps)
    phases = _phases(x, g, rows, cols)
    run_len = g.oh * cols
    y_all = out.reshape(g.n, g.c, mult, g.oh, g.ow)
    b_all = None if bias is None else bias.reshape(g.c, mult, 1, 1)
    workers = os.cpu_count() or 1
    # Splitting costs a few microseconds of Python per tap: only worth it for enough work per worker.
    parts = max(1, min(workers, g.c, g.n * g.c * mult * run_len // (1 << 16)))
    bounds = np.linspace(0, g.c, parts + 1).astype(int)

    def run(c0: int, c1: int) -> None:
        acc = np.empty((g.n, c1 - c0, mult, run_len), np.float32)
        tmp = np.empty_like(acc)
        y = y_all[:, c0:c1]
        last = len(taps) - 1
        with np.errstate(invalid="ignore"):  # inf * 0 gives NaN, as in the reference
            for k, (phase, oi, oj, t) in enumerate(taps):
                start = oi * cols + oj
                src = phases[phase, :, c0:c1, None, start:start + run_len]
                np.multiply(src, w[c0:c1, :, t, None], out=acc if k == 0 else tmp)
                if 0 < k < last:
                    acc += tmp
            # The last tap's add writes the sum, cropped to OW columns, straight into the output.
            shape = y.shape[:3] + (g.oh, cols)
            cropped = acc.reshape(shape)[..., :g.ow]
            if last == 0:
                y[...] = cropped
            else:
                np.add(cropped, tmp.reshape(shape)[..., :g.ow], out=y)
        _epilogue(y, None if b_all is None else b_all[c0:c1], act)

    if parts == 1:
        run(0, g.c)
    else:
        list(_threads().map(run, bounds[:-1], bounds[1:]))


def winograd_weights(w: np.ndarray) -> np.ndarray:
    """U = G w G^T per (o, c), computed in float64 once: (36, O, C) for the 36 batched GEMMs."""
    u = np.einsum("ai,ocij,bj->aboc", _WINO_G, w.astype(np.float64), _WINO_G)
    return np.ascontiguousarray(u.reshape(36, w.shape[0], w.shape[1]), dtype=np.float32)


def winograd_tiles(geom: Conv2dGeometry) -> int:
    """4x4 output tiles per image."""
    return -(-geom.oh // 4) * -(-geom.ow // 4)


def conv2d_winograd(x, u, bias, act, geom: Conv2dGeometry, out, tile_bytes: int = TILE_BYTES) -> None:
    """Winograd F(4,3): 6x6 input tiles -> 36 GEMMs (O x C by C x tiles) -> 4x4 output tiles.

    Only for finite inputs: a NaN or inf in one tile spreads over its 16 outputs (the caller checks).
    """
    g = geom
    th, tw = -(-g.oh // 4), -(-g.ow // 4)
    # The last tile row/column may reach past the input: pad it with zeros, crop its outputs.
    xp = _padded(x, (g.pt, g.pl, g.pb, g.pr), 4 * th + 2 - (g.h + g.pt + g.pb), 4 * tw + 2 - (g.w + g.pl + g.pr))
    full = out if (4 * th, 4 * tw) == (g.oh, g.ow) else np.empty((g.n, g.o, 4 * th, 4 * tw), np.float32)
    sn, sc, sh, sw = xp.strides
    bias_col = None if bias is None else bias.reshape(1, g.o, 1)
    for n0, nb, r0, nr, c0, nc in _blocks(g.n, th, tw, 36 * max(g.c, g.o), tile_bytes // _F32):
        tiles = nb * nr * nc
        view = as_strided(
            xp[n0:, :, 4 * r0:, 4 * c0:],
            shape=(6, 6, g.c, nb, nr, nc),
            strides=(sh, sw, sc, sn, 4 * sh, 4 * sw),
            writeable=False,
        )
        d = _scratch("cols", view.size).reshape(36, g.c * tiles)
        np.copyto(d.reshape(view.shape), view)
        v = _scratch("wino_v", d.size).reshape(36, g.c, tiles)
        np.matmul(_WINO_IN, d, out=v.reshape(d.shape))
        m = _scratch("wino_m", 36 * g.o * tiles).reshape(36, g.o, tiles)
        np.matmul(u, v, out=m)
        y = _scratch("wino_y", 16 * g.o * tiles).reshape(16, g.o, tiles)
        np.matmul(_WINO_OUT, m.reshape(36, g.o * tiles), out=y.reshape(16, g.o * tiles))
        _epilogue(y, bias_col, act)
        dst = full[n0:n0 + nb, :, 4 * r0:4 * (r0 + nr), 4 * c0:4 * (c0 + nc)]
        dst.reshape(nb, g.o, nr, 4, nc, 4)[...] = y.reshape(4, 4, g.o, nb, nr, nc).transpose(3, 2, 4, 0, 5, 1)
    if full is not out:
        out[...] = full[:, :, :g.oh, :g.ow]


def _winograd_safe(x: np.ndarray) -> bool:
    """Finite and far from overflow (the transforms scale by up to 100): two reductions, no temporary.

    NaN propagates through min/max and fails both comparisons.
    """
    return bool(-WINOGRAD_MAX_ABS < x.min() and x.max() < WINOGRAD_MAX_ABS)


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
        # Winograd sits beside the GEMM weights: unsafe inputs and small images still take the GEMM.
        if (
            (spec.kh, spec.kw, spec.stride, spec.dilation, groups) == (3, 3, (1, 1), (1, 1), 1)
            and min(spec.in_channels, o) >= WINOGRAD_MIN_CHANNELS
        ):
            self.winograd = winograd_weights(w)

    def run(self, x, geom: Conv2dGeometry):
        out = np.empty(geom.output_shape, np.float32)
        act = self.spec.activation
        if self.path == "depthwise":
            conv2d_depthwise(x, self.w, self.bias, act, geom, out)
        elif self.path == "gemm_1x1":
            conv2d_gemm_1x1(x, self.w, self.bias, act, geom, out)
        elif self.winograd is not None and winograd_tiles(geom) >= WINOGRAD_MIN_TILES and _winograd_safe(x):
            bias = None if self.bias is None else self.bias.reshape(-1)
            conv2d_winograd(x, self.winograd, bias, act, geom, out, self.tile_bytes)
        else:
            conv2d_implicit_gemm(x, self.w, self.bias, act, geom, out, self.tile_bytes)
        return out


def _blas_name() -> str:
    """The BLAS numpy was built against, from its build config (no printing, no import of extras)."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    except (AttributeError, KeyError, TypeError):
        return "unknown BLAS"
    name, version = blas.get("name", "unknown BLAS"), blas.get("version", "")
    return f"{name} {version}".strip()


class NumpyBackend(Backend):
    name = "numpy"

    def _enumerate(self) -> list[DeviceInfo]:
        blas = _blas_name()
        facts = {"cores": os.cpu_count(), "numpy": np.__version__, "blas": blas}
        return [DeviceInfo(self.name, 0, f"CPU (numpy {np.__version__}, {blas})", "cpu", facts)]

    def prepare(self, spec: Conv2dSpec, w, b, device: DeviceInfo) -> Prepared:
        return NumpyPrepared(spec, w, b, device)


BACKEND = NumpyBackend()
