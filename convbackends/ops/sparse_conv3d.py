"""sparse_conv3d: 3-D convolution over the active sites of a voxel grid (spconv's SparseConv3d, SubMConv3d and
SparseInverseConv3d), for LiDAR backbones and sparse U-Nets. Cost grows with the active sites, never with the grid.

`SparseTensor` holds N active sites: features (N, C) float32 and indices (N, 4) int32 rows (batch, z, y, x) in a
grid of `spatial_shape` (D, H, W) per batch element. Weights are torch's Conv3d layout (O, C, kd, kh, kw); spconv
stores (O, kd, kh, kw, C): convert with `w.transpose(0, 4, 1, 2, 3).copy()`.

Semantics, with tap t = (i, j, l) of the kernel and output site o reading input site o * stride - padding + t * dilation:
- regular (`subm=False`): the output sites are every output position (dense conv3d output-size rule) that some active
  input reaches; the features are the dense conv3d of the densified input at those sites.
- submanifold (`subm=True`): stride 1, odd kernel, centred (padding dilation * (k - 1) / 2 implied); the output
  sites are the input sites.
- inverse (`SparseInverseConv3d`): the rulebook of the regular layer with the same `indice_key`, input and output
  exchanged: its output sites are that layer's input sites (a dense conv_transpose3d sampled there).
Bias and activation apply at output sites only. Output rows are sorted by (batch, z, y, x) on every backend.

Every layer works on sorted sites: a tensor made with unsorted indices is put in site order once (its features
gathered by the backend) when a layer first reads it. The rulebook (ops/sparse_conv3d.py `Rulebook`, the one
format of every backend; /work/notes/sparse-interface.md) is built by the backend, on the device for GPU backends,
and cached on the tensor under the layer's `indice_key`, shared by the tensors a network derives from it
(spconv's indice_dict). Implementations: backends/<family>/sparse_conv3d.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..runtime import get_backend
from ..spec import Activation, _is_int, check_bias, check_float32
from .base import ONE_SHOT, Layer, host_array

# Linearised site keys are int64: batch_size * D * H * W must stay below this.
KEY_LIMIT = 1 << 62


def _triple(name: str, value, minimum: int) -> tuple[int, int, int]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 3
    if len(items) != 3 or not all(_is_int(v) for v in items):
        raise TypeError(f"{name} must be an int or a triple of ints (d, h, w), got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def to_host(array) -> np.ndarray:
    """A numpy array as is; a host copy (or zero-copy view) of a device array, torch tensor or DLPack producer."""
    return array if isinstance(array, np.ndarray) else host_array("array", array)


def linear_keys(indices: np.ndarray, spatial_shape) -> np.ndarray:
    """int64 keys ((b * D + z) * H + y) * W + x: ordering keys is ordering sites by (batch, z, y, x)."""
    d, h, w = spatial_shape
    rows = indices.astype(np.int64, copy=False)
    return ((rows[:, 0] * d + rows[:, 1]) * h + rows[:, 2]) * w + rows[:, 3]


class SparseTensor:
    """N active sites of a batch of (D, H, W) grids: `features` (N, C) float32 (numpy, a device array of the
    backend that will run it, a torch tensor or a DLPack producer: a layer's output features are the same kind,
    convbackends/arrays.py) and `indices` (N, 4) int32 numpy rows (batch, z, y, x), in any order, unique, inside
    the grid. int64 (or any other) indices are refused, not converted: convert them with .astype(numpy.int32).

    `indice_dict` maps an `indice_key` to the rulebook built under it; the tensors a layer returns share their
    input's dict, so the layers of a network with the same key share one rulebook.
    """

    def __init__(self, features, indices, spatial_shape, batch_size):
        self.spatial_shape = _triple("spatial_shape", spatial_shape, 1)
        if not _is_int(batch_size):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        d, h, w = self.spatial_shape
        if self.batch_size * d * h * w >= KEY_LIMIT:
            raise ValueError(f"batch_size * D * H * W must be below 2**62, got {batch_size} x {self.spatial_shape}")
        if not isinstance(indices, np.ndarray):
            raise TypeError(f"indices must be a numpy.ndarray of int32, got {type(indices).__name__}")
        if indices.dtype != np.int32:
            raise ValueError(f"indices must be int32, got {indices.dtype}; convert them with .astype(numpy.int32)")
        if indices.ndim != 2 or indices.shape[1] != 4:
            raise ValueError(f"indices must have shape (N, 4) as (batch, z, y, x), got {indices.shape}")
        check_float32("features", features)
        if len(features.shape) != 2 or features.shape[0] != indices.shape[0] or features.shape[1] < 1:
            raise ValueError(
                f"features must have shape (N, C) with N = {indices.shape[0]} rows of indices and C >= 1, "
                f"got {tuple(features.shape)}")
        indices = np.ascontiguousarray(indices)
        self._order = _check_sites(indices, self.spatial_shape, self.batch_size)
        self.features = features
        self._indices = indices
        self._host_indices = indices
        self.indice_dict: dict[str, Rulebook] = {}
        self._site_ordered: SparseTensor | None = None if self._order is not None else self

    @classmethod
    def _from_layer(cls, features, indices, spatial_shape, batch_size, indice_dict) -> "SparseTensor":
        """A layer's output: sites sorted and valid by construction; indices numpy or a device array."""
        t = cls.__new__(cls)
        t.features, t._indices, t.spatial_shape, t.batch_size = features, indices, spatial_shape, batch_size
        t._host_indices = indices if isinstance(indices, np.ndarray) else None
        t._order, t.indice_dict, t._site_ordered = None, indice_dict, t
        return t

    @classmethod
    def from_dense(cls, x) -> "SparseTensor":
        """The sites of x (B, C, D, H, W) float32 where some channel is nonzero, in site order."""
        check_float32("x", x)
        if not isinstance(x, np.ndarray) or x.ndim != 5:
            raise ValueError(f"x must be a 5-D numpy array (B, C, D, H, W), got {type(x).__name__} "
                             f"of shape {getattr(x, 'shape', None)}")
        active = np.any(x != 0, axis=1)
        indices = np.argwhere(active).astype(np.int32)
        features = np.ascontiguousarray(np.moveaxis(x, 1, -1)[active])
        return cls(features, indices, x.shape[2:], x.shape[0])

    @property
    def indices(self) -> np.ndarray:
        """(N, 4) int32 on the host (downloaded once when a device backend produced the tensor)."""
        if self._host_indices is None:
            self._host_indices = to_host(self._indices)
        return self._host_indices

    @property
    def num_sites(self) -> int:
        return int(self.features.shape[0])

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    def dense(self) -> np.ndarray:
        """(B, C, D, H, W) float32 on the host, zeros at inactive sites. For tests and small grids only."""
        out = np.zeros((self.batch_size, self.channels, *self.spatial_shape), np.float32)
        b, z, y, x = self.indices.T
        out[b, :, z, y, x] = to_host(self.features)
        return out

    def replace_feature(self, features) -> "SparseTensor":
        """The same sites (and rulebooks) with other features, e.g. after a batch norm or a residual sum."""
        check_float32("features", features)
        if len(features.shape) != 2 or features.shape[0] != self.num_sites or features.shape[1] < 1:
            raise ValueError(f"features must have shape ({self.num_sites}, C), got {tuple(features.shape)}")
        t = SparseTensor._from_layer(features, self._indices, self.spatial_shape, self.batch_size, self.indice_dict)
        t._host_indices, t._order = self._host_indices, self._order
        t._site_ordered = t if self._order is None else None
        return t

    def _in_site_order(self, take_rows) -> "SparseTensor":
        """This tensor with rows sorted by site; `take_rows(features, order)` gathers rows on the backend."""
        if self._site_ordered is None:
            order = self._order
            self._site_ordered = SparseTensor._from_layer(
                take_rows(self.features, order), np.ascontiguousarray(self._indices[order]), self.spatial_shape,
                self.batch_size, self.indice_dict)
        return self._site_ordered

    def __repr__(self) -> str:
        return (f"SparseTensor({self.num_sites} sites, {self.channels} channels, spatial_shape={self.spatial_shape}, "
                f"batch_size={self.batch_size})")


def _check_sites(indices: np.ndarray, spatial_shape, batch_size) -> np.ndarray | None:
    """Refuse sites outside the grid or the batch, and repeated sites; the permutation that sorts the rows
    by site, or None when they are sorted already."""
    if not len(indices):
        return None
    limits = np.array((batch_size, *spatial_shape), np.int64)
    bad = np.flatnonzero(((indices < 0) | (indices >= limits)).any(axis=1))
    if bad.size:
        row = int(bad[0])
        site = tuple(int(v) for v in indices[row])
        if site[0] < 0 or site[0] >= batch_size:
            raise ValueError(f"indices row {row} {site} has batch index {site[0]} outside 0..{batch_size - 1}")
        raise ValueError(f"indices row {row} {site} (batch, z, y, x) lies outside spatial_shape {tuple(spatial_shape)}")
    keys = linear_keys(indices, spatial_shape)
    steps = np.diff(keys)
    order = None
    if (steps < 0).any():
        order = np.argsort(keys, kind="stable").astype(np.int32)
        steps = np.diff(keys[order])
    repeated = np.flatnonzero(steps == 0)
    if repeated.size:
        first = int(repeated[0] + 1 if order is None else order[repeated[0] + 1])
        raise ValueError(f"indices row {first} repeats the site {tuple(int(v) for v in indices[first])}")
    return order


@dataclass(frozen=True)
class RulebookGeometry:
    """What a rulebook depends on besides the sites: the grids and the kernel's placement."""

    batch_size: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    subm: bool
    inverse: bool = False

    @property
    def kernel_volume(self) -> int:
        kd, kh, kw = self.kernel
        return kd * kh * kw

    def taps(self) -> np.ndarray:
        """(K, 3) int32 (i, j, l) of each tap in w's order: tap t = (i * kh + j) * kw + l."""
        return np.argwhere(np.ones(self.kernel, bool)).astype(np.int32)

    def swapped(self) -> "RulebookGeometry":
        """The inverse layer's: input and output grids exchanged."""
        return RulebookGeometry(self.batch_size, self.out_shape, self.in_shape, self.kernel, self.stride,
                                self.padding, self.dilation, self.subm, not self.inverse)

    def describe(self) -> str:
        kind = "submanifold" if self.subm else "regular"
        return (f"{kind}{' inverse' if self.inverse else ''}, kernel {self.kernel}, stride {self.stride}, padding "
                f"{self.padding}, dilation {self.dilation}, grid {self.in_shape} -> {self.out_shape}, batch "
                f"{self.batch_size}")


class Rulebook(ABC):
    """Which input row meets which output row through which tap: the one format of every backend.

    Canonical form (`pairs()`, host numpy): for tap t of K, the pairs in_rows[offsets[t]:offsets[t+1]] and
    out_rows[offsets[t]:offsets[t+1]] (int32), ascending in out_row and so in in_row; each row at most once per
    tap. Output site out_rows[p] reads input site in_rows[p] through tap t. `out_indices` (n_out, 4) int32 are
    sorted and unique. A backend keeps its own form on its device (a neighbour map, a hash table), as long as
    `pairs()` gives exactly this.
    """

    geometry: RulebookGeometry
    backend: str
    device: int
    n_in: int
    n_out: int
    in_indices: object  # the (sorted) sites it was built on: numpy or a device array
    out_indices: object  # (n_out, 4) int32, numpy or a device array

    @abstractmethod
    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (K + 1,) int64, in_rows (P,) int32, out_rows (P,) int32) on the host."""

    @abstractmethod
    def swapped(self) -> "Rulebook":
        """The inverse layer's rulebook (input and output exchanged), built once and kept."""

    def built_on(self, t: SparseTensor) -> bool:
        return self.sites_match(t, self.in_indices)

    @staticmethod
    def sites_match(t: SparseTensor, indices) -> bool:
        """Whether t's sites are `indices`: the same array, or equal host arrays."""
        if t._indices is indices:
            return True
        if not isinstance(indices, np.ndarray) or t.num_sites != len(indices):
            return False
        return np.array_equal(t.indices, indices)


@dataclass(frozen=True)
class SparseConv3dSpec:
    """A sparse layer, normalised: w's shape, the kernel's placement, the epilogue. Sites come later."""

    out_channels: int
    in_channels: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    subm: bool
    inverse: bool
    activation: Activation
    has_bias: bool

    @classmethod
    def create(cls, w, b=None, *, stride=1, padding=0, dilation=1, subm=False, inverse=False,
               activation=None) -> "SparseConv3dSpec":
        check_float32("w", w)
        if len(w.shape) != 5:
            raise ValueError(f"w must be 5-D (out_channels, in_channels, kd, kh, kw), got shape {tuple(w.shape)}; "
                             "spconv's (O, kd, kh, kw, C) converts with w.transpose(0, 4, 1, 2, 3)")
        o, c, *kernel = (int(s) for s in w.shape)
        if min(o, c, *kernel) < 1:
            raise ValueError(f"w must have no empty dimension, got shape {tuple(w.shape)}")
        check_bias(b, o)
        stride, dilation = _triple("stride", stride, 1), _triple("dilation", dilation, 1)
        padding = _triple("padding", padding, 0)
        if subm:
            if any(k % 2 == 0 for k in kernel):
                raise ValueError(f"a submanifold layer needs an odd kernel, got {tuple(kernel)}")
            if stride != (1, 1, 1):
                raise ValueError(f"a submanifold layer has stride 1, got stride={stride}")
            centred = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            if padding not in ((0, 0, 0), centred):
                raise ValueError(f"a submanifold layer is centred: padding must be 0 or dilation * (k - 1) / 2 = "
                                 f"{centred}, got padding={padding}")
            padding = centred
        return cls(out_channels=o, in_channels=c, kernel=tuple(kernel), stride=stride, padding=padding,
                   dilation=dilation, subm=bool(subm), inverse=bool(inverse), activation=Activation.parse(activation),
                   has_bias=b is not None)

    def output_shape(self, in_shape) -> tuple[int, int, int]:
        if self.subm:
            return tuple(in_shape)
        out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(
            in_shape, self.kernel, self.stride, self.padding, self.dilation))
        if min(out) < 1:
            raise ValueError(f"output grid {out} is empty for spatial_shape {tuple(in_shape)}, kernel {self.kernel}, "
                             f"stride {self.stride}, padding {self.padding} and dilation {self.dilation}")
        return out

    def rules(self, t: SparseTensor) -> RulebookGeometry:
        """The rulebook geometry of a regular or submanifold layer on t."""
        return RulebookGeometry(t.batch_size, t.spatial_shape, self.output_shape(t.spatial_shape), self.kernel,
                                self.stride, self.padding, self.dilation, self.subm)

    def check_input(self, t: SparseTensor) -> None:
        if not isinstance(t, SparseTensor):
            raise TypeError(f"the input must be a SparseTensor, got {type(t).__name__}")
        if t.channels != self.in_channels:
            raise ValueError(f"the input has {t.channels} channels but w expects {self.in_channels} "
                             "(w is (out_channels, in_channels, kd, kh, kw))")


@dataclass(frozen=True)
class SparseConv3dGeometry:
    """One resolved call: the rulebook's geometry and the sizes the compute needs."""

    rules: RulebookGeometry
    n_in: int
    n_out: int
    c: int
    o: int


class _SparseLayer(Layer):
    """What the regular, submanifold and inverse layers share: the rulebook cache and the call."""

    op = "sparse_conv3d"

    def __init__(self, spec: SparseConv3dSpec, w, b, indice_key, backend, device):
        if indice_key is not None and not isinstance(indice_key, str):
            raise TypeError(f"indice_key must be a str or None, got {indice_key!r}")
        self.indice_key = indice_key
        self._prepared = None
        self._prepare(spec, backend, device, host_array("w", w), None if b is None else host_array("b", b))

    def _features(self, t: SparseTensor):
        """(t's features as the backend takes them, the function giving a result back in their kind)."""
        return self._input("features", t.features)

    def _cached(self, t: SparseTensor, rules: RulebookGeometry) -> Rulebook | None:
        """The rulebook kept under this layer's key, checked against this layer and t."""
        if self.indice_key is None or self.indice_key not in t.indice_dict:
            return None
        found = t.indice_dict[self.indice_key]
        if found.geometry != rules:
            raise ValueError(f"indice_key {self.indice_key!r} holds the rulebook of a layer with "
                             f"{found.geometry.describe()}; this layer has {rules.describe()}")
        self._check_owner(found)
        if not found.built_on(t):
            raise ValueError(f"indice_key {self.indice_key!r} holds a rulebook built on other sites than this "
                             f"input's ({found.n_in} sites; the input has {t.num_sites})")
        return found

    def _check_owner(self, rulebook: Rulebook) -> None:
        if (rulebook.backend, rulebook.device) != (self.backend.name, self.device.index):
            raise ValueError(f"indice_key {self.indice_key!r} holds a rulebook of {rulebook.backend}:"
                             f"{rulebook.device}; this layer runs on {self.backend.name}:{self.device.index}")

    def _take_rows(self, features, order):
        features, restore = self._input("features", features)
        return restore(self._prepared.take_rows(features, order))

    def _call(self, t: SparseTensor, timed: bool):
        rulebook = self.rulebook(t)  # the subclass's: built or kept (regular, SubM), or swapped (inverse)
        t = t._in_site_order(self._take_rows)
        geom = SparseConv3dGeometry(rulebook.geometry, rulebook.n_in, rulebook.n_out, self.spec.in_channels,
                                    self.spec.out_channels)
        features, restore = self._features(t)
        if timed:
            y, seconds = self._prepared.profile(features, rulebook, geom)
        else:
            y, seconds = self._prepared.run(features, rulebook, geom), None
        out = SparseTensor._from_layer(restore(y), rulebook.out_indices, rulebook.geometry.out_shape, t.batch_size,
                                       t.indice_dict)
        return out, seconds

    def __call__(self, t: SparseTensor) -> SparseTensor:
        return self._call(t, False)[0]

    def profile(self, t: SparseTensor):
        """Run once: (output, device seconds of the compute or None); the rulebook is built first, untimed."""
        return self._call(t, True)


class SparseConv3d(_SparseLayer):
    """A prepared regular (`subm=False`) or submanifold (`subm=True`) sparse 3-D convolution, called as
    `layer(t)` on a SparseTensor. Layers with the same `indice_key` share one rulebook (cached on the tensors)."""

    def __init__(self, w, b=None, *, stride=1, padding=0, dilation=1, subm=False, activation=None, indice_key=None,
                 backend="numpy", device=None):
        spec = SparseConv3dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, subm=subm,
                                       activation=activation)
        super().__init__(spec, w, b, indice_key, backend, device)

    def rulebook(self, t: SparseTensor) -> Rulebook:
        """The rulebook of this layer on t: the one kept under its key, else one built now (and kept)."""
        self.spec.check_input(t)
        if self._prepared is None:
            raise ValueError("this SparseConv3d is closed")
        rules = self.spec.rules(t)
        t = t._in_site_order(self._take_rows)
        found = self._cached(t, rules)
        if found is None:
            found = self._prepared.rulebook(t._indices, rules)
            if self.indice_key is not None:
                t.indice_dict[self.indice_key] = found
        return found

    def __repr__(self) -> str:
        s = self.spec
        return (f"SparseConv3d({s.in_channels}, {s.out_channels}, kernel={s.kernel}, stride={s.stride}, "
                f"padding={s.padding}, dilation={s.dilation}, subm={s.subm}, activation={s.activation.kind}, "
                f"indice_key={self.indice_key!r}, device={self.device})")


class SparseInverseConv3d(_SparseLayer):
    """The inverse of the regular SparseConv3d that ran under `indice_key`: its rulebook swapped, so the output
    sites are that layer's input sites (a U-Net decoder's upsampling). w is (O, C, kd, kh, kw) with the kernel
    of that layer and C its output channels' count here (the channels of this layer's input)."""

    def __init__(self, w, b=None, *, indice_key, activation=None, backend="numpy", device=None):
        if not isinstance(indice_key, str):
            raise TypeError(f"SparseInverseConv3d needs the indice_key (a str) of a regular layer, got {indice_key!r}")
        spec = SparseConv3dSpec.create(w, b, inverse=True, activation=activation)
        super().__init__(spec, w, b, indice_key, backend, device)

    def rulebook(self, t: SparseTensor) -> Rulebook:
        self.spec.check_input(t)
        if self._prepared is None:
            raise ValueError("this SparseInverseConv3d is closed")
        found = t.indice_dict.get(self.indice_key)
        if found is None:
            raise ValueError(f"indice_key {self.indice_key!r} names no rulebook of this tensor "
                             f"(keys: {sorted(t.indice_dict)}): run the regular layer with that key first")
        if found.geometry.subm or found.geometry.inverse:
            raise ValueError(f"SparseInverseConv3d needs the rulebook of a regular layer; indice_key "
                             f"{self.indice_key!r} holds one of a {found.geometry.describe()} layer")
        if found.geometry.kernel != self.spec.kernel:
            raise ValueError(f"w has kernel {self.spec.kernel} but the layer under indice_key {self.indice_key!r} "
                             f"has kernel {found.geometry.kernel}")
        self._check_owner(found)
        if not Rulebook.sites_match(t, found.out_indices):
            raise ValueError(f"the input's sites are not the output sites of the layer under indice_key "
                             f"{self.indice_key!r} ({found.n_out} sites; the input has {t.num_sites})")
        return found.swapped()

    def __repr__(self) -> str:
        s = self.spec
        return (f"SparseInverseConv3d({s.in_channels}, {s.out_channels}, kernel={s.kernel}, "
                f"indice_key={self.indice_key!r}, activation={s.activation.kind}, device={self.device})")


def sparse_conv3d(t: SparseTensor, w, b=None, *, stride=1, padding=0, dilation=1, subm=False, activation=None,
                  backend="numpy", device=None) -> SparseTensor:
    """One-shot sparse convolution (no indice_key: the rulebook is built for this call). The prepared weights are
    reused while w and b hold the same values, as `conv2d` does."""
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, subm=subm, activation=activation)
    spec = SparseConv3dSpec.create(w, b, **kwargs)
    spec.check_input(t)
    chosen = get_backend(backend)
    info = chosen.select(device)
    return ONE_SHOT.run(("sparse_conv3d", chosen.name, info.index, spec), (w, b),
                        lambda w, b: SparseConv3d(w, b, **kwargs, backend=chosen.name, device=info.index),
                        lambda layer: layer(t))
