"""conv2d on Vulkan: embedded SPIR-V (shaders/ via tools/build_spirv.py) run through the `vulkan` bindings.

Per-layer choices (kernel, stride and dilation where they are small enough to unroll, the activation, tiles)
are specialization constants; shapes and the activation's parameters are push constants, so one pipeline
serves every input size of a layer, and every layer of the same form. Each input geometry gets its buffers
and a command buffer recorded once; a call then only writes x (zero-padded, see conv2d_layout.glsl),
submits, waits and reads y. A layer's device objects are released by close() or, failing that, when it is
collected. 3x3 stride-1 layers with enough channels run Winograd F(4,3) for finite inputs: three
dispatches in the one command buffer (input transform, 36 GEMMs as one grouped conv2d_gemm_1x1, output
transform with bias and activation).
"""
from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from ...runtime import DeviceInfo
from ...runtime import vulkan as _vk
from ...spec import Conv2dGeometry, Conv2dSpec
from .. import Prepared, _winograd
from .spirv import SPIRV

_PLANS_KEPT = 4  # recorded geometries kept per layer; older ones go back to the pool
# x, x as vec4, w, w as vec4, b, y: the bindings of shaders/conv2d_layout.glsl.
_BINDINGS = (_vk.TEXEL_FLOAT, _vk.TEXEL_VEC4, _vk.TEXEL_FLOAT, _vk.TEXEL_VEC4, _vk.TEXEL_FLOAT, _vk.STORAGE)
_PUSH = struct.Struct("<17i2f")  # C, HP, WP, PS, O, OH, OW, GROUPS, OGP, N, TPS, KH, KW, SH, SW, DH, DW, ALPHA, BETA
_NO_KERNEL = (1,) * 6  # KH ... DW for the shaders that have no kernel geometry
_NO_ACTIVATION = (0.0, 0.0)
# Past these the direct shaders' code unrolled over the kernel's taps or its input row segments takes the
# driver seconds to minutes to build; such layers loop instead (UNROLL off, conv2d_layout.glsl), one
# pipeline for all of them. Measured on llvmpipe, shader cache off, 2 loaded cores: unrolled GEMM 3x3
# 1.5-2 s, 7x7 3 s, 9x9 5.5 s, 23x23 21 s, 3x3 at stride 3000 23 s; looping runs 7x7 1.7x and 3x3 9x
# slower. Depthwise code per tap is lighter (23x23 1.1 s, 31x31 3.9 s) and loops 7x slower.
UNROLLED_MULTIPLY_ADDS = {"implicit_gemm": 16 * 4 * 7 * 7, "depthwise": 8 * 23 * 23}  # TM x TN x taps
UNROLLED_ROW_VEC4S = 256  # KH rows of vec4s, each covering TN outputs' taps
# Winograd pays once both channel counts reach this (its transforms cost ~36/C and ~16/O of its GEMMs,
# whose K is C) and the batch has this many 4x4 tiles (its 36 GEMMs are that wide), by device kind.
# CPU (llvmpipe, measured): 1.35-1.9x faster from 128 channels and 32 tiles, about even at 64 channels,
# slower below. GPU: conventional, not yet measured.
WINOGRAD_MIN_CHANNELS = {"cpu": 128, "gpu": 32}
WINOGRAD_MIN_TILES = {"cpu": 32, "gpu": 16}
_TRANSFORM_LANES = 64  # work-group width of the Winograd transforms


@dataclass(frozen=True)
class Tiles:
    """Work-group shape (lx, ly), register tile (tm channels x tn pixels), K tile (bk), the path, and
    for the direct 1x1 path the input channels per weight block (cb)."""

    lx: int
    ly: int
    tm: int
    tn: int
    bk: int
    stage: bool
    cb: int = 1


def choose_tiles(algorithm: str, dev: _vk.Device, kernel_w: int = 1, stride_w: int = 1) -> Tiles:
    """Tiles by device kind for one of the shaders (`conv2d_<algorithm>`), shrunk to the device's limits.

    llvmpipe runs a work group as SIMD lanes of one CPU thread and emulates shared memory and barriers
    slowly, so CPU devices take the direct path: one subgroup per work group, a 16 x 4 register tile,
    vec4 fetches, weights passed between lanes by shuffles; 16 x 8 for stride-1 kernels up to 3 wide,
    whose row segments then serve twice the outputs (on llvmpipe 1.2-1.45x faster on 3x3 layers, slower
    from 7x7 and at stride 2). GPUs stage tiles in shared memory.
    Depthwise uses neither; wide work groups amortise llvmpipe's per-group cost. Tile sizes were
    measured on llvmpipe (AVX2, 8 lanes); the GPU ones are conventional and untuned.
    """
    limits = dev.limits
    lanes = dev.subgroup_size
    direct = (dev.type == "cpu" and 4 <= lanes <= limits.maxComputeWorkGroupSize[0]
              and lanes <= limits.maxComputeWorkGroupInvocations)
    if algorithm == "depthwise":  # no subgroup operations: any work-group width
        width = min(64, limits.maxComputeWorkGroupSize[0], limits.maxComputeWorkGroupInvocations)
        return Tiles(width, 1, 1, 8 if direct else 4, 1, False)
    if not dev.subgroup_shuffle:
        raise ValueError("vulkan: the device has no subgroup shuffles in compute shaders, which the GEMM "
                         "shaders declare (Vulkan's subgroupSupportedOperations)")
    if direct:
        tn = 8 if algorithm == "implicit_gemm" and kernel_w <= 3 and stride_w == 1 else 4
        return Tiles(lanes, 1, 16, tn, 1, False, 8 if algorithm == "gemm_1x1" else 1)
    lx, ly, bk = 16, 8, 16
    while lx * ly > limits.maxComputeWorkGroupInvocations or ly > limits.maxComputeWorkGroupSize[1]:
        ly //= 2
    while lx > min(limits.maxComputeWorkGroupSize[0], limits.maxComputeWorkGroupInvocations):
        lx //= 2
    while 4 * bk * 4 * (lx + ly) > limits.maxComputeSharedMemorySize and bk > 1:
        bk //= 2
    if 4 * bk * 4 * (lx + ly) > limits.maxComputeSharedMemorySize:
        raise ValueError(f"vulkan: the device's maxComputeSharedMemorySize ({limits.maxComputeSharedMemorySize} "
                         "bytes) is too small for the smallest GEMM tile")
    return Tiles(lx, ly, 4, 4, bk, True)


def tile_constants(t: Tiles, unroll: bool = True) -> dict:
    """The specialization constants (ids of conv2d_layout.glsl) that carry the tiles of a GEMM-shaped or
    depthwise shader, and whether it unrolls its loops over the kernel."""
    return {0: t.lx, 1: t.ly, 10: unroll, 11: t.tm, 12: t.tn, 13: t.bk, 14: t.stage, 15: t.cb}


def epilogue_constants(activation_code: int, has_bias: bool) -> dict:
    """The specialization constants of the fused epilogue (ACT, HAS_BIAS); its parameters are push constants."""
    return {8: activation_code, 9: has_bias}


def gemm_1x1_push(c: int, pixels: int, plane: int, o: int, groups: int, row_stride: int, n: int,
                  activation: tuple[float, float] = _NO_ACTIVATION) -> bytes:
    """conv2d_gemm_1x1's push constants: n images of c channels x `pixels` points, input planes `plane`
    floats apart, into o channels in `groups` groups; `activation` its (ALPHA, BETA)."""
    return _PUSH.pack(c, 1, pixels, plane, o, 1, pixels, groups, row_stride, n, 0, *_NO_KERNEL, *activation)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def unrolls(spec: Conv2dSpec, t: Tiles) -> bool:
    """Whether the layer's shader is built with its loops over the kernel unrolled (UNROLL); 1x1 layers
    have nothing to unroll."""
    if spec.algorithm not in UNROLLED_MULTIPLY_ADDS:
        return True
    row_vec4s = -(-((t.tn - 1) * spec.stride[1] + (spec.kw - 1) * spec.dilation[1] + 1) // 4)
    return (t.tm * t.tn * spec.kh * spec.kw <= UNROLLED_MULTIPLY_ADDS[spec.algorithm]
            and spec.kh * row_vec4s <= UNROLLED_ROW_VEC4S)


def packed_floats(w_shape: tuple[int, int, int, int], groups: int, t: Tiles, depthwise: bool) -> int:
    """The size of pack_weights' result, known before packing."""
    o, cg, kh, kw = w_shape
    if depthwise:
        return o * kh * kw
    ogp = _round_up(o // groups, t.tm * t.ly)
    if t.stage:
        return groups * _round_up(cg * kh * kw, t.bk) * ogp
    return groups * ogp * _round_up(cg, t.cb) * kh * kw + 4 * t.lx


def pack_weights(w: np.ndarray, groups: int, t: Tiles, depthwise: bool) -> tuple[np.ndarray, int]:
    """Weights (O, C/groups, kh, kw) in the order the shader walks them, zero-padded to whole tiles so it
    never checks bounds, and the padded output channels per group (the shaders' OGP).

    Staged: [group][k][o], a K step reads a run of output channels. Direct: [group][channel tile][c]
    [kh*kw][tm] with c padded to whole blocks of cb, plus one lane-fetch of slack at the end.
    Depthwise: as given, (O, kh*kw).
    """
    o, cg, kh, kw = w.shape
    taps = kh * kw
    if depthwise:
        return np.ascontiguousarray(w.reshape(o, taps)), 0
    og = o // groups
    ogp = _round_up(og, t.tm * t.ly)
    if t.stage:
        packed = np.zeros((groups, _round_up(cg * taps, t.bk), ogp), np.float32)
        packed[:, :cg * taps, :og] = w.reshape(groups, og, cg * taps).transpose(0, 2, 1)
        return packed.reshape(-1), ogp
    cg_padded = _round_up(cg, t.cb)
    padded = np.zeros((groups, ogp, cg_padded, taps), np.float32)
    padded[:, :og, :cg] = w.reshape(groups, og, cg, taps)
    blocks = padded.reshape(groups, ogp // t.tm, t.tm, cg_padded, taps).transpose(0, 1, 3, 4, 2)
    return np.concatenate([blocks.reshape(-1), np.zeros(4 * t.lx, np.float32)]), ogp


def work_groups(t: Tiles, algorithm: str, oh: int, ow: int, og: int, planes: int) -> tuple[int, int, int]:
    """Work-group counts of one shader over `planes` (images x groups, or output planes for depthwise)
    of oh x ow outputs and og output channels per group."""
    row_items = oh * math.ceil(ow / t.tn)  # an item: tn neighbouring outputs of a row
    if algorithm == "depthwise":
        return (math.ceil(row_items / t.lx), 1, planes)
    channel_tiles = math.ceil(og / (t.tm * t.ly))
    if t.stage:
        return (math.ceil(oh * ow / (t.tn * t.lx)), channel_tiles, planes)
    items = math.ceil(oh * ow / t.tn) if algorithm == "gemm_1x1" else row_items
    return (math.ceil(items / t.lx), channel_tiles, planes)


class _DeviceObjects(_vk.Holdings):
    """What a layer holds on its device: weight buffers, pipelines, and its recorded plans."""

    def __init__(self, dev: _vk.Device):
        super().__init__(dev)
        self.plans: OrderedDict[tuple[Conv2dGeometry, bool], _Plan] = OrderedDict()

    def shader_pipeline(self, name: str, constants: dict, kinds: tuple = _BINDINGS, push_bytes: int = _PUSH.size
                        ) -> _vk.Pipeline:
        """The embedded shader `name`'s pipeline (conv2d's bindings and push constants unless told)."""
        return self.pipeline(name, SPIRV[name], constants, kinds, push_bytes)

    def plan(self, key: tuple, make) -> "PlanBuffers":
        """The recorded plan for `key`, `make()` when there is none; beyond _PLANS_KEPT the least recently
        used is closed."""
        plan = self.plans.pop(key, None) or make()
        self.plans[key] = plan
        while len(self.plans) > _PLANS_KEPT:
            self.plans.popitem(last=False)[1].close()
        return plan

    def release(self) -> None:
        for plan in self.plans.values():
            plan.close()
        self.plans.clear()
        super().release()


class _Shader:
    """One GEMM-shaped or depthwise pass of a layer: its tiles, packed weights on the device, pipeline.
    `unroll`: the kernel's geometry is specialised (`constants` holds it) and the shader's loops over it
    unrolled; else it arrives as push constants."""

    def __init__(self, held: _DeviceObjects, algorithm: str, tiles: Tiles, w: np.ndarray, groups: int,
                 constants: dict, unroll: bool = True):
        self.algorithm, self.unroll = algorithm, unroll
        t = self.tiles = tiles
        floats = packed_floats(w.shape, groups, t, algorithm == "depthwise")
        limit = held.dev.limits.maxTexelBufferElements
        if floats > limit:
            raise ValueError(f"vulkan: the packed weights ({floats} floats) exceed the device's "
                             f"maxTexelBufferElements ({limit})")
        packed, self.row_stride = pack_weights(w, groups, t, algorithm == "depthwise")
        constants = {**constants, **tile_constants(t, unroll)}
        self.pipeline = held.shader_pipeline(f"conv2d_{algorithm}", constants)
        self.w = held.upload(packed)


class _Winograd:
    """The Winograd form of a 3x3 stride-1 layer: transform pipelines and the 36 GEMMs' weights."""

    def __init__(self, held: _DeviceObjects, spec: Conv2dSpec, w: np.ndarray, epilogue: dict):
        limits = held.dev.limits
        lanes = min(_TRANSFORM_LANES, limits.maxComputeWorkGroupSize[0], limits.maxComputeWorkGroupInvocations)
        self.lanes = lanes
        self.input = held.shader_pipeline("conv2d_winograd_input", {0: lanes, 1: 1})
        self.output = held.shader_pipeline("conv2d_winograd_output", {0: lanes, 1: 1, **epilogue})
        u = _winograd.weights(w)  # (36, C, O): as a grouped 1x1 layer, (36 * O, C, 1, 1)
        gemm_w = np.ascontiguousarray(u.transpose(0, 2, 1)).reshape(36 * spec.out_channels, spec.in_channels, 1, 1)
        self.gemm = _Shader(held, "gemm_1x1", self.gemm_tiles(held.dev), gemm_w, 36, {9: False})

    @staticmethod
    def gemm_tiles(dev: _vk.Device) -> Tiles:
        tiles = choose_tiles("gemm_1x1", dev)
        # Its K is only C: 8 pixels per lane halve llvmpipe's per-work-group cost.
        return tiles if tiles.stage else replace(tiles, tn=8)

    @classmethod
    def weights_fit(cls, dev: _vk.Device, spec: Conv2dSpec) -> bool:
        """Whether the 36 GEMMs' packed weights fit one texel buffer (else the layer runs direct only)."""
        shape = (36 * spec.out_channels, spec.in_channels, 1, 1)
        return packed_floats(shape, 36, cls.gemm_tiles(dev), False) <= dev.limits.maxTexelBufferElements

    def tile_plane(self, tiles: int) -> int:
        """TPS: floats between V's tile planes, whole vec4s and whole GEMM pixel tiles."""
        return _round_up(tiles, max(4, self.gemm.tiles.tn))


class PlanBuffers:
    """What every recorded plan (its `recording`) does with its buffers: takes them from the device's pool and
    gives them back when it is closed."""

    def __init__(self, device: _vk.Device):
        self.device = device
        self._owned: list[_vk.Buffer] = []

    def _buffer(self, nbytes: int, host: bool) -> _vk.Buffer:
        """A pool buffer, zeroed: a plan's shaders may read parts no dispatch writes (a GEMM's tail of
        columns past the last point), and a last user's data there once ran llvmpipe's GEMM 30x slower
        (denormals), as NaN there could reach results a shader does not mask."""
        buf = self.device.acquire(nbytes, host, zeroed=True)
        self._owned.append(buf)
        return buf

    def close(self) -> None:
        self.recording.close()
        self._release()

    def _release(self) -> None:
        for buf in self._owned:
            self.device.release(buf)
        self._owned = []


class _Plan(PlanBuffers):
    """Buffers and a recorded command buffer for one input geometry and path, split by batch where a
    buffer would exceed maxTexelBufferElements or maxStorageBufferRange."""

    def __init__(self, layer: "VulkanConv2d", geom: Conv2dGeometry, winograd: bool):
        super().__init__(layer.dev)
        self.geom = geom
        self.padded = layer.padded_input(geom, winograd)
        if winograd:
            self.tiles = math.prod(_winograd.tile_grid(geom))
        per_chunk, refusal = layer.images_per_chunk(geom, winograd)
        if per_chunk < 1:
            raise ValueError(refusal)
        self.chunks, self._transformed = [], None
        try:
            self.recording = self._record(layer, geom, per_chunk, winograd)
        except BaseException:
            self._release()
            raise

    def _record(self, layer: "VulkanConv2d", geom: Conv2dGeometry, per_chunk: int, winograd: bool) -> _vk.Recording:
        dev, (hp, wp, ps) = self.device, self.padded
        in_image, out_image = geom.c * ps, geom.o * geom.oh * geom.ow
        dispatches, copies_in, copies_out = [], [], []
        for start in range(0, geom.n, per_chunk):
            n = min(per_chunk, geom.n - start)
            # Taken zeroed, so the padding stays zero: run() only writes the interior.
            x_host, x_dev = _vk.staged(self._buffer, dev, 4 * n * in_image, copies_in)
            y_host, y_dev = _vk.staged(self._buffer, dev, 4 * n * out_image, copies_out)
            interior = x_host.array[: n * in_image].reshape(n, geom.c, ps)[:, :, : hp * wp].reshape(n, geom.c, hp, wp)
            interior = interior[:, :, geom.pt:geom.pt + geom.h, geom.pl:geom.pl + geom.w]
            self.chunks.append((start, n, interior, y_host))
            if winograd:
                dispatches += self._winograd_dispatches(layer, geom, n, x_dev, y_dev)
            else:
                conv = layer.conv
                kernel = (geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw)
                push = _PUSH.pack(geom.c, hp, wp, ps, geom.o, geom.oh, geom.ow, geom.groups, conv.row_stride, n, 0,
                                  *kernel, *layer.activation_parameters)
                planes = n * geom.o if conv.algorithm == "depthwise" else n * geom.groups
                groups = work_groups(conv.tiles, conv.algorithm, geom.oh, geom.ow, geom.og, planes)
                dispatches.append(_vk.Dispatch(conv.pipeline, [x_dev, x_dev, conv.w, conv.w, layer.b, y_dev], push, groups))
        return _vk.Recording(dev, dispatches, copies_in, copies_out)

    def _winograd_dispatches(self, layer: "VulkanConv2d", geom: Conv2dGeometry, n: int, x_dev, y_dev) -> list:
        """V = B^T d B per tile; M = U V as 36 GEMMs over the n images' tiles (one image of a 1x1 layer of
        36 groups, a pixel per tile); y = A^T M A."""
        (hp, wp, ps), wino = self.padded, layer.winograd
        pixels = n * self.tiles
        tps = wino.tile_plane(pixels)
        if self._transformed is None:  # one V and M serve every chunk: the barriers order their reuse
            self._transformed = (self._buffer(4 * 36 * geom.c * tps, False), self._buffer(4 * 36 * geom.o * pixels, False))
        v, m = self._transformed
        gemm, unused = wino.gemm, wino.gemm.w  # bindings a shader does not read still need a buffer
        transform_push = _PUSH.pack(geom.c, hp, wp, ps, geom.o, geom.oh, geom.ow, 1, 0, n, tps, *_NO_KERNEL,
                                    *layer.activation_parameters)
        gemm_push = gemm_1x1_push(36 * geom.c, pixels, tps, 36 * geom.o, 36, gemm.row_stride, 1)
        return [
            _vk.Dispatch(wino.input, [x_dev, x_dev, unused, unused, layer.b, v], transform_push,
                         (math.ceil(pixels / (4 * wino.lanes)), 1, geom.c)),  # 4 tiles per invocation
            _vk.Dispatch(gemm.pipeline, [v, v, gemm.w, gemm.w, layer.b, m], gemm_push,
                         work_groups(gemm.tiles, "gemm_1x1", 1, pixels, geom.o, 36)),
            _vk.Dispatch(wino.output, [m, m, unused, unused, layer.b, y_dev], transform_push,
                         (math.ceil(pixels / wino.lanes), 1, geom.o)),
        ]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, float | None]:
        g = self.geom
        for start, n, interior, _ in self.chunks:
            interior[...] = x[start:start + n]
        for buf in self._owned:
            if buf.host and not buf.coherent:
                buf.flush()
        seconds = self.recording.submit()
        outputs = [y_host.read(n * g.o * g.oh * g.ow).reshape(n, g.o, g.oh, g.ow) for _, n, _, y_host in self.chunks]
        return (outputs[0] if len(outputs) == 1 else np.concatenate(outputs)), seconds


class VulkanConv2d(Prepared):
    """A layer on one Vulkan device: packed weights, specialized pipelines, recorded plans per geometry."""

    def __init__(self, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device, self.spec = device, spec
        dev = self.dev = _vk.device(device.index)
        held = self._held = _DeviceObjects(dev)
        self._finalizer = held.released_with(self)
        act = spec.activation
        self.activation_parameters = (act.alpha, act.beta)
        epilogue = epilogue_constants(act.code, b is not None)
        self.winograd = None
        try:
            self.b = held.upload(b if b is not None else np.zeros(1, np.float32))
            tiles = choose_tiles(spec.algorithm, dev, spec.kw, spec.stride[1])
            unroll = unrolls(spec, tiles)
            kernel = {2: spec.kh, 3: spec.kw, 4: spec.stride[0], 5: spec.stride[1],
                      6: spec.dilation[0], 7: spec.dilation[1]} if unroll else {}
            self.conv = _Shader(held, spec.algorithm, tiles, w, spec.groups, {**kernel, **epilogue}, unroll)
            if (_winograd.fits(spec) and min(spec.in_channels, spec.out_channels) >= WINOGRAD_MIN_CHANNELS[self._kind]
                    and _Winograd.weights_fit(dev, spec)):
                self.winograd = _Winograd(held, spec, w, epilogue)
        except BaseException:
            self._finalizer()
            raise
        self._lock = threading.Lock()

    def padded_input(self, geom: Conv2dGeometry, winograd: bool) -> tuple[int, int, int]:
        """(HP, WP, PS): the zero-padded planes the shaders read, large enough for every fetch they make."""
        if winograd:  # whole 6x6 tiles, each row two vec4s
            th, tw = _winograd.tile_grid(geom)
            hp = max(geom.pt + geom.h, 4 * th + 2)
            wp = _round_up(max(geom.pl + geom.w, 4 * tw + 4), 4)
            return hp, wp, hp * wp
        t = self.conv.tiles
        if self.spec.algorithm == "gemm_1x1":
            return geom.h, geom.w, _round_up(geom.h * geom.w, max(4, t.tn))
        if self.conv.unroll and not t.stage:  # each run of tn outputs fetches whole vec4s of its rows
            span4 = -(-((t.tn - 1) * geom.sw + (geom.kw - 1) * geom.dw + 1) // 4)
            reach = (math.ceil(geom.ow / t.tn) - 1) * t.tn * geom.sw + 4 * span4
        else:  # single fetches, of live outputs only
            reach = (geom.ow - 1) * geom.sw + (geom.kw - 1) * geom.dw + 1
        hp = max(geom.pt + geom.h, (geom.oh - 1) * geom.sh + (geom.kh - 1) * geom.dh + 1)
        wp = _round_up(max(geom.pl + geom.w, reach), 4)
        return hp, wp, hp * wp

    def images_per_chunk(self, geom: Conv2dGeometry, winograd: bool) -> tuple[int, str]:
        """How many images one dispatch may take within the device's buffer limits, and, where that is
        not even one, why (the buffer and the limit)."""
        limits = self.dev.limits
        texel, storage = limits.maxTexelBufferElements, limits.maxStorageBufferRange
        # Floats per image of each buffer, and whether a shader reads it as texels, writes it, or both.
        hp, wp, ps = self.padded_input(geom, winograd)
        buffers = [(f"the input zero-padded to {hp}x{wp} per channel", geom.c * ps, True, False),
                   ("the output", geom.o * geom.oh * geom.ow, False, True)]
        if winograd:  # V (up to a GEMM pixel tile of padding per chunk) and M
            tiles = math.prod(_winograd.tile_grid(geom))
            v_floats = 36 * geom.c * (tiles + self.winograd.tile_plane(1))
            buffers += [("Winograd's transformed input", v_floats, True, True),
                        ("Winograd's tile products", 36 * geom.o * tiles, True, True)]
        fits = []
        for name, floats, read, written in buffers:
            if read:
                fits.append((texel // floats, f"{name} ({floats} floats)", f"maxTexelBufferElements ({texel} floats)"))
            if written:
                fits.append((storage // (4 * floats), f"{name} ({4 * floats} bytes)",
                             f"maxStorageBufferRange ({storage} bytes)"))
        images, what, limit = min(fits)
        return images, (f"vulkan: one image of {what} exceeds the device's {limit} (x of shape {geom.input_shape}, "
                        f"y of shape {geom.output_shape})")

    @property
    def _kind(self) -> str:
        return "cpu" if self.dev.type == "cpu" else "gpu"

    def uses_winograd(self, x: np.ndarray, geom: Conv2dGeometry) -> bool:
        """Winograd for enough tiles, buffers within the device's limits, and a finite input well inside
        float32's range (`_winograd.safe`)."""
        th, tw = _winograd.tile_grid(geom)
        return (self.winograd is not None and geom.n * th * tw >= WINOGRAD_MIN_TILES[self._kind]
                and self.images_per_chunk(geom, True)[0] >= 1 and _winograd.safe(x))

    def _plan(self, geom: Conv2dGeometry, winograd: bool) -> _Plan:
        return self._held.plan((geom, winograd), lambda: _Plan(self, geom, winograd))

    def profile(self, x, geom: Conv2dGeometry):
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError("this Vulkan layer is closed")
            return self._plan(geom, self.uses_winograd(x, geom)).run(x)

    def run(self, x, geom: Conv2dGeometry):
        return self.profile(x, geom)[0]

    def close(self) -> None:
        with self._lock:
            self._finalizer()


def prepare(backend, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo) -> Prepared:
    return VulkanConv2d(spec, w, b, device)
