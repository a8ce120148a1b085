"""Vulkan backend: embedded SPIR-V (shaders/ via tools/build_spirv.py) run through the `vulkan` bindings.

Per-layer values (kernel, stride, dilation, activation, tiles) are specialization constants, shapes are push
constants, so one pipeline serves every input size of a layer. Each input geometry gets its buffers and a
command buffer recorded once; a call then only writes x (zero-padded, see conv2d_layout.glsl), submits,
waits and reads y.
"""
from __future__ import annotations

import math
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import vulkan as vk

from ..spec import Conv2dGeometry, Conv2dSpec
from . import _vk
from .base import Backend, BackendUnavailable, DeviceInfo, Prepared
from .vulkan_spirv import SPIRV

_PLANS_KEPT = 4  # recorded geometries kept per layer; older ones go back to the pool
# x, x as vec4, w, w as vec4, b, y: the bindings of shaders/conv2d_layout.glsl.
_BINDINGS = (_vk.TEXEL_FLOAT, _vk.TEXEL_VEC4, _vk.TEXEL_FLOAT, _vk.TEXEL_VEC4, _vk.TEXEL_FLOAT, _vk.STORAGE)
_PUSH = struct.Struct("<9i")  # C, HP, WP, PS, O, OH, OW, GROUPS, OGP


class VulkanBackend(Backend):
    name = "vulkan"

    def _enumerate(self) -> list[DeviceInfo]:
        try:
            found = _vk.physical_devices()
            return [DeviceInfo(self.name, i, *_vk.describe(p)) for i, p in enumerate(found)]
        except vk.VkError as exc:
            raise BackendUnavailable(f"vulkan: no usable driver ({type(exc).__name__})") from None

    def prepare(self, spec: Conv2dSpec, w, b, device: DeviceInfo) -> Prepared:
        return VulkanConv2d(spec, w, b, device)


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


def choose_tiles(spec: Conv2dSpec, dev: _vk.Device) -> Tiles:
    """Tiles by device kind, shrunk to the device's limits.

    llvmpipe runs a work group as SIMD lanes of one CPU thread and emulates shared memory and barriers
    slowly, so CPU devices take the direct path: one subgroup per work group, a 16 x 4 register tile,
    vec4 fetches, weights passed between lanes by shuffles. GPUs stage tiles in shared memory.
    Depthwise uses neither; wide work groups amortise llvmpipe's per-group cost. Tile sizes were
    measured on llvmpipe (AVX2, 8 lanes); the GPU ones are conventional and untuned.
    """
    limits = dev.limits
    lanes = dev.subgroup_size
    direct = (dev.type == "cpu" and 4 <= lanes <= limits.maxComputeWorkGroupSize[0]
              and lanes <= limits.maxComputeWorkGroupInvocations)
    if spec.algorithm == "depthwise":  # no subgroup operations: any work-group width
        width = min(64, limits.maxComputeWorkGroupSize[0], limits.maxComputeWorkGroupInvocations)
        return Tiles(width, 1, 1, 8 if direct else 4, 1, False)
    if not dev.subgroup_shuffle:
        raise ValueError("vulkan: the device has no subgroup shuffles in compute shaders, which the GEMM "
                         "shaders declare (Vulkan's subgroupSupportedOperations)")
    if direct:
        return Tiles(lanes, 1, 16, 4, 1, False, 8 if spec.algorithm == "gemm_1x1" else 1)
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


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class _Plan:
    """Buffers and a recorded command buffer for one input geometry, split by batch where a buffer would
    exceed maxTexelBufferElements or maxStorageBufferRange."""

    def __init__(self, layer: "VulkanConv2d", geom: Conv2dGeometry):
        dev = self.device = layer.dev
        self.geom = geom
        hp, wp, ps = self.padded = layer.padded_input(geom)
        in_image, out_image = geom.c * ps, geom.o * geom.oh * geom.ow
        limits = dev.limits
        per_chunk = min(limits.maxTexelBufferElements // in_image, limits.maxStorageBufferRange // (4 * out_image))
        if per_chunk < 1:
            raise ValueError(
                f"vulkan: one image of input {geom.input_shape[1:]} or output {geom.output_shape[1:]} exceeds the "
                f"device's maxTexelBufferElements ({limits.maxTexelBufferElements} floats) or "
                f"maxStorageBufferRange ({limits.maxStorageBufferRange} bytes)"
            )
        push = _PUSH.pack(geom.c, hp, wp, ps, geom.o, geom.oh, geom.ow, geom.groups, layer.row_stride)
        self.chunks, self._owned = [], []
        try:
            self.recording = self._record(layer, geom, per_chunk, push)
        except BaseException:
            self._release()
            raise

    def _record(self, layer: "VulkanConv2d", geom: Conv2dGeometry, per_chunk: int, push: bytes) -> _vk.Recording:
        dev, (hp, wp, ps) = self.device, self.padded
        in_image, out_image = geom.c * ps, geom.o * geom.oh * geom.ow
        dispatches, copies_in, copies_out = [], [], []
        for start in range(0, geom.n, per_chunk):
            n = min(per_chunk, geom.n - start)
            x_host = self._buffer(4 * n * in_image, True)
            x_host.array[:] = 0  # the padding stays zero; run() only writes the interior
            y_host = self._buffer(4 * n * out_image, True)
            x_dev, y_dev = x_host, y_host
            if not dev.unified:
                x_dev = self._buffer(x_host.nbytes, False)
                y_dev = self._buffer(y_host.nbytes, False)
                copies_in.append((x_host, x_dev))
                copies_out.append((y_host, y_dev))
            interior = x_host.array[: n * in_image].reshape(n, geom.c, ps)[:, :, : hp * wp].reshape(n, geom.c, hp, wp)
            interior = interior[:, :, geom.pt:geom.pt + geom.h, geom.pl:geom.pl + geom.w]
            self.chunks.append((start, n, interior, y_host))
            buffers = [x_dev, x_dev, layer.w, layer.w, layer.b, y_dev]
            dispatches.append(_vk.Dispatch(layer.pipeline, buffers, push, layer.groups(geom, n)))
        return _vk.Recording(dev, dispatches, copies_in, copies_out)

    def _buffer(self, nbytes: int, host: bool) -> _vk.Buffer:
        buf = self.device.acquire(nbytes, host)
        self._owned.append(buf)
        return buf

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

    def close(self) -> None:
        self.recording.close()
        self._release()

    def _release(self) -> None:
        for buf in self._owned:
            self.device.release(buf)
        self._owned = []


class VulkanConv2d(Prepared):
    """A layer on one Vulkan device: packed weights, a specialized pipeline, recorded plans per geometry."""

    def __init__(self, spec: Conv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device, self.spec = device, spec
        dev = self.dev = _vk.device(device.index)
        t = self.tiles = choose_tiles(spec, dev)
        packed, self.row_stride = self._pack(w)
        if packed.size > dev.limits.maxTexelBufferElements:
            raise ValueError(
                f"vulkan: the packed weights ({packed.size} floats) exceed the device's maxTexelBufferElements "
                f"({dev.limits.maxTexelBufferElements})"
            )
        act = spec.activation
        constants = {0: t.lx, 1: t.ly, 2: spec.kh, 3: spec.kw, 4: spec.stride[0], 5: spec.stride[1],
                     6: spec.dilation[0], 7: spec.dilation[1], 8: act.code, 9: act.alpha, 10: act.beta,
                     11: b is not None, 12: t.tm, 13: t.tn, 14: t.bk, 15: t.stage, 16: t.cb}
        shader = f"conv2d_{spec.algorithm}"
        self.pipeline = dev.pipeline(shader, SPIRV[shader], constants, _BINDINGS, _PUSH.size)
        self.w = _vk.upload(dev, packed)
        self.b = _vk.upload(dev, b if b is not None else np.zeros(1, np.float32))
        self._plans: OrderedDict[Conv2dGeometry, _Plan] = OrderedDict()
        self._lock = threading.Lock()

    def _pack(self, w: np.ndarray) -> tuple[np.ndarray, int]:
        """Weights in the order the shader walks them, zero-padded to whole tiles so it never checks bounds,
        and the padded output channels per group (the shaders' OGP).

        Staged: [group][k][o], a K step reads a run of output channels. Direct: [group][channel tile][c]
        [kh*kw][tm] with c padded to whole blocks of cb, plus one lane-fetch of slack at the end.
        Depthwise: as given, (O, kh*kw).
        """
        spec, t = self.spec, self.tiles
        if spec.is_depthwise:
            return np.ascontiguousarray(w.reshape(spec.out_channels, spec.kh * spec.kw)), 0
        g, og, cg = spec.groups, spec.out_channels // spec.groups, w.shape[1]
        taps = spec.kh * spec.kw
        ogp = _round_up(og, t.tm * t.ly)
        if t.stage:
            packed = np.zeros((g, _round_up(cg * taps, t.bk), ogp), np.float32)
            packed[:, :cg * taps, :og] = w.reshape(g, og, cg * taps).transpose(0, 2, 1)
            return packed.reshape(-1), ogp
        cg_padded = _round_up(cg, t.cb)
        padded = np.zeros((g, ogp, cg_padded, taps), np.float32)
        padded[:, :og, :cg] = w.reshape(g, og, cg, taps)
        blocks = padded.reshape(g, ogp // t.tm, t.tm, cg_padded, taps).transpose(0, 1, 3, 4, 2)
        return np.concatenate([blocks.reshape(-1), np.zeros(4 * t.lx, np.float32)]), ogp

    def padded_input(self, geom: Conv2dGeometry) -> tuple[int, int, int]:
        """(HP, WP, PS): the zero-padded planes the shaders read, large enough for every fetch they make."""
        t = self.tiles
        if self.spec.algorithm == "gemm_1x1":
            return geom.h, geom.w, _round_up(geom.h * geom.w, max(4, t.tn))
        span4 = -(-((t.tn - 1) * geom.sw + (geom.kw - 1) * geom.dw + 1) // 4)
        last_tile = (math.ceil(geom.ow / t.tn) - 1) * t.tn
        hp = max(geom.pt + geom.h, (geom.oh - 1) * geom.sh + (geom.kh - 1) * geom.dh + 1)
        wp = _round_up(max(geom.pl + geom.w, last_tile * geom.sw + 4 * span4), 4)
        return hp, wp, hp * wp

    def groups(self, geom: Conv2dGeometry, n: int) -> tuple[int, int, int]:
        """Work-group counts for n images; batch (and group or channel plane) ride on z."""
        t = self.tiles
        row_items = geom.oh * math.ceil(geom.ow / t.tn)  # an item: tn neighbouring outputs of a row
        if self.spec.is_depthwise:
            return (math.ceil(row_items / t.lx), 1, n * geom.o)
        channel_tiles = math.ceil(geom.og / (t.tm * t.ly))
        if t.stage:
            return (math.ceil(geom.oh * geom.ow / (t.tn * t.lx)), channel_tiles, n * geom.groups)
        items = math.ceil(geom.oh * geom.ow / t.tn) if self.spec.algorithm == "gemm_1x1" else row_items
        return (math.ceil(items / t.lx), channel_tiles, n * geom.groups)

    def _plan(self, geom: Conv2dGeometry) -> _Plan:
        plan = self._plans.pop(geom, None) or _Plan(self, geom)
        self._plans[geom] = plan
        while len(self._plans) > _PLANS_KEPT:
            self._plans.popitem(last=False)[1].close()
        return plan

    def profile(self, x, geom: Conv2dGeometry):
        with self._lock:
            if self.w is None:
                raise ValueError("this Vulkan layer is closed")
            return self._plan(geom).run(x)

    def run(self, x, geom: Conv2dGeometry):
        return self.profile(x, geom)[0]

    def close(self) -> None:
        with self._lock:
            if self.w is None:
                return
            for plan in self._plans.values():
                plan.close()
            self._plans.clear()
            self.dev.release(self.w)
            self.dev.release(self.b)
            self.w = self.b = None


BACKEND = VulkanBackend()
