"""deform_conv2d on Vulkan: the classic trio around conv2d's grouped 1x1 GEMM shader (conv2d_gemm_1x1, its
direct subgroup path on CPU devices, shared-memory tiles on GPUs), in one recorded command buffer per input
geometry, as conv2d's plans are.

Forward, per tile of the batch (backends/_deform.py): deform_conv2d_im2col samples the tile's columns into
the GEMM's input planes, the GEMM applies bias and activation into the tile's own output buffer, and the host
assembles y. Backward, per tile: dcol = W^T grad_y (a 1x1 layer of the transposed weights, its input the
tile of grad_y the host writes), deform_conv2d_col2im_coord for grad_offset and grad_mask,
deform_conv2d_col2im gathering grad_x through the inverse map the host builds each call, the tile's columns
pixel-major and grad_w = grad_y cols^T (a 1x1 GEMM whose weights deform_conv2d_pack makes from grad_y),
tiles added by deform_conv2d_accumulate; grad_b is summed on the host (float64, then rounded).

Deterministic: no atomics, every output element is summed by one invocation in a fixed order, tiles run in
sequence. Column buffers stay within COLUMN_BYTES and the device's buffer limits.
"""
from __future__ import annotations

import math
import struct
import threading

import numpy as np

from ...ops.deform_conv2d import DeformConv2dGeometry, DeformConv2dPrepared, DeformConv2dSpec
from ...runtime import DeviceInfo
from ...runtime import vulkan as _vk
from .. import _deform
from .conv2d import (PlanBuffers, Tiles, _DeviceObjects, _round_up, _Shader, choose_tiles, epilogue_constants,
                     gemm_1x1_push, tile_constants, work_groups)

_PUSH = struct.Struct("<30i")  # the geometry, the tile, six values of the shader (deform_conv2d_sampling.glsl)
_TEX, _STORE = _vk.TEXEL_FLOAT, _vk.STORAGE
# Bindings of each shader: 0 its input, 1 offset, 2 mask, then its own.
_KINDS = {
    "im2col": (_TEX, _TEX, _TEX, _STORE),
    "channels_last": (_TEX, _TEX, _TEX, _STORE),
    "cpu_im2col": (_vk.TEXEL_VEC4, _TEX, _TEX, _STORE),
    "col2im_coord": (_TEX, _TEX, _TEX, _TEX, _STORE, _STORE),
    "col2im": (_TEX, _TEX, _TEX, _STORE, _STORE, _TEX, _STORE),
    "pack": (_TEX, _TEX, _TEX, _STORE),
    "accumulate": (_TEX, _TEX, _TEX, _STORE),
}
# A tile's column buffer stays under this many bytes, by device kind (and under the device's buffer limits).
COLUMN_BYTES = {"cpu": 16 << 20, "gpu": 256 << 20}
_LANES = 64  # work-group width of the deform shaders
# Forward columns go in blocks of this many tile points, the GEMM's images (see deform_conv2d_im2col.comp).
# llvmpipe, measured: a GEMM over whole-tile rows ran about 1.5x slower (256->256 at 56x56); blocks of 32
# beat 16 and 64, and 8 pixels per lane with 32- or 64-point blocks ran up to 20x slower on 512->512 at 7x7.
COLUMN_BLOCK = 32
_LINEAR = epilogue_constants(0, False)  # the backward GEMMs: no bias, no activation


def _plane(pixels: int, tiles: Tiles) -> int:
    """The plane stride the GEMM's vec4 row reads need (conv2d's padded_input for gemm_1x1)."""
    return _round_up(pixels, max(4, tiles.tn))


def _operand_layout(tiles: Tiles, k: int, og: int) -> tuple[int, int, int, int, int, int]:
    """(kpad, ogp, block, s_g, s_mb, s_k) of conv2d's `pack_weights` for a 1x1 layer of k input channels per
    group: A[k][m] of group g at g * s_g + (m / block) * s_mb + k * s_k + m % block."""
    ogp = _round_up(og, tiles.tm * tiles.ly)
    if tiles.stage:  # [group][k padded to bk][ogp]
        kpad = _round_up(k, tiles.bk)
        return kpad, ogp, ogp, kpad * ogp, 0, ogp
    kpad = _round_up(k, tiles.cb)  # [group][ogp / tm][k padded to cb][tm]
    return kpad, ogp, tiles.tm, ogp * kpad, kpad * tiles.tm, tiles.tm


class _Plan(PlanBuffers):
    """Buffers and a recorded command buffer for one input geometry, in one direction. It keeps no reference
    to its layer (the layer's finalizer holds the plans)."""

    def __init__(self, layer: "VulkanDeformConv2d", geom: DeformConv2dGeometry):
        super().__init__(layer.dev)
        self.geom = geom
        self._pipelines, self._lanes, self._b = layer.pipelines, layer.lanes, layer.b
        self._activation = (layer.spec.activation.alpha, layer.spec.activation.beta)
        self._copies_in, self._copies_out, self._dispatches = [], [], []
        try:
            self._record(layer)
            self.recording = _vk.Recording(self.device, self._dispatches, self._copies_in, self._copies_out)
        except BaseException:
            self._release()
            raise

    def _record(self, layer: "VulkanDeformConv2d") -> None:
        raise NotImplementedError

    def _input(self, nbytes: int) -> tuple[_vk.Buffer, _vk.Buffer]:
        """(the host buffer a call writes, the buffer shaders read)."""
        return _vk.staged(self._buffer, self.device, nbytes, self._copies_in)

    def _output(self, nbytes: int) -> tuple[_vk.Buffer, _vk.Buffer]:
        """(the host buffer a call reads, the buffer shaders write)."""
        return _vk.staged(self._buffer, self.device, nbytes, self._copies_out)

    def _dispatch(self, shader: str, buffers: list, tile: _deform.Tile, extra: tuple, width: int, rows: int) -> None:
        push = _PUSH.pack(*tile.scalars(self.geom), *extra, *(0,) * (6 - len(extra)))
        groups = (math.ceil(width / self._lanes), rows, 1)
        self._dispatches.append(_vk.Dispatch(self._pipelines[shader], buffers, push, groups))

    def _gemm(self, shader: _Shader | tuple, x, y, c: int, pixels: int, o: int, n: int, weights=None,
              activation: tuple[float, float] = (0.0, 0.0)) -> None:
        """A conv2d_gemm_1x1 dispatch over n images: a _Shader (its weights) or (pipeline, tiles, row stride)
        with `weights`; `activation` the epilogue's (alpha, beta)."""
        g = self.geom
        if isinstance(shader, _Shader):
            pipeline, tiles, row_stride, weights = shader.pipeline, shader.tiles, shader.row_stride, shader.w
        else:
            pipeline, tiles, row_stride = shader
        push = gemm_1x1_push(c, pixels, _plane(pixels, tiles), o, g.groups, row_stride, n, activation)
        groups = work_groups(tiles, "gemm_1x1", 1, pixels, o // g.groups, n * g.groups)
        self._dispatches.append(_vk.Dispatch(pipeline, [x, x, weights, weights, self._b, y], push, groups))

    @staticmethod
    def _write(buf: _vk.Buffer, data: np.ndarray) -> None:
        buf.write(data.view(np.float32) if data.dtype != np.float32 else data)


class _ForwardPlan(_Plan):
    def _record(self, layer: "VulkanDeformConv2d") -> None:
        g = self.geom
        gemm = layer.columns
        self.x, x = self._input(4 * math.prod(g.input_shape))
        self.offset, offset = self._input(4 * math.prod(g.offset_shape))
        self.mask, mask = self._input(4 * math.prod(g.mask_shape)) if g.has_mask else (None, offset)
        tiles = layer.tiles(g)
        rows = g.c * g.taps
        self.block = block = _round_up(COLUMN_BLOCK, max(4, gemm.tiles.tn))
        cols = self._buffer(4 * max(self.blocks(t) for t in tiles) * block * rows, False)
        vector = self.device.type == "cpu" and g.c_per_offset_group % 4 == 0  # deform_conv2d_cpu_im2col.comp
        if vector:
            bordered = self._buffer(4 * g.n * (g.h + 3) * (g.w + 2) * g.c, False)
            whole = _deform.Tile(0, g.n, 0, g.oh * g.ow)
            self._dispatch("channels_last", [x, offset, mask, bordered], whole, (), g.w + 2, g.n * (g.h + 3))
        self.outputs = []
        for t in tiles:
            strides = (rows * block, 1, g.taps * block, 0, block, block)  # [point block][c * taps + k][point]
            if vector:
                self._dispatch("cpu_im2col", [bordered, offset, mask, cols], t, strides,
                               math.ceil(t.nb * t.count / 4), g.offset_groups)
            else:
                self._dispatch("im2col", [x, offset, mask, cols], t, strides, t.count, t.nb * g.offset_groups)
            y_host, y = self._output(4 * self.blocks(t) * block * g.o)
            self._gemm(gemm, cols, y, rows, block, g.o, self.blocks(t), activation=self._activation)
            self.outputs.append((t, y_host))

    def blocks(self, tile: _deform.Tile) -> int:
        return math.ceil(tile.nb * tile.count / self.block)

    def run(self, x: np.ndarray, offset: np.ndarray, mask) -> tuple[np.ndarray, float | None]:
        g = self.geom
        self.x.write(x)
        self.offset.write(offset)
        if mask is not None:
            self.mask.write(mask)
        seconds = self.recording.submit()
        y = np.empty(g.output_shape, np.float32)
        flat = y.reshape(g.n, g.o, g.oh * g.ow)
        for t, y_host in self.outputs:  # (blocks, O, block) back to (images, O, pixels)
            blocks = self.blocks(t)
            out = y_host.read(blocks * g.o * self.block).reshape(blocks, g.o, self.block).transpose(1, 0, 2)
            points = out.reshape(g.o, blocks * self.block)[:, :t.nb * t.count].reshape(g.o, t.nb, t.count)
            flat[t.n0:t.n0 + t.nb, :, t.p0:t.p0 + t.count] = points.transpose(1, 0, 2)
        return y, seconds


class _BackwardPlan(_Plan):
    def _record(self, layer: "VulkanDeformConv2d") -> None:
        g = self.geom
        stages = layer.backward_stages()
        dcol_gemm, grad_w_tiles = stages.dcol, stages.grad_w_tiles
        self.x, x = self._input(4 * math.prod(g.input_shape))
        self.offset, offset = self._input(4 * math.prod(g.offset_shape))
        self.mask, mask = self._input(4 * math.prod(g.mask_shape)) if g.has_mask else (None, offset)
        self.grad_y, grad_y = self._input(4 * math.prod(g.output_shape))
        self.grad_x, grad_x = self._output(4 * math.prod(g.input_shape))
        self.grad_offset, grad_offset = self._output(4 * math.prod(g.offset_shape))
        self.grad_mask, grad_mask = self._output(4 * math.prod(g.mask_shape)) if g.has_mask else (None, grad_offset)
        self.grad_w, grad_w = self._output(4 * math.prod(g.weight_shape))
        tiles = layer.tiles(g)
        rows, jg, og = g.c * g.taps, g.cg * g.taps, g.og
        largest = max(t.nb * t.count for t in tiles)
        dcol = self._buffer(4 * largest * rows, False)
        cols = self._buffer(4 * g.groups * largest * _plane(jg, grad_w_tiles), False)
        layouts = [_operand_layout(grad_w_tiles, t.nb * t.count, og) for t in tiles]
        packed = self._buffer(4 * (max(g.groups * s_g for _, _, _, s_g, _, _ in layouts) + 4 * grad_w_tiles.lx), False)
        partial = self._buffer(4 * g.o * jg, False) if len(tiles) > 1 else None
        cells = (g.h + 1) * (g.w + 1)
        self.tiles = []
        for i, (t, layout) in enumerate(zip(tiles, layouts)):
            k = t.nb * t.count
            gy_host, gy_tile = self._input(4 * t.nb * g.o * _plane(t.count, dcol_gemm.tiles))
            self._gemm(dcol_gemm, gy_tile, dcol, g.o, t.count, rows, t.nb)
            self._dispatch("col2im_coord", [x, offset, mask, dcol, grad_offset, grad_mask], t, (), t.count,
                           t.nb * g.offset_groups * g.taps)
            starts_host, starts = self._input(4 * (t.nb * g.offset_groups * cells + 1))
            points_host, points = self._input(4 * k * g.offset_groups * g.taps)
            weights_host, weights = self._input(16 * k * g.offset_groups * g.taps)
            self._dispatch("col2im", [dcol, offset, mask, starts, points, weights, grad_x], t, (int(t.p0 > 0),),
                           g.h * g.w, t.nb * g.c)
            plane = _plane(jg, grad_w_tiles)  # [weight group][n * count + p][c * taps + k], planes `plane` apart
            strides = (0, plane, g.taps, k * plane - jg, 1, k)
            self._dispatch("im2col", [x, offset, mask, cols], t, strides, t.count, t.nb * g.offset_groups)
            kpad, ogp = layout[:2]
            self._dispatch("pack", [grad_y, offset, mask, packed], t, layout, kpad, g.groups * ogp)
            first = i == 0
            self._gemm((stages.grad_w_pipeline, grad_w_tiles, ogp), cols, grad_w if first else partial, g.groups * k,
                       jg, g.o, 1, packed)
            if not first:
                self._dispatch("accumulate", [partial, offset, mask, grad_w], t, (g.o * jg,), g.o * jg, 1)
            self.tiles.append((t, gy_host, _plane(t.count, dcol_gemm.tiles), (starts_host, points_host, weights_host)))

    def run(self, grad_y, x, offset, mask) -> tuple[tuple, float | None]:
        g = self.geom
        for buf, array in ((self.x, x), (self.offset, offset), (self.mask, mask), (self.grad_y, grad_y)):
            if array is not None:
                buf.write(array)
        flat = grad_y.reshape(g.n, g.o, g.oh * g.ow)
        for t, gy_host, plane, maps in self.tiles:
            tile = np.zeros((t.nb, g.o, plane), np.float32)
            tile[:, :, :t.count] = flat[t.n0:t.n0 + t.nb, :, t.p0:t.p0 + t.count]
            gy_host.write(tile)
            for buf, table in zip(maps, _deform.inverse_map(offset, mask, g, t)):
                self._write(buf, table)
        seconds = self.recording.submit()
        grads = [None if buf is None else buf.read(math.prod(shape)).reshape(shape) for buf, shape in (
            (self.grad_x, g.input_shape), (self.grad_offset, g.offset_shape),
            (self.grad_mask if mask is not None else None, g.mask_shape), (self.grad_w, g.weight_shape))]
        grad_b = grad_y.sum(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)
        return (*grads, grad_b), seconds


class _Backward:
    """What backward adds to a layer, made on its first backward: the dcol GEMM (W^T) and grad_w's GEMM
    pipeline, whose weights each call packs."""

    def __init__(self, held: _DeviceObjects, spec: DeformConv2dSpec, w: np.ndarray):
        tiles = self.grad_w_tiles = choose_tiles("gemm_1x1", held.dev)
        self.dcol = _Shader(held, "gemm_1x1", tiles, _deform.transposed_weights(w, spec.groups), spec.groups, _LINEAR)
        self.grad_w_pipeline = held.shader_pipeline("conv2d_gemm_1x1", {**_LINEAR, **tile_constants(tiles)})


class VulkanDeformConv2d(DeformConv2dPrepared):
    """A deformable layer on one Vulkan device: pipelines, the forward GEMM's packed weights, recorded plans,
    all held as conv2d's layers hold theirs (released on close() or when the layer is collected)."""

    def __init__(self, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
        self.device, self.spec = device, spec
        dev = self.dev = _vk.device(device.index)
        held = self._held = _DeviceObjects(dev)
        self._finalizer = held.released_with(self)
        limits = dev.limits
        self.lanes = min(_LANES, limits.maxComputeWorkGroupSize[0], limits.maxComputeWorkGroupInvocations)
        self._w = w.copy()  # for the backward GEMMs, made on first use
        self._backward = None
        try:
            self.pipelines = {name: held.shader_pipeline(f"deform_conv2d_{name}", {0: self.lanes}, kinds, _PUSH.size)
                              for name, kinds in _KINDS.items()}
            self.b = held.upload(b if b is not None else np.zeros(1, np.float32))
            self.columns = _Shader(held, "gemm_1x1", choose_tiles("gemm_1x1", dev), _deform.column_weights(w),
                                   spec.groups, epilogue_constants(spec.activation.code, b is not None))
        except BaseException:
            self._finalizer()
            raise
        self._lock = threading.Lock()

    def tiles(self, geom: DeformConv2dGeometry) -> list[_deform.Tile]:
        limits = self.dev.limits
        cap = min(COLUMN_BYTES["cpu" if self.dev.type == "cpu" else "gpu"], limits.maxStorageBufferRange,
                  4 * limits.maxTexelBufferElements) // 2  # room for the GEMMs' plane padding
        self._check_limits(geom)
        return _deform.tiles(geom, cap)

    def _check_limits(self, geom: DeformConv2dGeometry) -> None:
        """Whole-batch arrays are single buffers: each must fit the device's buffer limits."""
        limits = self.dev.limits
        for name, shape in (("x", geom.input_shape), ("offset", geom.offset_shape), ("y", geom.output_shape)):
            size = math.prod(shape)
            if size > limits.maxTexelBufferElements or 4 * size > limits.maxStorageBufferRange:
                raise ValueError(
                    f"vulkan: {name} of shape {shape} exceeds the device's maxTexelBufferElements "
                    f"({limits.maxTexelBufferElements} floats) or maxStorageBufferRange "
                    f"({limits.maxStorageBufferRange} bytes); split the batch")

    def backward_stages(self) -> _Backward:
        if self._backward is None:
            self._backward = _Backward(self._held, self.spec, self._w)
        return self._backward

    def _plan(self, geom: DeformConv2dGeometry, kind: type) -> _Plan:
        return self._held.plan((geom, kind), lambda: kind(self, geom))

    def profile(self, x, offset, mask, geom: DeformConv2dGeometry):
        with self._lock:
            self._check_open()
            if geom.n == 0:
                return np.empty(geom.output_shape, np.float32), None
            return self._plan(geom, _ForwardPlan).run(x, offset, mask)

    def run(self, x, offset, mask, geom: DeformConv2dGeometry):
        return self.profile(x, offset, mask, geom)[0]

    def profile_backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        with self._lock:
            self._check_open()
            if geom.n == 0:
                shapes = (geom.input_shape, geom.offset_shape, geom.mask_shape if mask is not None else None)
                grads = [None if s is None else np.zeros(s, np.float32) for s in shapes]
                return (*grads, np.zeros(geom.weight_shape, np.float32), np.zeros(geom.o, np.float32)), None
            return self._plan(geom, _BackwardPlan).run(grad_y, x, offset, mask)

    def backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        return self.profile_backward(grad_y, x, offset, mask, geom)[0]

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise ValueError("this Vulkan layer is closed")

    def close(self) -> None:
        with self._lock:
            self._finalizer()


def prepare(backend, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None, device: DeviceInfo):
    return VulkanDeformConv2d(spec, w, b, device)
