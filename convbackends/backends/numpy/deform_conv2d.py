"""deform_conv2d on the CPU: a bilinear im2col per tile of output pixels, then one BLAS GEMM; backward by the
same tiles (GEMMs for grad_w and the column gradients, a col2im into grad_x in a fixed order).

The input is copied once per call into a channels-last image with a zero border (one pixel, two at the bottom),
so the four corners of any cell that touches the image lie inside it (no per-corner bounds tests), points that
read nothing read a cell of zeros in the bottom border (padded pixel (H + 1, 0)), and each corner is one row
of C/G floats: a tile's samples are one row gather (`np.take` of the four corners of every point) and a
weighted sum (a batched `np.matmul`), split over the cores by ranges of points (the runtime's `in_parts`; BLAS
threads the GEMMs itself). The column buffer of a tile stays under `COLUMNS_BYTES`; a large layer is never held whole. Column order is
(pixel, tap, channel), so the GEMM weights are w permuted once in `prepare`. The col2im sorts the points of a
tile by their cell and adds them rank by rank within their cell (`_scatter`): a fixed summation order, so
deterministic, and fancy-indexed adds with distinct targets instead of `np.add.at`.
Sampling and gradient rules: ops/deform_conv2d.py (right-sided at integer coordinates, including -1).
"""
from __future__ import annotations

import numpy as np

from ...ops.deform_conv2d import DeformConv2dGeometry, DeformConv2dPrepared, DeformConv2dSpec
from ...runtime import DeviceInfo
from ...runtime.numpy import in_parts
from .conv2d import _epilogue

# A tile's column buffer (pixels x taps x channels) stays under this; the corner gathers beside it take 4x more.
COLUMNS_BYTES = 2 << 20

# Points of one cell beyond this many are scattered by np.add.at (slower, but only for crowded cells).
SCATTER_RANKS = 32

_F32 = np.dtype(np.float32).itemsize


class _Image:
    """x (N, C, H, W) as channels-last rows with a zero border: row ((n*Hp + r)*Wp + q)*G + g holds the C/G
    channels of offset group g at padded pixel (r, q), Hp = H + 3 (two border rows at the bottom), Wp = W + 2."""

    def __init__(self, x: np.ndarray, geom: DeformConv2dGeometry):
        g = geom
        self.hp, self.wp, self.groups, self.cpg = g.h + 3, g.w + 2, g.offset_groups, g.c_per_offset_group
        data = np.empty((g.n, self.hp, self.wp, g.c), np.float32)
        data[:, 0], data[:, -2:], data[:, :, 0], data[:, :, -1] = 0, 0, 0, 0
        in_parts(g.c, x.size, lambda c0, c1: np.copyto(data[:, 1:-2, 1:-1, c0:c1], x[:, c0:c1].transpose(0, 2, 3, 1)))
        self.rows = data.reshape(-1, self.cpg)
        # From a cell's top-left row to its corners (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
        self.shifts = np.array([0, 1, self.wp, self.wp + 1]) * self.groups

    def interior(self, grad_rows: np.ndarray, n: int) -> np.ndarray:
        """Rows of this layout (gradients accumulated in it) back to (N, C, H, W) without the border."""
        image = grad_rows.reshape(n, self.hp, self.wp, self.groups * self.cpg)[:, 1:-2, 1:-1]
        return np.ascontiguousarray(image.transpose(0, 3, 1, 2))

    def sample(self, points: "_Points", weights: np.ndarray, keep_corners: bool = False):
        """The columns (M, C/G): the four corners of the points' cells weighted by `weights` (M, 4); with
        `keep_corners`, also the corners (M, 4, C/G) (for the backward's sums).

        A point at -1 exactly reads 0 as if from the cell of zeros (NaN where its weight is, a NaN mask):
        its own cell's corners may hold an inf, which its zero weight would turn into NaN.
        """
        cells = points.cells
        count = cells.shape[0]
        cols = np.empty((count, self.cpg), np.float32)
        corners = np.empty((count, 4, self.cpg), np.float32) if keep_corners else None

        def part(lo: int, hi: int) -> None:
            # mode="clip" (the rows are always in range): with `out`, the default mode buffers the result.
            found = np.take(self.rows, cells[lo:hi, None] + self.shifts, axis=0,
                            out=None if corners is None else corners[lo:hi], mode="clip")
            np.matmul(weights[lo:hi, None, :], found, out=cols[lo:hi, None, :])

        in_parts(count, count * 4 * self.cpg, part)
        cols[points.edges] = weights[points.edges].sum(1, keepdims=True) * np.float32(0)
        return cols, corners


class _Points:
    """The sample points of one tile, (images, pixels, taps, offset groups) flattened: each one's cell (its
    top-left row in `_Image`), bilinear weights of its four corners and, for backward, fy, fx, the mask,
    where the cell formulas apply and where the coordinate is NaN."""

    def __init__(self, offset, mask, geom: DeformConv2dGeometry, image: _Image, n0: int, nb: int, p0: int, p1: int):
        g = geom
        taps, groups, count = g.taps, g.offset_groups, p1 - p0
        off = offset[n0:n0 + nb].reshape(nb, groups, taps, 2, g.oh * g.ow)[..., p0:p1]
        dy, dx = (off[:, :, :, axis].transpose(0, 3, 2, 1) for axis in (0, 1))  # (nb, P, taps, G)
        pixels = np.arange(p0, p1)
        oy, ox = pixels // g.ow, pixels % g.ow
        i, j = np.divmod(np.arange(taps), g.kw)
        base_y = (oy[:, None] * g.sh - g.pt + i[None, :] * g.dh).astype(np.float32)[None, :, :, None]
        base_x = (ox[:, None] * g.sw - g.pl + j[None, :] * g.dw).astype(np.float32)[None, :, :, None]
        py, px = base_y + dy, base_x + dx
        y0, x0 = np.floor(py), np.floor(px)
        self.nan = np.isnan(py) | np.isnan(px)
        # The cell formulas hold on [-1, H) x [-1, W) (the value is 0 at -1 exactly, its right derivative not).
        self.cell = (y0 >= -1) & (y0 < g.h) & (x0 >= -1) & (x0 < g.w)
        self.inside = self.cell & (py != -1) & (px != -1)
        with np.errstate(invalid="ignore"):  # inf - inf at infinite offsets, outside the box anyway
            self.fy = np.where(self.cell, py - y0, np.float32(0))
            self.fx = np.where(self.cell, px - x0, np.float32(0))
        # Points outside the box (and NaN ones) take the cell of zeros of their image: top-left at padded (H + 1, 0).
        rows = np.where(self.cell, y0, g.h).astype(np.intp) + 1
        columns = np.where(self.cell, x0, -1).astype(np.intp) + 1
        image_rows = (np.arange(n0, n0 + nb) * image.hp)[:, None, None, None]
        self.cells = (((image_rows + rows) * image.wp + columns) * groups + np.arange(groups)).reshape(-1)
        # Points at -1 exactly: their cell is kept for the right derivative, but they read 0.
        self.edges = np.flatnonzero(self.cell & ~self.inside)
        self.mask = None if mask is None else (
            mask[n0:n0 + nb].reshape(nb, groups, taps, g.oh * g.ow)[..., p0:p1].transpose(0, 3, 2, 1))
        self.shape = (nb, count, taps, groups)

    def weights(self, region: np.ndarray, masked: bool, nan: bool = True) -> np.ndarray:
        """Bilinear weights of the four corners (M, 4), zero outside `region`, times the mask when `masked`,
        NaN at NaN coordinates when `nan`."""
        fy, fx = self.fy, self.fx
        scale = region.astype(np.float32)
        if masked and self.mask is not None:
            scale = scale * self.mask
        if nan:
            scale = np.where(self.nan, np.float32(np.nan), scale)
        weights = np.stack(((1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx), -1) * scale[..., None]
        return weights.reshape(-1, 4)


def _tiles(geom: DeformConv2dGeometry):
    """(n0, nb, p0, p1): whole images when one's columns fit under COLUMNS_BYTES, else runs of its pixels."""
    g = geom
    per_pixel = g.taps * g.c * _F32
    pixels = g.oh * g.ow
    run = max(1, min(pixels, COLUMNS_BYTES // per_pixel))
    if run < pixels:
        for n in range(g.n):
            for p0 in range(0, pixels, run):
                yield n, 1, p0, min(pixels, p0 + run)
        return
    step = max(1, COLUMNS_BYTES // (per_pixel * pixels))
    for n0 in range(0, g.n, step):
        yield n0, min(step, g.n - n0), 0, pixels


class NumpyDeformPrepared(DeformConv2dPrepared):
    """w permuted to the column order (groups, O/groups, taps * C/groups); the bias kept for the epilogue."""

    def __init__(self, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device, self.spec = device, spec
        groups, o, cg = spec.groups, spec.out_channels, spec.in_channels // spec.groups
        taps = spec.kh * spec.kw
        self.w = np.ascontiguousarray(
            w.reshape(groups, o // groups, cg, taps).transpose(0, 1, 3, 2)).reshape(groups, o // groups, taps * cg)
        self.bias = None if b is None else b.reshape(o, 1).copy()

    def _grouped(self, cols: np.ndarray, geom: DeformConv2dGeometry, pixels: int) -> np.ndarray:
        """Columns (pixels, taps * C) as (groups, pixels, taps * C/groups), the GEMM's operand per weight group."""
        if geom.groups == 1:
            return cols.reshape(1, pixels, -1)
        split = cols.reshape(pixels, geom.taps, geom.groups, geom.cg).transpose(2, 0, 1, 3)
        return np.ascontiguousarray(split).reshape(geom.groups, pixels, -1)

    def _ungrouped(self, dcols: np.ndarray, geom: DeformConv2dGeometry, pixels: int) -> np.ndarray:
        """The inverse of `_grouped`: (groups, pixels, taps * C/groups) back to (pixels, taps * C)."""
        if geom.groups == 1:
            return dcols.reshape(pixels, -1)
        split = dcols.reshape(geom.groups, pixels, geom.taps, geom.cg).transpose(1, 2, 0, 3)
        return np.ascontiguousarray(split).reshape(pixels, -1)

    def run(self, x, offset, mask, geom: DeformConv2dGeometry):
        g = geom
        out = np.empty(g.output_shape, np.float32)
        image = _Image(x, g)
        y_all = out.reshape(g.n, g.groups, g.og, g.oh * g.ow)
        for n0, nb, p0, p1 in _tiles(g):
            points = _Points(offset, mask, g, image, n0, nb, p0, p1)
            cols, _ = image.sample(points, points.weights(points.inside, masked=True))
            count = p1 - p0
            grouped = self._grouped(cols, g, nb * count).reshape(g.groups, nb, count, -1)
            y = y_all[n0:n0 + nb, :, :, p0:p1]
            with np.errstate(invalid="ignore", over="ignore"):
                np.matmul(self.w[None], grouped.transpose(1, 0, 3, 2), out=y)
                _epilogue(y.reshape(nb, g.o, count), self.bias, self.spec.activation)
        return out

    def backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        g = geom
        image = _Image(x, g)
        grad_rows = np.zeros_like(image.rows)
        grad_offset = np.empty(g.offset_shape, np.float32)
        grad_mask = None if mask is None else np.empty(g.mask_shape, np.float32)
        grad_w = None
        gy_all = grad_y.reshape(g.n, g.groups, g.og, g.oh * g.ow)
        for n0, nb, p0, p1 in _tiles(g):
            m = nb * (p1 - p0)
            points = _Points(offset, mask, g, image, n0, nb, p0, p1)
            forward = points.weights(points.inside, masked=False)
            scale = np.ones(points.shape, np.float32) if points.mask is None else points.mask
            cols, corners = image.sample(points, forward * scale.reshape(-1, 1), keep_corners=True)
            # (groups, O/groups, pixels) of this tile, images side by side.
            gy = np.ascontiguousarray(gy_all[n0:n0 + nb, :, :, p0:p1].transpose(1, 2, 0, 3)).reshape(g.groups, g.og, m)
            grouped = self._grouped(cols, g, m)
            # Tiles add up in a fixed order; the first one writes grad_w (a layer's weights can be large).
            if grad_w is None:
                grad_w = np.matmul(gy, grouped)
            else:
                grad_w += np.matmul(gy, grouped)
            dcols = self._ungrouped(np.matmul(gy.transpose(0, 2, 1), self.w), g, m).reshape(-1, g.c_per_offset_group)
            # Each corner's dot product with the column gradient, per point: (M, 4).
            s00, s01, s10, s11 = _corner_sums(corners, dcols)
            fy, fx = points.fy.reshape(-1), points.fx.reshape(-1)
            d_y = (1 - fx) * (s10 - s00) + fx * (s11 - s01)
            d_x = (1 - fy) * (s01 - s00) + fy * (s11 - s10)
            nan = points.nan.reshape(-1)
            scale = scale.reshape(-1)
            d_y = np.where(nan, np.float32(np.nan), d_y * scale)
            d_x = np.where(nan, np.float32(np.nan), d_x * scale)
            _store(grad_offset, np.stack((d_y, d_x), -1), g, n0, nb, p0, p1, 2)
            if grad_mask is not None:
                d_mask = forward[:, 0] * s00 + forward[:, 1] * s01 + forward[:, 2] * s10 + forward[:, 3] * s11
                _store(grad_mask, np.where(nan, np.float32(np.nan), d_mask), g, n0, nb, p0, p1, 1)
            inside = np.flatnonzero(points.cell)
            weights = points.weights(points.cell, masked=True, nan=False)
            _scatter(grad_rows, image, points.cells[inside], dcols[inside], weights[inside])
        grad_x = image.interior(grad_rows, g.n)
        taps_w = grad_w.reshape(g.groups, g.og, g.taps, g.cg).transpose(0, 1, 3, 2)
        grad_w = np.ascontiguousarray(taps_w).reshape(g.weight_shape)
        grad_b = grad_y.sum(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
        return grad_x, grad_offset, grad_mask, grad_w, grad_b


def _corner_sums(corners: np.ndarray, dcols: np.ndarray) -> np.ndarray:
    """(4, M): each corner's dot product with the point's column gradient, in parts on the cores."""
    count = corners.shape[0]
    sums = np.empty((4, count), np.float32)
    in_parts(count, corners.size, lambda lo, hi: np.einsum("mic,mc->im", corners[lo:hi], dcols[lo:hi],
                                                            out=sums[:, lo:hi]))
    return sums


def _store(dst, values, geom: DeformConv2dGeometry, n0, nb, p0, p1, per_point: int) -> None:
    """Per-point values (M,) or (M, 2) into grad_offset/grad_mask (N, G*taps*per_point, Ho, Wo)."""
    g = geom
    values = values.reshape(nb, p1 - p0, g.taps, g.offset_groups, per_point).transpose(0, 3, 2, 4, 1)
    dst.reshape(g.n, g.offset_groups, g.taps, per_point, g.oh * g.ow)[n0:n0 + nb, ..., p0:p1] = values


def _scatter(grad_rows, image: _Image, cells, dcols, weights) -> None:
    """col2im: grad_rows[cell + corner] += weight * dcols for every point and corner, in a fixed order.

    Points are ranked within their cell (a stable sort by cell): the points of one rank have distinct cells, so
    each rank adds into grad_rows with one fancy-indexed add per corner (distinct targets, no np.add.at), rank
    after rank. Cells with more than `SCATTER_RANKS` points (offsets that gather many samples in one place)
    add their remaining points with np.add.at. The order depends on the data only: deterministic.
    """
    count = cells.shape[0]
    if not count:
        return
    order = np.argsort(cells, kind="stable")
    starts = np.diff(cells[order], prepend=-1) != 0
    rank = np.arange(count) - np.flatnonzero(starts)[np.cumsum(starts) - 1]
    by_rank = order[np.argsort(rank, kind="stable")]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(rank))))
    for r in range(min(SCATTER_RANKS, bounds.size - 1)):
        points = by_rank[bounds[r]:bounds[r + 1]]
        rows, point_weights, point_cells = dcols[points], weights[points], cells[points]
        for corner, shift in enumerate(image.shifts):
            grad_rows[point_cells + shift] += rows * point_weights[:, corner, None]
    if bounds.size - 1 > SCATTER_RANKS:
        points = by_rank[bounds[SCATTER_RANKS]:]
        for corner, shift in enumerate(image.shifts):
            np.add.at(grad_rows, cells[points] + shift, dcols[points] * weights[points, corner, None])


def prepare(backend, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo) -> DeformConv2dPrepared:
    return NumpyDeformPrepared(spec, w, b, device)
