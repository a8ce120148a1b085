"""conv2d on OpenCL and CUDA, from one kernel source: -D defines, tile choice, weight packing and launch
sizes. A `Plan` is everything about a layer that does not depend on the compute API; the runtime
(runtime/opencl.py or runtime/cuda.py, one `KernelRuntime` interface) compiles, uploads and launches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import numpy as np

from ...runtime.kernels import (CallBuffer, DeviceLimits, GeometryCache, KernelRuntime, Launch, i32 as _i32,
                                images_per_chunk, source as _source)
from ...spec import Conv2dGeometry, Conv2dSpec
from .. import Prepared, _winograd

KERNEL_NAMES = {
    "implicit_gemm": "conv2d_implicit_gemm",
    "gemm_1x1": "conv2d_gemm_1x1",
    "depthwise": "conv2d_depthwise",
    "cpu_gemm": "conv2d_cpu_gemm",
}

_SOURCE_FILES = {
    "implicit_gemm": ("gemm_tile.h", "conv2d_implicit_gemm.h"),
    "gemm_1x1": ("gemm_tile.h", "conv2d_gemm_1x1.h"),
    "depthwise": ("conv2d_depthwise.h",),
    "cpu_gemm": ("conv2d_cpu_gemm.h",),
    "winograd": ("conv2d_winograd.h",),
    "pad_input": ("pad_input.h",),
}


def source(program: str) -> str:
    """The full source of one of conv2d's programs, prelude first."""
    return _source(*_SOURCE_FILES[program])


# Work-group sizes of the one-element-per-work-item kernels: pad_input (columns x rows), the Winograd
# transforms (tiles).
PAD_LOCAL = (32, 8)
PAD_CPU_LOCAL = (1, 16)
WINOGRAD_LOCAL = 64
# Winograd F(4,3) for 3x3 stride-1 layers from this many channels on both sides and 4x4 tiles in the
# batch, by device kind. CPU (PoCL, measured): 1.7-4x faster from 128 channels (16 tiles and up),
# 0.94-1.2x at 64. GPU: conventional, not yet measured.
WINOGRAD_MIN_CHANNELS = {"cpu": 128, "gpu": 32}
WINOGRAD_MIN_TILES = {"cpu": 16, "gpu": 16}
# Its transformed input and products (V, M) are 36 / 16 times the input and output: a batch runs in
# parts that keep them under this size (and the device's largest buffer); where one image's do not
# fit, the geometry takes the direct kernels, which need no such copies.
WINOGRAD_MAX_BUFFER_BYTES = 1 << 30


@dataclass(frozen=True)
class GemmTiles:
    """A work-group computes tm x tn outputs, tk deep; each work-item a wm x wn register block and
    loads runs of ac (weights) and bc (input) contiguous elements into the local tiles."""

    tm: int
    tn: int
    tk: int
    wm: int
    wn: int
    ac: int = 1
    bc: int = 1

    @property
    def local_size(self) -> tuple[int, int, int]:
        return (self.tn // self.wn, self.tm // self.wm, 1)

    @property
    def threads(self) -> int:
        return (self.tm // self.wm) * (self.tn // self.wn)

    @property
    def local_bytes(self) -> int:
        return 4 * self.tk * (self.tm + self.tn)

    def is_valid(self) -> bool:
        """The kernel's loaders need every work-item to own whole rows of the A and B tiles."""
        nt = self.threads
        return self.tm % self.wm == 0 and self.tn % self.wn == 0 and all(
            size % run == 0 and nt % (size // run) == 0 and self.tk % (nt // (size // run)) == 0
            for size, run in ((self.tm, self.ac), (self.tn, self.bc))
        )

    def defines(self) -> dict[str, int]:
        return {"TM": self.tm, "TN": self.tn, "TK": self.tk, "WM": self.wm, "WN": self.wn, "AC": self.ac, "BC": self.bc}


# Largest first: 256 threads with 4x4..8x4 register blocks, tk = 16, loads coalesced (runs of 1).
# CPU devices do not use these tiles (see conv2d_cpu_gemm).
GPU_TILES = (
    GemmTiles(128, 64, 16, 8, 4),
    GemmTiles(64, 64, 16, 4, 4),
    GemmTiles(32, 64, 16, 2, 4),
    GemmTiles(16, 64, 16, 1, 4),
    GemmTiles(8, 16, 8, 2, 2),
)
# conv2d_cpu_gemm's work-group: 8-pixel blocks x 8-channel blocks (fewer when the group has fewer
# out-channels or the device allows fewer work-items).
CPU_PIXEL_BLOCKS = 8
CPU_CHANNEL_BLOCKS = 8
# Reductions longer than CPU_K_CHUNK_ABOVE run in passes of CPU_K_CHUNK taps (cache blocking).
CPU_K_CHUNK = 256
CPU_K_CHUNK_ABOVE = 1024
# Depthwise work-group (DW_LX x DW_LY output pixels), shrunk to the device's limit.
DEPTHWISE_LOCAL = (32, 8)
DEPTHWISE_CPU_LOCAL = (4, 8)
# Output pixels per depthwise work-item on CPU devices (float8 rows).
DEPTHWISE_CPU_VEC = 8


def choose_tiles(og: int, limits: DeviceLimits) -> GemmTiles:
    """The largest GPU tile that fits the device and whose height does not exceed the group's
    out-channels (or 16)."""
    fitting = [t for t in GPU_TILES if t.threads <= limits.max_threads and t.local_bytes <= limits.local_mem]
    if not fitting:
        raise RuntimeError(f"no GEMM tile fits a work-group of {limits.max_threads} items and {limits.local_mem} B")
    return next((t for t in fitting if t.tm <= max(og, 16)), fitting[-1])


def cpu_gemm_local(og: int, limits: DeviceLimits) -> tuple[int, int]:
    """conv2d_cpu_gemm's work-group: (pixel blocks, channel blocks)."""
    lx = min(CPU_PIXEL_BLOCKS, limits.max_threads)
    return lx, max(1, min(CPU_CHANNEL_BLOCKS, math.ceil(og / 8), limits.max_threads // lx))


def depthwise_local(limits: DeviceLimits) -> tuple[int, int]:
    lx, ly = DEPTHWISE_CPU_LOCAL if limits.is_cpu else DEPTHWISE_LOCAL
    while lx * ly > limits.max_threads and ly > 1:
        ly //= 2
    while lx * ly > limits.max_threads and lx > 1:
        lx //= 2
    return lx, ly


def _pack(w: np.ndarray, g: int, og: int, k: int, kpad: int, ogpad: int) -> np.ndarray:
    """Weights as [group][k][out-channel], zero padded to kpad x ogpad."""
    packed = np.zeros((g, kpad, ogpad), np.float32)
    packed[:, :k, :og] = w.reshape(g, og, k).transpose(0, 2, 1)
    return packed


class Plan:
    """A layer's program, defines, repacked weights and per-input launch, independent of the API.

    Buffer arguments are always (x or its padded copy, weights, bias[, ktab], y); bias is zeros when
    the layer has none, so one kernel signature serves both.
    """

    def __init__(self, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, limits: DeviceLimits):
        self.spec = spec
        # CPU devices run both GEMM forms as conv2d_cpu_gemm.
        cpu_gemm = limits.is_cpu and spec.algorithm != "depthwise"
        self.algorithm = "cpu_gemm" if cpu_gemm else spec.algorithm
        self.kernel_name = KERNEL_NAMES[self.algorithm]
        self.source = source(self.algorithm)
        g = spec.groups
        og = spec.out_channels // g
        defines = {"ACTIVATION": spec.activation.code, "INDEX_T": limits.index_type}
        if self.algorithm == "depthwise":
            self.tiles = None
            self.dw_local = depthwise_local(limits)
            self.dw_vec = DEPTHWISE_CPU_VEC if limits.is_cpu else 1
            defines.update(DW_VEC=self.dw_vec, KSIZE_H=spec.kh, KSIZE_W=spec.kw, STRIDE_H=spec.stride[0], STRIDE_W=spec.stride[1],
                           DIL_H=spec.dilation[0], DIL_W=spec.dilation[1], DW_LX=self.dw_local[0], DW_LY=self.dw_local[1])
            self.weights = np.ascontiguousarray(w.reshape(-1))
        elif cpu_gemm:
            self.tiles = None
            k = (spec.in_channels // g) * spec.kh * spec.kw
            self.cpu_local = cpu_gemm_local(og, limits)
            self.kpad = k
            self.ogpad = math.ceil(og / (8 * self.cpu_local[1])) * 8 * self.cpu_local[1]
            # [group][8-channel block][k][8]: each work-item's slice of A is one contiguous run.
            blocks = _pack(w, g, og, k, self.kpad, self.ogpad).reshape(g, k, self.ogpad // 8, 8)
            self.weights = np.ascontiguousarray(blocks.transpose(0, 2, 1, 3))
            defines["KCHUNK"] = CPU_K_CHUNK if k > CPU_K_CHUNK_ABOVE else 0
        else:
            k = (spec.in_channels // g) * spec.kh * spec.kw
            self.tiles = choose_tiles(og, limits)
            defines.update(self.tiles.defines())
            self.kpad = math.ceil(k / self.tiles.tk) * self.tiles.tk
            self.ogpad = math.ceil(og / self.tiles.tm) * self.tiles.tm
            self.weights = _pack(w, g, og, k, self.kpad, self.ogpad)
        self.bias = b if b is not None else np.zeros(spec.out_channels, np.float32)
        self.options = tuple(f"-D{name}={value}" for name, value in defines.items())
        self.pad_source = source("pad_input")
        self.pad_local = PAD_CPU_LOCAL if limits.is_cpu else PAD_LOCAL
        self.pad_options = (f"-DPAD_LX={self.pad_local[0]}", f"-DPAD_LY={self.pad_local[1]}",
                            f"-DINDEX_T={defines['INDEX_T']}")

    @property
    def threads(self) -> int:
        if self.algorithm == "cpu_gemm":
            return self.cpu_local[0] * self.cpu_local[1]
        if self.tiles is None:
            return self.dw_local[0] * self.dw_local[1]
        return self.tiles.threads

    @property
    def uses_ktab(self) -> bool:
        return self.algorithm in ("implicit_gemm", "cpu_gemm")

    def padded(self, geom: Conv2dGeometry) -> tuple[int, int] | None:
        """(HP, WP) of the zero-padded input copy the kernel reads, or None when it reads x itself. It spans
        the reads of the real outputs only (work-items past them re-read the last row or pixel), and
        whole 8-pixel blocks where a CPU kernel reads vectors, so no tap needs a bounds check."""
        unpadded = not any((geom.pt, geom.pl, geom.pb, geom.pr))
        # conv2d_cpu_gemm reads an unpadded input in place (a ragged row's last block gathers) unless
        # its rows are too short for one vector read: a copy in whole blocks, small there, is faster.
        short = self.algorithm == "cpu_gemm" and geom.sw <= 2 and geom.w < 8 * geom.sw + (geom.kw - 1) * geom.dw
        if self.algorithm == "gemm_1x1" or (self.algorithm != "depthwise" and unpadded and not short):
            return None
        oh, ow, sw = geom.oh, geom.ow, geom.sw
        rows = (oh - 1) * geom.sh + (geom.kh - 1) * geom.dh + 1  # items past the output re-read the last row
        reach = (geom.kw - 1) * geom.dw
        if sw <= 2 and (self.algorithm == "cpu_gemm" or (self.algorithm == "depthwise" and self.dw_vec > 1)):
            # vector reads: whole 8-pixel blocks, 16 inputs each at stride 2
            return rows, math.ceil(ow / 8) * 8 * sw + reach
        return rows, (ow - 1) * sw + reach + 1  # gathers clamp to the row's last pixel

    def vector_blocks(self, geom: Conv2dGeometry) -> int:
        """conv2d_cpu_gemm: the leading 8-pixel blocks of an output row whose vector reads (8 inputs at
        stride 1, 16 at stride 2, from each tap's column) stay inside the input row it reads."""
        if geom.sw > 2:
            return 0
        width, reach = self._input_dims(geom)[1], (geom.kw - 1) * geom.dw
        return max(0, min(math.ceil(geom.ow / 8), (width - reach - 8 * geom.sw) // (8 * geom.sw) + 1))

    def call_buffers(self, geom: Conv2dGeometry) -> list[CallBuffer]:
        """What one call allocates besides its input and output: the padded copy, where there is one."""
        dims = self.padded(geom)
        return [CallBuffer("padded input copy", 4 * geom.c * dims[0] * dims[1])] if dims else []

    def _input_dims(self, geom: Conv2dGeometry) -> tuple[int, int]:
        return self.padded(geom) or (geom.h, geom.w)

    def pad_launch(self, geom: Conv2dGeometry, dims: tuple[int, int] | None = None) -> Launch:
        """pad_input into planes of `dims` (HP, WP), by default the ones this plan's kernel reads."""
        hp, wp = dims or self.padded(geom)
        lx, ly = self.pad_local
        rows = geom.n * geom.c * hp
        wtiles = 1 if lx == 1 else math.ceil(wp / lx)  # lx == 1: a work-item per row
        return Launch((math.ceil(rows / ly) * wtiles * lx, ly, 1), (lx, ly, 1),
                      _i32(geom.h, geom.w, hp, wp, geom.pt, geom.pl, rows, wtiles))

    def ktab(self, geom: Conv2dGeometry) -> np.ndarray:
        """Per k = (c, kh, kw) its element offset in the (padded) input, as int32 [kpad]."""
        hp, wp = self._input_dims(geom)
        c, kh, kw = np.meshgrid(np.arange(geom.cg), np.arange(geom.kh), np.arange(geom.kw), indexing="ij")
        table = np.zeros(self.kpad, np.int32)
        table[: c.size] = (c * hp * wp + kh * geom.dh * wp + kw * geom.dw).ravel()
        return table

    def launch(self, geom: Conv2dGeometry) -> Launch:
        spec = self.spec
        act = spec.activation
        params = (np.float32(act.alpha), np.float32(act.beta))
        hp, wp = self._input_dims(geom)
        if self.algorithm == "cpu_gemm":
            lx, ly = self.cpu_local
            owb = math.ceil(geom.ow / 8)
            nblocks = geom.n * geom.groups * geom.oh * owb
            return Launch(
                (math.ceil(nblocks / lx) * lx, self.ogpad // 8, 1), (lx, ly, 1),
                _i32(geom.c, hp, wp, geom.o, geom.oh, geom.ow, geom.sh, geom.sw, geom.groups, self.kpad, self.ogpad,
                     owb, self.vector_blocks(geom), nblocks) + params,
            )
        if self.tiles is None:
            lx, ly = self.dw_local
            owtiles, ohtiles = math.ceil(geom.ow / (lx * self.dw_vec)), math.ceil(geom.oh / ly)
            return Launch(
                (owtiles * ohtiles * geom.n * geom.o * lx, ly, 1), (lx, ly, 1),
                _i32(geom.c, hp, wp, geom.o, geom.oh, geom.ow, owtiles, ohtiles) + params,
            )
        t = self.tiles
        npix = geom.oh * geom.ow
        ptiles = math.ceil(npix / t.tn)
        lx, ly, _ = t.local_size
        size = (ptiles * geom.n * geom.groups * lx, (self.ogpad // t.tm) * ly, 1)
        if self.algorithm == "gemm_1x1":
            scalars = _i32(geom.c, geom.o, npix, geom.groups, self.kpad, self.ogpad, ptiles)
        else:
            kdim = geom.cg * geom.kh * geom.kw
            scalars = _i32(geom.c, hp, wp, geom.o, geom.ow, npix, geom.sh, geom.sw, geom.groups, kdim,
                           self.kpad, self.ogpad, ptiles)
        return Launch(size, t.local_size, scalars + params)


def fit_plan(spec: Conv2dSpec, w, b, limits: DeviceLimits, build, max_threads):
    """Plan and build a layer's kernel; re-plan once when the built kernel allows fewer work-items
    per group than the device (register pressure on GPUs). Returns (plan, kernel)."""
    plan = Plan(spec, w, b, limits)
    kernel = build(plan)
    allowed = int(max_threads(kernel))
    if plan.threads > allowed:
        plan = Plan(spec, w, b, replace(limits, max_threads=allowed))
        kernel = build(plan)
    return plan, kernel


class WinogradPlan:
    """A 3x3 stride-1 layer as Winograd F(4,3) (_winograd.py): pad_input, conv2d_winograd_input, the 36
    GEMMs as one grouped 1x1 layer of 36 groups over every tile of the batch (a `Plan` of its own, so
    the device's GEMM form: conv2d_gemm_1x1, or conv2d_cpu_gemm), conv2d_winograd_output."""

    def __init__(self, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, limits: DeviceLimits, build, max_threads):
        self.spec = spec
        c, o = spec.in_channels, spec.out_channels
        u = _winograd.weights(w)  # (36, C, O): as a grouped 1x1 layer, (36 * O, C, 1, 1)
        gemm_w = np.ascontiguousarray(u.transpose(0, 2, 1)).reshape(36 * o, c, 1, 1)
        self.gemm, self.gemm_kernel = fit_plan(Conv2dSpec.create(gemm_w, groups=36), gemm_w, None, limits, build,
                                               max_threads)
        self.source = source("winograd")
        self.options = (f"-DACTIVATION={spec.activation.code}", f"-DINDEX_T={limits.index_type}")
        self.local = min(WINOGRAD_LOCAL, limits.max_threads)
        self.bias = b if b is not None else np.zeros(o, np.float32)

    @staticmethod
    def eligible(spec: Conv2dSpec, limits: DeviceLimits) -> bool:
        kind = "cpu" if limits.is_cpu else "gpu"
        return _winograd.fits(spec) and min(spec.in_channels, spec.out_channels) >= WINOGRAD_MIN_CHANNELS[kind]

    def pays(self, geom: Conv2dGeometry, limits: DeviceLimits) -> bool:
        """Enough tiles to pay for the transforms, and one image's V and M within the buffer limits
        (a larger batch runs in chunks)."""
        return (self.pixels(geom) >= WINOGRAD_MIN_TILES["cpu" if limits.is_cpu else "gpu"]
                and all(b.nbytes(1) <= min(b.cap, limits.max_alloc) for b in self._transformed(geom)))

    def _transformed(self, geom: Conv2dGeometry) -> list[CallBuffer]:
        """V and M: 36 planes of TPS floats per channel, TPS at most 7 more than the batch's tiles."""
        th, tw = _winograd.tile_grid(geom)
        return [CallBuffer(name, 4 * 36 * channels * th * tw, 4 * 36 * channels * 7, WINOGRAD_MAX_BUFFER_BYTES)
                for name, channels in (("Winograd V", geom.c), ("Winograd M", geom.o))]

    def call_buffers(self, geom: Conv2dGeometry) -> list[CallBuffer]:
        """What one call allocates besides its input and output: the padded copy, V and M."""
        hp, wp = self.padded(geom)
        return [CallBuffer("padded input copy", 4 * geom.c * hp * wp), *self._transformed(geom)]

    @staticmethod
    def pixels(geom: Conv2dGeometry) -> int:
        """The GEMM's pixels: every 4x4 output tile of the batch."""
        th, tw = _winograd.tile_grid(geom)
        return geom.n * th * tw

    def padded(self, geom: Conv2dGeometry) -> tuple[int, int]:
        """(HP, WP): whole 6x6 input tiles."""
        th, tw = _winograd.tile_grid(geom)
        return 4 * th + 2, 4 * tw + 2

    def tile_plane(self, geom: Conv2dGeometry) -> int:
        """TPS: the pixels rounded up to whole 8-pixel blocks (conv2d_cpu_gemm's), so V needs no copy."""
        return math.ceil(self.pixels(geom) / 8) * 8

    def gemm_geometry(self, geom: Conv2dGeometry) -> Conv2dGeometry:
        return self.gemm.spec.geometry((1, 36 * geom.c, 1, self.tile_plane(geom)))

    def _transform(self, work: int, planes: int, scalars: tuple) -> Launch:
        """A work-item per tile (x), a channel per work-group row (y)."""
        return Launch((math.ceil(work / self.local) * self.local, planes, 1), (self.local, 1, 1), scalars)

    def input_launch(self, geom: Conv2dGeometry) -> Launch:
        (hp, wp), (th, tw), tps = self.padded(geom), _winograd.tile_grid(geom), self.tile_plane(geom)
        return self._transform(tps, geom.c, _i32(geom.c, hp, wp, tw, th * tw, self.pixels(geom), tps))

    def output_launch(self, geom: Conv2dGeometry) -> Launch:
        (th, tw), pixels, act = _winograd.tile_grid(geom), self.pixels(geom), self.spec.activation
        return self._transform(pixels, geom.o, _i32(geom.o, geom.oh, geom.ow, tw, th * tw, pixels,
                                                          self.tile_plane(geom))
                               + (np.float32(act.alpha), np.float32(act.beta)))


class _Stage:
    """A `Plan` on one device: its kernels, uploaded weights and per-geometry gather tables, all
    read-only once made, so concurrent calls share them. `steps` is its launch sequence: the pad copy
    (into a buffer of that call's own) when the kernel needs one, then the kernel. `upload_weights`
    False: each call brings its own weights, packed as `plan.weights` is (deform_conv2d's grad_w GEMM)."""

    def __init__(self, rt, plan: Plan, kernel, upload_weights: bool = True):
        self.plan, self.kernel, self._rt = plan, kernel, rt
        self.pad = rt.kernel(plan.pad_source, "pad_input", plan.pad_options)
        self.weights = rt.upload(plan.weights) if upload_weights else None
        self.bias = rt.upload(plan.bias)
        self.ktabs = GeometryCache(lambda geom: rt.upload(plan.ktab(geom)))

    def steps(self, x, y, geom: Conv2dGeometry, weights=None) -> list[tuple[object, Launch, list]]:
        plan, steps = self.plan, []
        weights = self.weights if weights is None else weights
        dims = plan.padded(geom)
        if dims:
            xp = self._rt.empty((geom.n, geom.c, *dims))
            steps.append((self.pad, plan.pad_launch(geom), [x, xp]))
            x = xp
        buffers = [x, weights, self.bias, *([self.ktabs.get(geom)] if plan.uses_ktab else []), y]
        steps.append((self.kernel, plan.launch(geom), buffers))
        return steps

    def clear(self) -> None:
        self.ktabs.clear()


class _WinogradStage:
    """A `WinogradPlan` on one device: the transforms and the GEMM stage; each call gets its own padded
    input, V and M."""

    def __init__(self, rt, wino: WinogradPlan):
        self.plan, self._rt = wino, rt
        self.input = rt.kernel(wino.source, "conv2d_winograd_input", wino.options)
        self.output = rt.kernel(wino.source, "conv2d_winograd_output", wino.options)
        self.gemm = _Stage(rt, wino.gemm, wino.gemm_kernel)
        self.bias = rt.upload(wino.bias)

    def steps(self, x, y, geom: Conv2dGeometry) -> list[tuple[object, Launch, list]]:
        wino, gemm, rt = self.plan, self.gemm, self._rt
        tps = wino.tile_plane(geom)
        xp = rt.empty((geom.n, geom.c, *wino.padded(geom)))
        v, m = rt.empty((36 * geom.c * tps,)), rt.empty((36 * geom.o * tps,))
        return [  # gemm.pad: the device's pad_input, which every plan on it builds alike
            (gemm.pad, wino.gemm.pad_launch(geom, wino.padded(geom)), [x, xp]),
            (self.input, wino.input_launch(geom), [xp, v]),
            *gemm.steps(v, m, wino.gemm_geometry(geom)),
            (self.output, wino.output_launch(geom), [m, self.bias, y]),
        ]

    def clear(self) -> None:
        self.gemm.clear()


class KernelPrepared(Prepared):
    """A layer on one device: the direct stage (its plan, built kernels, uploaded weights) and the
    Winograd stage where it pays. What a call writes (device copies of its input and output, padded
    copies, V and M) it allocates for itself from the runtime's memory pool, and what calls share
    (weights, gather tables) is read-only once made, so threads may share a layer.
    """

    def __init__(self, rt: KernelRuntime, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None):
        self.device = rt.info
        self._rt = rt

        def build(plan):
            return rt.kernel(plan.source, plan.kernel_name, plan.options)

        plan, kernel = fit_plan(spec, w, b, rt.limits, build, rt.max_threads)
        if plan.weights.nbytes > rt.limits.max_alloc:
            raise ValueError(
                f"{self.device.backend}: the packed weights need {plan.weights.nbytes} bytes, more than the device's "
                f"largest buffer ({rt.max_alloc_name}: {rt.limits.max_alloc} bytes)"
            )
        self._direct = _Stage(rt, plan, kernel)
        self._winograd = None
        if WinogradPlan.eligible(spec, rt.limits):
            wino = WinogradPlan(spec, w, b, rt.limits, build, rt.max_threads)
            if wino.gemm.weights.nbytes <= rt.limits.max_alloc:  # 4x the direct weights: else direct only
                self._winograd = _WinogradStage(rt, wino)

    @property
    def _plan(self) -> Plan:
        return self._direct.plan

    def uses_winograd(self, x, geom: Conv2dGeometry) -> bool:
        """Winograd for a host input with enough tiles that is finite and well inside float32's range
        (`_winograd.safe`). Device arrays take the direct kernels: checking them would read them back."""
        wino = self._winograd
        return (wino is not None and isinstance(x, np.ndarray) and wino.plan.pays(geom, self._rt.limits)
                and _winograd.safe(x))

    def chunks(self, geom: Conv2dGeometry, winograd: bool,
               one_output: bool = False) -> list[tuple[int, Conv2dGeometry]]:
        """The batch as (first image, geometry) parts whose every buffer (input, output, padded copy,
        V, M) fits the device's largest buffer; one part when the whole batch does. `one_output`: the
        output is one device array, so it must fit whole."""
        rt, backend = self._rt, self.device.backend
        output = CallBuffer("output", 4 * geom.o * geom.oh * geom.ow)
        if one_output and output.nbytes(geom.n) > rt.limits.max_alloc:
            raise ValueError(
                f"{backend}: the output needs {output.nbytes(geom.n)} bytes, more than the device's largest buffer "
                f"({rt.max_alloc_name}: {rt.limits.max_alloc} bytes); pass a numpy array to run the batch in parts"
            )
        stage = self._winograd if winograd else self._direct
        buffers = [CallBuffer("input", 4 * geom.c * geom.h * geom.w), output, *stage.plan.call_buffers(geom)]
        per_chunk = images_per_chunk(geom.n, buffers, rt.limits.max_alloc, rt.max_alloc_name, backend)
        if per_chunk == geom.n:
            return [(0, geom)]
        return [(start, self._plan.spec.geometry((min(per_chunk, geom.n - start), *geom.input_shape[1:])))
                for start in range(0, geom.n, per_chunk)]

    def _steps(self, x, y, geom: Conv2dGeometry, winograd: bool) -> list[tuple[object, Launch, list]]:
        """(kernel, launch, buffers) in order; x and y are device arrays of this backend."""
        return (self._winograd if winograd else self._direct).steps(x, y, geom)

    def _launch(self, x, y, geom: Conv2dGeometry, winograd: bool) -> None:
        for kernel, launch, buffers in self._steps(x, y, geom, winograd):
            self._rt.launch(kernel, launch, buffers)

    def _run(self, x, geom: Conv2dGeometry, timed: bool):
        """A batch whose buffers would pass the device's largest buffer runs in parts (`chunks`)."""
        rt, stages = self._rt, (self._direct, self._winograd)
        if stages[0] is None:
            raise ValueError("this layer is closed")
        host = isinstance(x, np.ndarray)
        winograd = self.uses_winograd(x, geom)
        with rt.timer() if timed else contextlib.nullcontext([None]) as seconds:
            if host:
                y = np.empty(geom.output_shape, np.float32)
                for start, part in self.chunks(geom, winograd):
                    images = slice(start, start + part.n)
                    rt.run_host(x[images], y[images], lambda xd, yd, part=part: self._launch(xd, yd, part, winograd))
            else:
                chunks = self.chunks(geom, winograd=False, one_output=True)  # device arrays: see uses_winograd
                x, y = rt.device_input(x), rt.empty_array(geom.output_shape)
                for start, part in chunks:
                    rt.run_part(x, y, start, part.n, lambda xd, yd, part=part: self._launch(xd, yd, part, False))
                y = rt.returned(y)
        return y, seconds[0]

    def run(self, x, geom: Conv2dGeometry):
        return self._run(x, geom, timed=False)[0]

    def profile(self, x, geom: Conv2dGeometry):
        return self._run(x, geom, timed=True)

    def close(self) -> None:
        for stage in (self._direct, self._winograd):
            if stage is not None:
                stage.clear()
        self._direct = self._winograd = None


def prepare(backend, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device) -> KernelPrepared:
    return KernelPrepared(backend.runtime(device), spec, w, b)
