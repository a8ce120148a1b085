"""What the device backends of deform_conv2d share (kernel/ and vulkan/): the tiles a batch's columns are
made in, the weights as the grouped 1x1 GEMMs take them, and the inverse map that lets grad_x be gathered.

Columns (C * taps floats per output pixel) are made a tile at a time, so a large layer never holds them for
the whole batch: whole images while one fits the cap, else runs of one image's pixels. Every GEMM of the op
is a grouped 1x1 conv2d of the backend: the forward's (y = W cols), dcol = W^T grad_y's, and grad_w's
(grad_y cols^T, its "weights" grad_y repacked each call).

grad_x is gathered, not scattered (no float atomics, deterministic): each input pixel sums the sample
points of the four cells it is a corner of, each times its corner's bilinear weight and mask.
`inverse_map` lists a tile's points by cell with a stable sort on the host, with those weights; a point's
cell is floor() of its coordinate computed in float32 exactly as the kernels compute it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.deform_conv2d import DeformConv2dGeometry

# Pixel runs of a partial-image tile are whole multiples of this (the CPU GEMM's pixel block).
PIXEL_RUN = 8


@dataclass(frozen=True)
class Tile:
    """Images [n0, n0 + nb) and output pixels [p0, p0 + count) of a batch."""

    n0: int
    nb: int
    p0: int
    count: int

    def whole_images(self, geom: DeformConv2dGeometry) -> bool:
        return self.count == geom.oh * geom.ow

    def scalars(self, geom: DeformConv2dGeometry) -> tuple[int, ...]:
        """The geometry then the tile: the kernels' DEFORM_GEOMETRY_ARGS."""
        return (*geom.as_ints(), self.n0, self.nb, self.p0, self.count)


def column_bytes(geom: DeformConv2dGeometry) -> int:
    """Bytes of one output pixel's columns."""
    return 4 * geom.c * geom.taps


def tiles(geom: DeformConv2dGeometry, cap: int) -> list[Tile]:
    """The batch in tiles whose columns stay within `cap` bytes: whole images where one fits, else runs of
    PIXEL_RUN-multiples of one image's pixels. ValueError when a single pixel's columns do not fit."""
    per_pixel, npix = column_bytes(geom), geom.oh * geom.ow
    if per_pixel * npix <= cap:
        step = cap // (per_pixel * npix)
        return [Tile(n0, min(step, geom.n - n0), 0, npix) for n0 in range(0, geom.n, step)]
    run = cap // per_pixel
    if run < 1:
        raise ValueError(f"one output pixel's columns need {per_pixel} bytes, more than the {cap} bytes a column "
                         "buffer may take on this device")
    if run >= PIXEL_RUN:
        run -= run % PIXEL_RUN
    return [Tile(n, 1, p0, min(run, npix - p0)) for n in range(geom.n) for p0 in range(0, npix, run)]


def column_weights(w: np.ndarray) -> np.ndarray:
    """w (O, C/groups, kh, kw) as the forward GEMM's 1x1 weights (O, C/groups * taps, 1, 1): input channel
    c * taps + k of a group is tap k of its channel c, the columns' row order."""
    o = w.shape[0]
    return np.ascontiguousarray(w.reshape(o, -1, 1, 1))


def transposed_weights(w: np.ndarray, groups: int) -> np.ndarray:
    """W^T per group as 1x1 weights (C * taps, O/groups, 1, 1): dcol = W^T grad_y as a grouped 1x1 layer."""
    o, cg, kh, kw = w.shape
    per_group = w.reshape(groups, o // groups, cg * kh * kw).transpose(0, 2, 1)
    return np.ascontiguousarray(per_group).reshape(groups * cg * kh * kw, o // groups, 1, 1)


def gradient_weights_shape(geom: DeformConv2dGeometry, tile: Tile) -> tuple[int, int, int, int]:
    """The grad_w GEMM as a grouped 1x1 layer: its "weights" (O, nb * count, 1, 1) are grad_y of the tile,
    its input the tile's columns, pixel-major ([group][nb * count][C/groups * taps])."""
    return (geom.o, tile.nb * tile.count, 1, 1)


def inverse_map(offset: np.ndarray, mask: np.ndarray | None, geom: DeformConv2dGeometry,
                tile: Tile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, points, weights) of a tile: `points` (int32) the ids tap * count + pixel of its sample points
    whose cell has a corner in the image (coordinates in [-1, H) x [-1, W), not NaN), sorted stably by (tile
    image, offset group, cell); cell (cy, cx) is number (cy + 1) * (W + 1) + cx + 1 of its (image, group)
    segment, and `starts` (int32, segments * cells + 1) where each cell's run of points begins. `weights`
    (float32, (points, 4)): each point's bilinear weights of its corners 00, 01, 10, 11 times its mask,
    computed in float32 as the kernels would, (m * wy) * wx."""
    g, t = geom, tile
    taps, groups, count = g.taps, g.offset_groups, t.count
    off = offset[t.n0:t.n0 + t.nb].reshape(t.nb, groups, taps, 2, g.oh * g.ow)[..., t.p0:t.p0 + count]
    oy, ox = np.divmod(np.arange(t.p0, t.p0 + count), g.ow)
    i, j = np.divmod(np.arange(taps), g.kw)
    py = (oy[None, :] * g.sh - g.pt + i[:, None] * g.dh).astype(np.float32) + off[:, :, :, 0]
    px = (ox[None, :] * g.sw - g.pl + j[:, None] * g.dw).astype(np.float32) + off[:, :, :, 1]
    with np.errstate(invalid="ignore"):
        touches = (py >= -1) & (py < g.h) & (px >= -1) & (px < g.w)
    cells = (g.h + 1) * (g.w + 1)
    py, px = py[touches], px[touches]
    cy, cx = np.floor(py), np.floor(px)
    segment = np.broadcast_to(np.arange(t.nb * groups).reshape(t.nb, groups, 1, 1), touches.shape)[touches]
    keys = segment * cells + (cy.astype(np.int64) + 1) * (g.w + 1) + cx.astype(np.int64) + 1
    ids = np.broadcast_to(np.arange(taps * count).reshape(taps, count), touches.shape)[touches]
    order = np.argsort(keys, kind="stable")
    starts = np.zeros(t.nb * groups * cells + 1, np.int32)
    np.cumsum(np.bincount(keys, minlength=t.nb * groups * cells), out=starts[1:])
    m = np.float32(1) if mask is None else (
        mask[t.n0:t.n0 + t.nb].reshape(t.nb, groups, taps, g.oh * g.ow)[..., t.p0:t.p0 + count][touches])
    fy, fx = (py - cy)[order], (px - cx)[order]
    m = m if mask is None else m[order]
    wy = (m * (1 - fy), m * fy)
    wx = (1 - fx, fx)
    weights = np.stack([wy[dy] * wx[dx] for dy in (0, 1) for dx in (0, 1)], axis=1).astype(np.float32)
    return starts, ids[order].astype(np.int32), weights
