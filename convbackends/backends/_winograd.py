"""Winograd F(4,3) for 3x3 stride-1 layers, as the numpy and Vulkan backends share it: the transform
matrices, the weight transform (done once, as one small GEMM) and the input check.

Y = A^T [(G w G^T) * (B^T d B)] A per 6x6 input tile d and 4x4 output tile (Lavin & Gray), points 0,
+-1, +-2 and infinity. The transforms scale by up to 25 and mix a tile's 36 inputs, so an input with a
NaN, an inf or a value near float32's range takes the direct GEMM instead: there Winograd would spread
it over the tile's 16 outputs or overflow.
"""
from __future__ import annotations

import numpy as np

from ..spec import Conv2dGeometry, Conv2dSpec

BT = np.array([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=np.float64)
G = np.array([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=np.float64)
AT = np.array([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=np.float64)

# Inputs at or beyond this magnitude (or non-finite) take the GEMM: the transforms would overflow.
MAX_ABS = 1e30


def fits(spec: Conv2dSpec, dilated: bool = False) -> bool:
    """A dense (groups = 1) 3x3 stride-1 layer; dilated ones too where the backend splits the input into
    its dilation phases (`dilated`). How many channels make it pay is each backend's own threshold."""
    return ((spec.kh, spec.kw, spec.stride, spec.groups) == (3, 3, (1, 1), 1)
            and (dilated or spec.dilation == (1, 1)))


# G w G^T of a flattened 3x3 kernel as one product: row 6a + b, column 3i + j holds G[a, i] * G[b, j].
_GG = np.kron(G, G).astype(np.float32)


def weights(w: np.ndarray) -> np.ndarray:
    """U = G w G^T per (o, c): the 36 GEMMs' C x O matrices, as a (36, C, O) view of a contiguous (36, O, C).

    One float32 GEMM, kron(G, G) (36 x 9) by the flattened kernels (9 x O*C, read transposed): the
    (o, c) pairs stay the fastest axis, so no copy reorders the weights, and the (36, O, C) array
    under the view is the layout the GEMMs of every backend read. It took 12 ms for 512 x 512
    channels on one core, where two 6x3 GEMMs (G along columns, then rows) took 17 and the float64
    einsum 160; the largest error against the float64 transform is 3.5e-8 for weights in [-1, 1].
    """
    o, c = w.shape[:2]
    return np.matmul(_GG, w.reshape(-1, 9).T).reshape(36, o, c).transpose(0, 2, 1)


def tile_grid(geom: Conv2dGeometry) -> tuple[int, int]:
    """4x4 output tiles per image: (rows, columns)."""
    return -(-geom.oh // 4), -(-geom.ow // 4)


def safe(x: np.ndarray) -> bool:
    """Finite and far from overflow: two reductions, no temporary; NaN fails both comparisons.
    An empty input (H or W = 0, the outputs all padding) has nothing to overflow."""
    return x.size == 0 or bool(-MAX_ABS < x.min() and x.max() < MAX_ABS)
