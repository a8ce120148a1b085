"""sparse_conv3d on OpenCL and CUDA, from one kernel source: the rulebook built on the device
(kernels/sparse_conv3d_rulebook.h: binary search for SubM, candidates + radix sort + unique for regular
layers) and kept there as a neighbour map and, for GPUs, as pair lists (backends/_sparse.py); the compute a
gather-GEMM-scatter pass per tap over the pair lists on GPUs (kernels/sparse_conv3d_gather_gemm.h) and
output-stationary over the map on CPU devices (sparse_conv3d_cpu_gemm.h). Only scalars come back during a
build: the regular layer's candidate and output counts, and the pair lists' K + 1 offsets.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np

from ...ops.sparse_conv3d import RulebookGeometry, SparseConv3dGeometry, SparseConv3dSpec, to_host
from ...runtime.kernels import DeviceLimits, GeometryCache, KernelRuntime, Launch, i32, linear_launch, source
from .. import Prepared
from .._sparse import NeighbourRulebook, RulebookForms, check_rows, geometry_table, radix_shifts, wide_keys
from .conv2d import GemmTiles, choose_tiles


# The kernels of sparse_conv3d_rulebook.h.
RULEBOOK_KERNELS = ("sparse_keys", "sparse_fill", "sparse_subm_neighbours", "sparse_candidate_counts",
                    "sparse_candidates", "radix_count", "radix_scatter", "scan_blocks", "scan_add",
                    "sparse_unique_flags", "sparse_unique_sites", "sparse_regular_neighbours",
                    "sparse_swap_neighbours", "sparse_pair_flags", "sparse_pair_lists", "sparse_tap_offsets",
                    "sparse_gather_rows")


@dataclass(frozen=True)
class SortPlan:
    """How a device searches, sorts and scans. CPU devices: few work-items, each a long run of keys (8-bit
    digits, so few passes) or of sites to search (each search starting where the last one ended); GPUs: a
    work-item per 32 keys with 4-bit digits, scans in groups of 256, short search runs."""

    radix_bits: int
    keys_per_item: int  # 0: split the keys over `items` work-items
    items: int
    scan_local: int
    scan_per_item: int
    search_run: int

    @classmethod
    def for_device(cls, limits: DeviceLimits) -> "SortPlan":
        if limits.is_cpu:
            return cls(8, 0, 64, 1, 16384, 32)
        return cls(4, 32, 0, min(256, limits.max_threads), 4, 4)

    def items_for(self, n: int) -> tuple[int, int]:
        """(work-items, keys per work-item) of a radix pass over n keys."""
        if self.keys_per_item:
            return math.ceil(n / self.keys_per_item), self.keys_per_item
        items = min(self.items, max(1, math.ceil(n / 4096)))
        return items, math.ceil(n / items)

    def options(self, wide: bool, strides: tuple[int, int, int] | None = None) -> tuple[str, ...]:
        """The rulebook program's defines: key width, sort and scan shapes, and a regular layer's strides."""
        compiled = () if strides is None else tuple(f"-DSTRIDE_{a}={s}" for a, s in zip("DHW", strides))
        return (f"-DKEY_T={'int64' if wide else 'int'}", f"-DRADIX_BITS={self.radix_bits}",
                f"-DSCAN_LOCAL={self.scan_local}", f"-DSCAN_PER_ITEM={self.scan_per_item}",
                f"-DSEARCH_RUN={self.search_run}", *compiled)


class RulebookBuilder:
    """The rulebook kernels of one device, and the `ops` of its rulebooks' forms (backends/_sparse.py); every
    array a build makes is its own, so threads may share it."""

    def __init__(self, rt: KernelRuntime):
        self._rt = rt
        self.plan = SortPlan.for_device(rt.limits)
        self._source = source("sparse_conv3d_rulebook.h")
        self._tables = GeometryCache(lambda rules: rt.upload(geometry_table(rules)))

    def _launch(self, name: str, wide: bool, total: int, scalars: tuple, buffers: list, strides=None) -> None:
        kernel = self._rt.kernel(self._source, name, self.plan.options(wide, strides))
        self._rt.launch(kernel, linear_launch(total, scalars), buffers)

    def _int_array(self, shape):
        return self._rt.empty_array(shape, np.int32)

    def _check(self, name: str, nbytes: int) -> None:
        rt = self._rt
        if nbytes > rt.limits.max_alloc:
            raise ValueError(f"{rt.info.backend}: the rulebook's {name} needs {nbytes} bytes, more than the device's "
                             f"largest buffer ({rt.max_alloc_name}: {rt.limits.max_alloc} bytes)")

    def fill(self, array, count: int, value: int) -> None:
        self._launch("sparse_fill", False, count, (np.int32(value), np.int64(count)), [array])

    def scan(self, values, n: int):
        """The exclusive prefix sums of n int32 values as an int32 array of n + 1, the total last."""
        out = self._int_array((n + 1,))
        plan = self.plan
        block = plan.scan_local * plan.scan_per_item
        blocks = math.ceil(n / block)
        sums = self._int_array((blocks,))
        kernel = self._rt.kernel(self._source, "scan_blocks", plan.options(False))
        self._rt.launch(kernel, Launch((blocks * plan.scan_local, 1, 1), (plan.scan_local, 1, 1),
                                       i32(n, blocks)), [values, out, sums])
        if blocks > 1:
            bases = self.scan(sums, blocks)
            self._launch("scan_add", False, n + 1, i32(n, blocks), [out, bases])
        return out

    def total(self, scanned, n: int) -> int:
        return int(to_host(scanned[n:n + 1])[0])

    def sort(self, keys, values, n: int, wide: bool, shifts: list[int]):
        """(keys, values) of n pairs sorted by key, stably (in these buffers or spare ones)."""
        rt, dtype = self._rt, np.int64 if wide else np.int32
        items, chunk = self.plan.items_for(n)
        spare_keys, spare_values = rt.empty((n,), dtype), rt.empty((n,), np.int32)
        counts = rt.empty((items << self.plan.radix_bits,), np.int32)
        for shift in shifts:
            self._launch("radix_count", wide, items, i32(n, chunk, items, shift), [keys, counts])
            offsets = self.scan(counts, items << self.plan.radix_bits)
            self._launch("radix_scatter", wide, items, i32(n, chunk, items, shift),
                         [keys, values, offsets, spare_keys, spare_values])
            keys, values, spare_keys, spare_values = spare_keys, spare_values, keys, values
        return keys, values

    def build(self, indices, rules: RulebookGeometry, n: int, backend: str, device: int) -> NeighbourRulebook:
        rt, taps = self._rt, rules.kernel_volume
        check_rows(backend, n, taps)
        if n == 0:
            out_indices, nbr = indices if rules.subm else rt.empty_array((0, 4), np.int32), self._int_array((0, taps))
        else:
            sites = rt.upload(indices) if isinstance(indices, np.ndarray) else indices
            geo = self._tables.get(rules)
            if rules.subm:
                out_indices, nbr = indices, self._submanifold(sites, geo, rules, n)
            else:
                out_indices, nbr = self._regular(sites, geo, rules, n)
        n_out = len(out_indices)
        forms = RulebookForms(self, taps, n_out, n, neighbours=nbr)
        if not rt.limits.is_cpu:  # what GPUs compute over: made now, as part of the build
            forms.pair_lists()
        return NeighbourRulebook(rules, indices, out_indices, n, n_out, forms, backend, device)

    def _submanifold(self, sites, geo, rules: RulebookGeometry, n: int):
        taps, wide = rules.kernel_volume, wide_keys(rules.batch_size, rules.in_shape)
        self._check("neighbour map", 4 * n * taps)
        keys = self._rt.empty((n,), np.int64 if wide else np.int32)
        self._launch("sparse_keys", wide, n, i32(n), [sites, geo, keys])
        nbr = self._int_array((n, taps))
        self.fill(nbr, n * taps, -1)
        rows = taps // 2 // rules.kernel[2] + 1  # tap rows (i, j) up to the centre's
        runs = math.ceil(n / self.plan.search_run)
        self._launch("sparse_subm_neighbours", wide, runs * rows, i32(n, rows), [sites, keys, geo, nbr])
        return nbr

    def _regular(self, sites, geo, rules: RulebookGeometry, n: int):
        rt, taps = self._rt, rules.kernel_volume
        wide = wide_keys(rules.batch_size, rules.out_shape)
        dtype = np.int64 if wide else np.int32
        counts = rt.empty((n,), np.int32)
        self._launch("sparse_candidate_counts", wide, n, i32(n), [sites, geo, counts], rules.stride)
        offsets = self.scan(counts, n)
        pairs = self.total(offsets, n)
        if pairs == 0:
            return rt.empty_array((0, 4), np.int32), self._int_array((0, taps))
        self._check("candidate keys", dtype().itemsize * pairs)
        candidates, values = rt.empty((pairs,), dtype), rt.empty((pairs,), np.int32)
        self._launch("sparse_candidates", wide, n, i32(n), [sites, geo, offsets, candidates, values], rules.stride)
        shifts = radix_shifts(rules.batch_size, rules.out_shape, self.plan.radix_bits)
        candidates, values = self.sort(candidates, values, pairs, wide, shifts)
        flags = rt.empty((pairs,), np.int32)
        self._launch("sparse_unique_flags", wide, pairs, i32(pairs), [candidates, flags])
        ranks = self.scan(flags, pairs)
        n_out = self.total(ranks, pairs)
        check_rows(self._rt.info.backend, n_out, taps)
        self._check("neighbour map", 4 * n_out * taps)
        out_indices = self._int_array((n_out, 4))
        self._launch("sparse_unique_sites", wide, pairs, i32(pairs), [candidates, flags, ranks, geo, out_indices])
        nbr = self._int_array((n_out, taps))
        self.fill(nbr, n_out * taps, -1)
        self._launch("sparse_regular_neighbours", wide, pairs, i32(pairs, taps), [values, flags, ranks, nbr])
        return out_indices, nbr

    # -- the ops of RulebookForms ----------------------------------------------------------------------------
    @staticmethod
    def read_ints(array, count: int) -> np.ndarray:
        return to_host(array).reshape(-1)[:count] if count else np.zeros(0, np.int32)

    @staticmethod
    def release(arrays) -> None:
        """Device arrays free their memory when dropped."""

    def pair_lists(self, nbr, n_out: int, taps: int):
        """(offsets (K + 1,) int64 host, in_rows, out_rows) of a neighbour map: the canonical pairs."""
        if n_out == 0:
            empty = self._int_array((0,))
            return np.zeros(taps + 1, np.int64), empty, empty
        total = n_out * taps
        flags = self._rt.empty((total,), np.int32)
        self._launch("sparse_pair_flags", False, total, i32(n_out, taps), [nbr, flags])
        positions = self.scan(flags, total)
        offsets = self._int_array((taps + 1,))
        self._launch("sparse_tap_offsets", False, taps + 1, i32(n_out, taps), [positions, offsets])
        offsets = to_host(offsets).astype(np.int64)
        count = int(offsets[-1])
        in_rows, out_rows = self._int_array((count,)), self._int_array((count,))
        if count:
            self._launch("sparse_pair_lists", False, total, i32(n_out, taps), [nbr, flags, positions, in_rows,
                                                                               out_rows])
        return offsets, in_rows, out_rows

    def transpose(self, nbr, n_out: int, n_in: int, taps: int):
        """The inverse layer's neighbour map (n_in, taps) from a regular layer's (n_out, taps)."""
        inv = self._int_array((n_in, taps))
        if n_in:
            self.fill(inv, n_in * taps, -1)
        if n_out:
            self._launch("sparse_swap_neighbours", False, n_out * taps, i32(n_out, taps), [nbr, inv])
        return inv

    def gather_rows(self, features, order: np.ndarray):
        rt = self._rt
        n, c = len(order), features.shape[1]
        out = rt.empty_array((n, c))
        if n:
            self._launch("sparse_gather_rows", False, n * c, i32(n, c), [rt.device_input(features),
                                                                         rt.upload(order), out])
        return rt.returned(out)


# sparse_conv3d_cpu_gemm's work-groups: output rows per group, and 8-channel blocks per work-item (up to
# 64 channels in float8 accumulators).
CPU_ROWS_PER_GROUP = 16
CPU_MAX_BLOCKS = 8


class ComputePlan:
    """The compute of a layer on a device kind: its kernels, packed weights and launches. CPU devices:
    sparse_conv3d_cpu_gemm over the neighbour map, weights [K][ogpad / 8][C][8]. GPUs: a
    sparse_conv3d_gather_gemm pass per tap over the pair lists, then sparse_conv3d_epilogue, weights
    [K][cpad][ogpad] in gemm_tile.h's tiles."""

    def __init__(self, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, limits: DeviceLimits):
        o, c = spec.out_channels, spec.in_channels
        taps = math.prod(spec.kernel)
        per_tap = w.reshape(o, c, taps).transpose(2, 1, 0)  # (K, C, O)
        defines = {"ACTIVATION": spec.activation.code, "INDEX_T": limits.index_type}
        self.tiles: GemmTiles | None = None
        if limits.is_cpu:
            self.algorithm = "cpu_gemm"
            blocks = math.ceil(o / 8)
            self.blocks_per_item = min(blocks, CPU_MAX_BLOCKS)
            self.ogpad = math.ceil(blocks / self.blocks_per_item) * self.blocks_per_item * 8
            packed = np.zeros((taps, c, self.ogpad), np.float32)
            packed[:, :, :o] = per_tap
            # [K][ogpad / 8][C][8]: each work-item's slice of a tap is one run per 8-channel block.
            self.weights = np.ascontiguousarray(packed.reshape(taps, c, self.ogpad // 8, 8).transpose(0, 2, 1, 3))
            self.local = (min(CPU_ROWS_PER_GROUP, limits.max_threads), 1, 1)
            defines["OB"] = self.blocks_per_item
            files = ("sparse_conv3d_cpu_gemm.h",)
        else:
            self.algorithm = "gather_gemm"
            self.tiles = choose_tiles(o, limits)
            self.cpad = math.ceil(c / self.tiles.tk) * self.tiles.tk
            self.ogpad = math.ceil(o / self.tiles.tm) * self.tiles.tm
            packed = np.zeros((taps, self.cpad, self.ogpad), np.float32)
            packed[:, :c, :o] = per_tap
            self.weights = packed
            self.local = self.tiles.local_size
            defines.update(self.tiles.defines())
            files = ("gemm_tile.h", "sparse_conv3d_gather_gemm.h")
        self.kernel_name = f"sparse_conv3d_{self.algorithm}"
        self.source = source(*files)
        self.options = tuple(f"-D{name}={value}" for name, value in defines.items())
        self.bias = b.copy() if b is not None else np.zeros(o, np.float32)
        self.spec, self.taps = spec, taps
        act = spec.activation
        self.params = (np.float32(act.alpha), np.float32(act.beta))

    @property
    def threads(self) -> int:
        return math.prod(self.local)

    def launch(self, geom: SparseConv3dGeometry) -> Launch:
        """sparse_conv3d_cpu_gemm over every output row."""
        lx = self.local[0]
        blocks = self.ogpad // 8
        return Launch((math.ceil(geom.n_out / lx) * lx, blocks // self.blocks_per_item, 1), self.local,
                      i32(geom.n_out, geom.c, geom.o, self.taps, blocks) + self.params)

    def tap_launch(self, geom: SparseConv3dGeometry, tap: int, first: int, count: int) -> Launch:
        """sparse_conv3d_gather_gemm over one tap's `count` pairs from `first`."""
        t, (lx, ly, _) = self.tiles, self.local
        return Launch((math.ceil(count / t.tn) * lx, (self.ogpad // t.tm) * ly, 1), self.local,
                      i32(first, count, tap, geom.c, geom.o, self.cpad, self.ogpad))

    def epilogue_launch(self, geom: SparseConv3dGeometry) -> Launch:
        total = geom.n_out * geom.o
        return linear_launch(total, (np.int32(geom.o), np.int64(total)) + self.params)


def fit_plan(spec, w, b, limits: DeviceLimits, rt: KernelRuntime):
    """The plan and its built kernel; re-planned once when the kernel allows fewer work-items per group
    than the device (register pressure on GPUs)."""
    plan = ComputePlan(spec, w, b, limits)
    kernel = rt.kernel(plan.source, plan.kernel_name, plan.options)
    allowed = int(rt.max_threads(kernel))
    if plan.threads > allowed:
        plan = ComputePlan(spec, w, b, replace(limits, max_threads=allowed))
        kernel = rt.kernel(plan.source, plan.kernel_name, plan.options)
    return plan, kernel


class KernelSparsePrepared(Prepared):
    """A sparse layer on one device: its compute kernels and packed weights (read-only once made) and the
    device's rulebook kernels. Each call allocates its own buffers, so threads may share a layer."""

    def __init__(self, rt: KernelRuntime, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None):
        self.device, self.spec, self._rt = rt.info, spec, rt
        self.plan, self.kernel = fit_plan(spec, w, b, rt.limits, rt)
        self.epilogue = None
        if self.plan.tiles is not None:
            self.epilogue = rt.kernel(self.plan.source, "sparse_conv3d_epilogue", self.plan.options)
        if self.plan.weights.nbytes > rt.limits.max_alloc:
            raise ValueError(
                f"{self.device.backend}: the packed weights need {self.plan.weights.nbytes} bytes, more than the "
                f"device's largest buffer ({rt.max_alloc_name}: {rt.limits.max_alloc} bytes)")
        self.weights = rt.upload(self.plan.weights)
        self.bias = rt.upload(self.plan.bias)
        self.builder = RulebookBuilder(rt)

    def _check_open(self) -> None:
        if self.weights is None:
            raise ValueError("this layer is closed")

    def rulebook(self, indices, rules: RulebookGeometry) -> NeighbourRulebook:
        self._check_open()
        return self.builder.build(indices, rules, len(indices), self.device.backend, self.device.index)

    def _check_sizes(self, geom: SparseConv3dGeometry) -> None:
        rt = self._rt
        for name, nbytes in (("input features", 4 * geom.n_in * geom.c), ("output features", 4 * geom.n_out * geom.o)):
            if nbytes > rt.limits.max_alloc:
                raise ValueError(f"{self.device.backend}: the {name} need {nbytes} bytes, more than the device's "
                                 f"largest buffer ({rt.max_alloc_name}: {rt.limits.max_alloc} bytes)")

    def _launcher(self, rulebook: NeighbourRulebook, geom: SparseConv3dGeometry):
        """launch(x, y): the compute's launches into device buffers x and y, with the rulebook's form
        (made now if this is its first compute, so not inside the timed launches)."""
        rt, plan = self._rt, self.plan
        if plan.tiles is None:
            nbr = rulebook.forms.neighbours()

            def launch(x, y) -> None:
                # An empty input is never read (every neighbour is -1): any buffer stands in for it.
                x = self.weights if x is None or geom.n_in == 0 else x
                rt.launch(self.kernel, plan.launch(geom), [x, nbr, self.weights, self.bias, y])
            return launch
        offsets, in_rows, out_rows = rulebook.forms.pair_lists()

        def launch(x, y) -> None:
            self.builder.fill(y, geom.n_out * geom.o, 0)  # 0.0f
            for t in range(plan.taps):
                first, count = int(offsets[t]), int(offsets[t + 1] - offsets[t])
                if count:
                    rt.launch(self.kernel, plan.tap_launch(geom, t, first, count),
                              [x, in_rows, out_rows, self.weights, y])
            rt.launch(self.epilogue, plan.epilogue_launch(geom), [y, self.bias])
        return launch

    def _run(self, features, rulebook: NeighbourRulebook, geom: SparseConv3dGeometry, timed: bool):
        self._check_open()
        self._check_sizes(geom)
        rt = self._rt
        launch = self._launcher(rulebook, geom) if geom.n_out else None
        with rt.timer() if timed else contextlib.nullcontext([None]) as seconds:
            if isinstance(features, np.ndarray):
                y = np.empty((geom.n_out, geom.o), np.float32)
                if geom.n_out:
                    rt.run_host(features, y, launch)
            else:
                x, y = rt.device_input(features), rt.empty_array((geom.n_out, geom.o))
                if geom.n_out:
                    launch(x, y)
                y = rt.returned(y)
        return y, seconds[0]

    def run(self, features, rulebook, geom: SparseConv3dGeometry):
        return self._run(features, rulebook, geom, timed=False)[0]

    def profile(self, features, rulebook, geom: SparseConv3dGeometry):
        return self._run(features, rulebook, geom, timed=True)

    def take_rows(self, features, order: np.ndarray):
        if isinstance(features, np.ndarray):
            return features[order]
        self._check_open()
        return self.builder.gather_rows(features, order)

    def close(self) -> None:
        self.weights = self.bias = None


def prepare(backend, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, device) -> KernelSparsePrepared:
    return KernelSparsePrepared(backend.runtime(device), spec, w, b)
