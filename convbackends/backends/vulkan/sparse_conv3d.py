"""sparse_conv3d on Vulkan, as backends/kernel/sparse_conv3d.py on OpenCL and CUDA: the rulebook built on
the device by shaders/sparse_conv3d_rulebook.comp (the stages of kernels/sparse_conv3d_rulebook.h: binary
search for SubM, candidates + radix sort + unique for regular layers) and kept there as a neighbour map and,
for GPUs, as pair lists (backends/_sparse.py); the compute a gather-GEMM-scatter pass per tap over the pair
lists on GPUs (shaders/sparse_conv3d_gather_gemm.comp) and output-stationary over the map on CPU devices
(sparse_conv3d_cpu_gemm.comp). Features and sites are numpy in and out; what a build reads back is the
regular layer's candidate and output counts, the pair lists' K + 1 offsets and, at its end, the output sites.
"""
from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass

import numpy as np

from ...ops.sparse_conv3d import RulebookGeometry, SparseConv3dGeometry, SparseConv3dSpec
from ...runtime import DeviceInfo
from ...runtime import vulkan as _vk
from ...runtime.kernels import DeviceLimits
from .. import Prepared
from .._sparse import NeighbourRulebook, RulebookForms, check_rows, geometry_table
from ..kernel.conv2d import choose_tiles
from .spirv import SPIRV

RULEBOOK = "sparse_conv3d_rulebook"
# The stages of sparse_conv3d_rulebook.comp (its STAGE constant).
(KEYS, FILL, SUBM_NEIGHBOURS, CANDIDATE_COUNTS, CANDIDATES, RADIX_COUNT, RADIX_SCATTER, SCAN_BLOCKS, SCAN_ADD,
 UNIQUE_FLAGS, UNIQUE_SITES, REGULAR_NEIGHBOURS, SWAP_NEIGHBOURS, COPY_TOTAL, PAIR_FLAGS, PAIR_LISTS,
 TAP_OFFSETS) = range(17)
_RULEBOOK_BINDINGS = (_vk.STORAGE,) * 6
_RULEBOOK_PUSH = struct.Struct("<26i")  # geo[18], field_bits[3], n, a, b, c, d
# x, nbr, w as vec4, bias, y: the bindings of sparse_conv3d_cpu_gemm.comp.
_CPU_BINDINGS = (_vk.TEXEL_FLOAT, _vk.STORAGE, _vk.TEXEL_VEC4, _vk.TEXEL_FLOAT, _vk.STORAGE)
_CPU_PUSH = struct.Struct("<5i2f")  # N_OUT, C, O, TAPS, OGPAD, ALPHA, BETA
# x, in_rows, out_rows, w, bias, y: the bindings of sparse_conv3d_gather_gemm.comp.
_GPU_BINDINGS = (_vk.TEXEL_FLOAT, _vk.STORAGE, _vk.STORAGE, _vk.TEXEL_FLOAT, _vk.TEXEL_FLOAT, _vk.STORAGE)
_GPU_PUSH = struct.Struct("<8i2f")  # FIRST, COUNT, TAP, C, O, CPAD, OGPAD, TOTAL, ALPHA, BETA
LINEAR_LOCAL = 64
# Direct path: vec4s of output channels per invocation (llvmpipe keeps them in registers).
DIRECT_MAX_VEC4 = 4


@dataclass(frozen=True)
class SortPlan:
    """As backends/kernel/sparse_conv3d.py's: CPU devices take few invocations with long runs of keys (8-bit
    digits), GPUs an invocation per 32 keys (4-bit digits) and scans in groups of 256."""

    radix_bits: int
    keys_per_item: int
    items: int
    radix_local: int
    scan_local: int
    scan_per_item: int
    search_run: int

    @classmethod
    def for_device(cls, dev: _vk.Device) -> "SortPlan":
        if dev.type == "cpu":
            return cls(8, 0, 64, 1, 1, 16384, 32)
        local = min(256, dev.limits.maxComputeWorkGroupInvocations, dev.limits.maxComputeWorkGroupSize[0])
        return cls(4, 32, 0, min(64, local), local, 4, 4)

    def items_for(self, n: int) -> tuple[int, int]:
        if self.keys_per_item:
            return math.ceil(n / self.keys_per_item), self.keys_per_item
        items = min(self.items, max(1, math.ceil(n / 4096)))
        return items, math.ceil(n / items)


def field_bits(shape) -> tuple[int, int, int]:
    """Bits of the z, y and x fields of a grid's packed keys."""
    return tuple(max(0, (n - 1).bit_length()) for n in shape)


def key_bits(batch: int, shape) -> int:
    return max(1, (batch - 1).bit_length() + sum(field_bits(shape)))


class _Build:
    """One rulebook build: the dispatches recorded so far, the buffers it made, submission and reads."""

    def __init__(self, builder: "RulebookBuilder"):
        self.builder, self.dev = builder, builder.dev
        self.dispatches: list[_vk.Dispatch] = []
        self.made: list[_vk.Buffer] = []

    def buffer(self, nbytes: int) -> _vk.Buffer:
        """A device buffer (mapped host memory where that is the device's)."""
        return self.buffer_on(nbytes, self.dev.unified)

    def buffer_on(self, nbytes: int, host: bool) -> _vk.Buffer:
        buf = self.dev.acquire(max(4, nbytes), host)
        self.made.append(buf)
        return buf

    def upload(self, array: np.ndarray) -> _vk.Buffer:
        buf = _vk.upload(self.dev, array)
        self.made.append(buf)
        return buf

    def stage(self, stage: int, buffers: list, groups: int, *, wide=False, geo=None, bits=(0, 0, 0), n=0, a=0, b=0,
              c=0, d=0, local=LINEAR_LOCAL) -> None:
        pipeline = self.builder.pipeline(stage, wide, local)
        buffers = buffers + [self.builder.dummy] * (6 - len(buffers))
        geo = self.builder.no_geometry if geo is None else geo
        push = _RULEBOOK_PUSH.pack(*geo, *bits, n, a, b, c, d)
        self.dispatches.append(_vk.Dispatch(pipeline, buffers, push, (max(1, groups), 1, 1)))

    def linear(self, stage: int, buffers: list, count: int, **kwargs) -> None:
        self.stage(stage, buffers, math.ceil(count / LINEAR_LOCAL), **kwargs)

    def fill(self, buf: _vk.Buffer, count: int, value: int) -> None:
        self.linear(FILL, [buf], count, n=count, a=value)

    def scan(self, values: _vk.Buffer, n: int) -> _vk.Buffer:
        """The exclusive prefix sums of n values, n + 1 of them, the total last."""
        plan = self.builder.plan
        out = self.buffer(4 * (n + 1))
        block = plan.scan_local * plan.scan_per_item
        blocks = math.ceil(n / block)
        sums = self.buffer(4 * blocks)
        self.stage(SCAN_BLOCKS, [values, out, sums], blocks, n=n, a=blocks, local=plan.scan_local)
        if blocks > 1:
            bases = self.scan(sums, blocks)
            self.linear(SCAN_ADD, [values, out, bases], n + 1, n=n, a=blocks, b=block)
        return out

    def total(self, scanned: _vk.Buffer, n: int) -> int:
        """Submit what is recorded, with a last dispatch copying scanned[n] out; that value."""
        self.stage(COPY_TOTAL, [scanned, self.builder.totals], 1, n=n, a=0)
        self.submit()
        return int(self.builder.totals.read(1).view(np.int32)[0])

    def submit(self, copies_in=(), copies_out=()) -> float | None:
        """Run the recorded dispatches (and copies); the device seconds where the device measures them."""
        if not self.dispatches and not copies_in and not copies_out:
            return None
        try:
            return _vk.Recording.once(self.dev, self.dispatches, copies_in, copies_out)
        finally:
            self.dispatches = []

    def read(self, buf: _vk.Buffer, count: int) -> np.ndarray:
        """count int32 of a buffer (this build's recorded work submitted first)."""
        self.submit()
        return read_ints(self.dev, buf, count)

    def keep(self, buf: _vk.Buffer) -> _vk.Buffer:
        self.made.remove(buf)
        return buf

    def release(self) -> None:
        for buf in self.made:
            self.dev.release(buf)
        self.made = []


def read_ints(dev: _vk.Device, buf: _vk.Buffer, count: int) -> np.ndarray:
    """count int32 from a buffer: mapped where it is host memory, else through a staging copy."""
    if not count:
        return np.zeros(0, np.int32)
    if buf.host:
        return buf.read(count).view(np.int32)
    staging = dev.acquire(buf.nbytes, host=True)
    try:
        _vk.Recording.once(dev, copies_out=[(staging, buf)])
        return staging.read(count).view(np.int32)
    finally:
        dev.release(staging)


class RulebookBuilder:
    """A device's rulebook stages, and the `ops` of its rulebooks' forms (backends/_sparse.py): one per
    device, kept with it (rulebooks outlive layers). Each build has its own buffers; a lock serialises
    regular builds for the one small buffer their totals come back through."""

    def __init__(self, dev: _vk.Device, index: int):
        self.dev, self.index = dev, index
        self.no_geometry = (0,) * 18
        self.dummy = dev.acquire(4, host=dev.unified)
        self.totals = dev.acquire(4, host=True)
        self._pipelines: dict[tuple, _vk.Pipeline] = {}
        self._lock = threading.Lock()  # guards _pipelines
        self._totals_lock = threading.Lock()

    @property
    def plan(self) -> SortPlan:
        return SortPlan.for_device(self.dev)

    def pipeline(self, stage: int, wide: bool, local: int) -> _vk.Pipeline:
        """A stage's pipeline, taken from the device once and kept while the builder (the device) lives: at most
        the stages x key widths x the plan's few work group sizes."""
        plan = self.plan
        constants = {0: local, 1: stage, 2: wide, 3: plan.radix_bits, 4: plan.scan_per_item, 5: plan.search_run}
        key = tuple(sorted(constants.items()))
        with self._lock:
            found = self._pipelines.get(key)
            if found is None:
                found = self._pipelines[key] = self.dev.pipeline(RULEBOOK, SPIRV[RULEBOOK], constants,
                                                                  _RULEBOOK_BINDINGS, _RULEBOOK_PUSH.size)
            return found

    def _check(self, name: str, nbytes: int) -> None:
        limit = self.dev.limits.maxStorageBufferRange
        if nbytes > limit:
            raise ValueError(f"vulkan: the rulebook's {name} needs {nbytes} bytes, more than the device's "
                             f"maxStorageBufferRange ({limit} bytes)")

    def build(self, indices: np.ndarray, rules: RulebookGeometry) -> NeighbourRulebook:
        n, taps = len(indices), rules.kernel_volume
        check_rows("vulkan", n, taps)
        grid = rules.in_shape if rules.subm else rules.out_shape
        bits = key_bits(rules.batch_size, grid)
        if bits > 64:
            raise ValueError(f"vulkan: the grid {grid} x batch {rules.batch_size} needs {bits}-bit site keys; the "
                             "shaders pack keys in 64 bits (the OpenCL and CUDA backends take any grid)")
        self._check("neighbour map", 4 * n * taps)
        build = _Build(self)
        try:
            if n == 0:
                out_indices, nbr = indices if rules.subm else np.zeros((0, 4), np.int32), build.buffer(4)
            elif rules.subm:
                out_indices, nbr = indices, self._submanifold(build, indices, rules, bits > 32)
            else:
                with self._totals_lock:  # its totals come back through self.totals
                    out_indices, nbr = self._regular(build, indices, rules, bits > 32)
            forms = RulebookForms(self, taps, len(out_indices), n, neighbours=build.keep(nbr))
        finally:
            build.release()
        if self.dev.type != "cpu":  # what GPUs compute over: made now, as part of the build
            forms.pair_lists()
        return NeighbourRulebook(rules, indices, out_indices, n, len(out_indices), forms, "vulkan", self.index)

    def _submanifold(self, build: _Build, indices: np.ndarray, rules: RulebookGeometry, wide: bool) -> _vk.Buffer:
        n, taps = len(indices), rules.kernel_volume
        geo, bits = tuple(geometry_table(rules)), field_bits(rules.in_shape)
        sites = build.upload(indices)
        keys = build.buffer((8 if wide else 4) * n)
        build.linear(KEYS, [sites, keys], n, wide=wide, geo=geo, bits=bits, n=n)
        nbr = build.buffer(4 * n * taps)
        build.fill(nbr, n * taps, -1)
        rows = taps // 2 // rules.kernel[2] + 1  # tap rows (i, j) up to the centre's
        runs = math.ceil(n / self.plan.search_run)
        build.linear(SUBM_NEIGHBOURS, [sites, keys, nbr], runs * rows, wide=wide, geo=geo, bits=bits, n=n, a=rows)
        build.submit()
        return nbr

    def _regular(self, build: _Build, indices: np.ndarray, rules: RulebookGeometry, wide: bool):
        n, taps, plan = len(indices), rules.kernel_volume, self.plan
        geo, bits = tuple(geometry_table(rules)), field_bits(rules.out_shape)
        key_bytes = 8 if wide else 4
        sites = build.upload(indices)
        counts = build.buffer(4 * n)
        build.linear(CANDIDATE_COUNTS, [sites, counts], n, geo=geo, n=n)
        offsets = build.scan(counts, n)
        pairs = build.total(offsets, n)
        if pairs == 0:
            return np.zeros((0, 4), np.int32), build.buffer(4)
        self._check("candidate keys", key_bytes * pairs)
        keys, values = build.buffer(key_bytes * pairs), build.buffer(4 * pairs)
        build.linear(CANDIDATES, [sites, offsets, keys, values], n, wide=wide, geo=geo, bits=bits, n=n)
        items, chunk = plan.items_for(pairs)
        spare_keys, spare_values = build.buffer(key_bytes * pairs), build.buffer(4 * pairs)
        radix_counts = build.buffer(4 * (items << plan.radix_bits))
        radix_groups = math.ceil(items / plan.radix_local)
        for shift in range(0, key_bits(rules.batch_size, rules.out_shape), plan.radix_bits):
            build.stage(RADIX_COUNT, [keys, values, radix_counts], radix_groups, wide=wide, n=pairs, a=chunk, b=items,
                        c=shift, local=plan.radix_local)
            radix_offsets = build.scan(radix_counts, items << plan.radix_bits)
            build.stage(RADIX_SCATTER, [keys, values, radix_offsets, spare_keys, spare_values], radix_groups,
                        wide=wide, n=pairs, a=chunk, b=items, c=shift, local=plan.radix_local)
            keys, values, spare_keys, spare_values = spare_keys, spare_values, keys, values
        flags = build.buffer(4 * pairs)
        build.linear(UNIQUE_FLAGS, [keys, flags], pairs, wide=wide, n=pairs)
        ranks = build.scan(flags, pairs)
        n_out = build.total(ranks, pairs)
        check_rows("vulkan", n_out, taps)
        self._check("neighbour map", 4 * n_out * taps)
        sites_out = build.buffer(16 * n_out)
        build.linear(UNIQUE_SITES, [keys, flags, ranks, sites_out], pairs, wide=wide, bits=bits, n=pairs)
        nbr = build.buffer(4 * n_out * taps)
        build.fill(nbr, n_out * taps, -1)
        build.linear(REGULAR_NEIGHBOURS, [values, flags, ranks, nbr], pairs, n=pairs, a=taps)
        return build.read(sites_out, 4 * n_out).reshape(n_out, 4), nbr

    # -- the ops of RulebookForms ----------------------------------------------------------------------------
    def read_ints(self, buf: _vk.Buffer, count: int) -> np.ndarray:
        return read_ints(self.dev, buf, count)

    def release(self, buffers) -> None:
        """Give a collected rulebook's buffers back (at the next submission if the collector ran inside the
        device's lock)."""
        def give_back() -> None:
            for buf in buffers:
                self.dev.release(buf)
        self.dev.release_soon(give_back)

    def transpose(self, nbr: _vk.Buffer, n_out: int, n_in: int, taps: int) -> _vk.Buffer:
        """The inverse layer's neighbour map (n_in, taps) from a regular layer's (n_out, taps)."""
        build = _Build(self)
        try:
            inv = build.buffer(4 * n_in * taps)
            if n_in:
                build.fill(inv, n_in * taps, -1)
            if n_out:
                build.linear(SWAP_NEIGHBOURS, [nbr, inv], n_out * taps, n=n_out, a=taps)
            build.submit()
            return build.keep(inv)
        finally:
            build.release()

    def pair_lists(self, nbr: _vk.Buffer, n_out: int, taps: int):
        """(offsets (K + 1,) int64 host, in_rows, out_rows) of a neighbour map: the canonical pairs."""
        build = _Build(self)
        try:
            if n_out == 0:
                return np.zeros(taps + 1, np.int64), build.keep(build.buffer(4)), build.keep(build.buffer(4))
            total = n_out * taps
            flags = build.buffer(4 * total)
            build.linear(PAIR_FLAGS, [nbr, flags], total, n=n_out, a=taps)
            positions = build.scan(flags, total)
            offsets = build.buffer(4 * (taps + 1))
            build.linear(TAP_OFFSETS, [build.builder.dummy, build.builder.dummy, positions, offsets], taps + 1,
                         n=n_out, a=taps)
            offsets = build.read(offsets, taps + 1).astype(np.int64)
            count = int(offsets[-1])
            in_rows, out_rows = build.buffer(4 * count), build.buffer(4 * count)
            if count:
                build.linear(PAIR_LISTS, [nbr, flags, positions, in_rows, out_rows], total, n=n_out, a=taps)
                build.submit()
            return offsets, build.keep(in_rows), build.keep(out_rows)
        finally:
            build.release()


_builders: dict[int, RulebookBuilder] = {}
_builders_lock = threading.Lock()


def builder(index: int) -> RulebookBuilder:
    """The rulebook builder of Vulkan device `index`, made on first use."""
    with _builders_lock:
        found = _builders.get(index)
        dev = _vk.device(index)
        if found is None or found.dev is not dev:  # a device made anew after a shutdown
            found = _builders[index] = RulebookBuilder(dev, index)
        return found


@dataclass(frozen=True)
class Tiles:
    """The compute's work group (lx, ly), and: on GPUs (gather), tm channels x tn pairs, wm x wn per
    invocation, bk deep; on CPU devices, cb vec4s of channels per invocation."""

    lx: int
    ly: int
    gather: bool
    tm: int = 1
    tn: int = 1
    bk: int = 1
    wm: int = 1
    wn: int = 1
    cb: int = 1


def choose_compute_tiles(dev: _vk.Device, o: int) -> Tiles:
    """CPU devices: a subgroup of rows per work group. GPUs: the GEMM tiles of backends/kernel/conv2d.py
    that fit the device's work group and shared memory."""
    limits = dev.limits
    threads = min(limits.maxComputeWorkGroupInvocations, limits.maxComputeWorkGroupSize[0])
    if dev.type == "cpu":
        return Tiles(max(1, min(dev.subgroup_size, threads)), 1, False, cb=min(DIRECT_MAX_VEC4, math.ceil(o / 4)))
    gemm = choose_tiles(o, DeviceLimits("gpu", threads, limits.maxComputeSharedMemorySize))
    lx, ly, _ = gemm.local_size
    return Tiles(lx, ly, True, gemm.tm, gemm.tn, gemm.tk, gemm.wm, gemm.wn)


class VulkanSparseConv3d(Prepared):
    """A sparse layer on one Vulkan device: packed weights and the compute pipelines; the device's rulebook
    builder. Each call records and submits its own command buffer with its own buffers."""

    def __init__(self, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device, self.spec = device, spec
        dev = self.dev = _vk.device(device.index)
        self.builder = builder(device.index)
        held = _vk.Holdings(dev)
        self._finalizer = held.released_with(self)
        try:
            self._make(held, spec, w, b)
        except BaseException:
            self._finalizer()
            raise

    def _make(self, held: _vk.Holdings, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None) -> None:
        dev, o, c = self.dev, spec.out_channels, spec.in_channels
        self.taps = taps = math.prod(spec.kernel)
        t = self.tiles = choose_compute_tiles(dev, o)
        per_tap = w.reshape(o, c, taps).transpose(2, 1, 0)  # (K, C, O)
        act = spec.activation
        epilogue = {8: act.code}
        self.activation_parameters = (act.alpha, act.beta)
        if t.gather:
            self.cpad, self.ogpad = math.ceil(c / t.bk) * t.bk, math.ceil(o / t.tm) * t.tm
            packed = np.zeros((taps, self.cpad, self.ogpad), np.float32)
            packed[:, :c, :o] = per_tap
            tiles = {0: t.lx, 1: t.ly, 3: t.tm, 4: t.tn, 5: t.bk, 6: t.wm, 7: t.wn, **epilogue}
            name = "sparse_conv3d_gather_gemm"
            self.pipeline = held.pipeline(name, SPIRV[name], {**tiles, 2: False}, _GPU_BINDINGS, _GPU_PUSH.size)
            self.epilogue = held.pipeline(name, SPIRV[name], {**epilogue, 0: LINEAR_LOCAL, 1: 1, 2: True},
                                          _GPU_BINDINGS, _GPU_PUSH.size)
        else:
            self.cpad, self.ogpad = c, math.ceil(o / (4 * t.cb)) * 4 * t.cb
            padded = np.zeros((taps, c, self.ogpad), np.float32)
            padded[:, :, :o] = per_tap
            packed = padded.reshape(taps, c, self.ogpad // 4, 4).transpose(0, 2, 1, 3)  # [K][OGPAD / 4][C][4]
            name = "sparse_conv3d_cpu_gemm"
            self.pipeline = held.pipeline(name, SPIRV[name], {0: t.lx, 1: t.cb, 2: act.code}, _CPU_BINDINGS,
                                          _CPU_PUSH.size)
        packed = np.ascontiguousarray(packed).reshape(-1)
        if packed.size > dev.limits.maxTexelBufferElements:
            raise ValueError(f"vulkan: the packed weights ({packed.size} floats) exceed the device's "
                             f"maxTexelBufferElements ({dev.limits.maxTexelBufferElements})")
        self.w = held.upload(packed)
        self.b = held.upload(b if b is not None else np.zeros(o, np.float32))

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("this Vulkan layer is closed")

    def rulebook(self, indices, rules: RulebookGeometry) -> NeighbourRulebook:
        self._check_open()
        return self.builder.build(np.ascontiguousarray(indices), rules)

    def _check_sizes(self, geom: SparseConv3dGeometry) -> None:
        limits = self.dev.limits
        if geom.n_in * geom.c > limits.maxTexelBufferElements:
            raise ValueError(f"vulkan: the input features ({geom.n_in} x {geom.c} floats) exceed the device's "
                             f"maxTexelBufferElements ({limits.maxTexelBufferElements})")
        if 4 * geom.n_out * geom.o > limits.maxStorageBufferRange:
            raise ValueError(f"vulkan: the output features ({4 * geom.n_out * geom.o} bytes) exceed the device's "
                             f"maxStorageBufferRange ({limits.maxStorageBufferRange} bytes)")

    def _dispatch(self, build: _Build, x: _vk.Buffer, y: _vk.Buffer, rulebook: NeighbourRulebook,
                  geom: SparseConv3dGeometry) -> None:
        t = self.tiles
        if not t.gather:
            push = _CPU_PUSH.pack(geom.n_out, geom.c, geom.o, self.taps, self.ogpad, *self.activation_parameters)
            build.dispatches.append(_vk.Dispatch(self.pipeline, [x, rulebook.forms.neighbours(), self.w, self.b, y],
                                                 push, (math.ceil(geom.n_out / t.lx), self.ogpad // (4 * t.cb), 1)))
            return
        offsets, in_rows, out_rows = rulebook.forms.pair_lists()
        total = geom.n_out * geom.o
        build.fill(y, total, 0)  # 0.0
        buffers = [x, in_rows, out_rows, self.w, self.b, y]
        for tap in range(self.taps):
            first, count = int(offsets[tap]), int(offsets[tap + 1] - offsets[tap])
            if count:
                push = _GPU_PUSH.pack(first, count, tap, geom.c, geom.o, self.cpad, self.ogpad, total,
                                      *self.activation_parameters)
                build.dispatches.append(_vk.Dispatch(self.pipeline, buffers, push,
                                                     (math.ceil(count / t.tn), self.ogpad // t.tm, 1)))
        push = _GPU_PUSH.pack(0, 0, 0, geom.c, geom.o, self.cpad, self.ogpad, total, *self.activation_parameters)
        build.dispatches.append(_vk.Dispatch(self.epilogue, buffers, push, (math.ceil(total / LINEAR_LOCAL), 1, 1)))

    def profile(self, features, rulebook: NeighbourRulebook, geom: SparseConv3dGeometry):
        self._check_open()
        self._check_sizes(geom)
        y = np.empty((geom.n_out, geom.o), np.float32)
        if not geom.n_out:
            return y, None
        dev, build = self.dev, _Build(self.builder)
        copies_in, copies_out = [], []
        try:
            x_dev = self.w  # an empty input is never read (every neighbour is -1): any buffer stands in
            if geom.n_in:
                x_host, x_dev = _vk.staged(build.buffer_on, dev, features.nbytes, copies_in)
                x_host.write(np.ascontiguousarray(features))
            y_host, y_dev = _vk.staged(build.buffer_on, dev, y.nbytes, copies_out)
            self._dispatch(build, x_dev, y_dev, rulebook, geom)
            seconds = build.submit(copies_in, copies_out)
            y[...] = y_host.read(y.size).reshape(y.shape)
        finally:
            build.release()
        return y, seconds

    def run(self, features, rulebook, geom: SparseConv3dGeometry):
        return self.profile(features, rulebook, geom)[0]

    def take_rows(self, features, order: np.ndarray):
        return features[order]

    def close(self) -> None:
        self._finalizer()


def prepare(backend, spec: SparseConv3dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo) -> Prepared:
    return VulkanSparseConv3d(spec, w, b, device)
