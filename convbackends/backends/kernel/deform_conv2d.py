"""deform_conv2d on OpenCL and CUDA, from one kernel source (kernels/deform_conv2d_*.h); the GEMMs are grouped
1x1 conv2d layers of the same device (conv2d's `Plan`, so conv2d_cpu_gemm on CPU devices and the tiled
conv2d_gemm_1x1 on GPUs), as Winograd's are.

Forward: CPU devices sample a tile's columns (deform_conv2d_im2col) and run the column GEMM with the layer's
bias and activation; GPUs sample inside the GEMM's load stage (deform_conv2d_implicit_gemm, no column buffer).
Backward, per tile of the batch (_deform.tiles): dcol = W^T grad_y (a 1x1 layer of the transposed weights),
deform_conv2d_col2im_coord for grad_offset and grad_mask, deform_conv2d_col2im gathering grad_x through the
host's inverse map (_deform.inverse_map; device inputs have offset and mask read back for it), then the tile's
columns pixel-major and grad_w = grad_y cols^T (a 1x1 layer whose weights are grad_y, repacked per call by
deform_conv2d_pack), tiles added in order; grad_b a sum per channel.

Deterministic on every device: no atomics; each output element is summed by one work-item in a fixed order
and tiles run in sequence. Column buffers stay within COLUMN_BYTES and the device's largest buffer, so
memory is bounded by the layer, not the batch. Threads may share a layer: what calls share (kernels,
weights, tables) is read-only once made, and each call allocates its own buffers from the runtime's pool.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import replace

import numpy as np

from ...ops.deform_conv2d import DeformConv2dGeometry, DeformConv2dPrepared, DeformConv2dSpec
from ...runtime.kernels import CallBuffer, GeometryCache, KernelRuntime, Launch, images_per_chunk, source
from ...spec import Conv2dSpec
from .. import _deform
from .conv2d import _pack, _Stage, choose_tiles, fit_plan

IM2COL_SOURCE = ("deform_conv2d_sampling.h", "deform_conv2d_im2col.h")
IMPLICIT_GEMM_SOURCE = ("gemm_tile.h", "deform_conv2d_sampling.h", "deform_conv2d_implicit_gemm.h")
CPU_SOURCE = ("deform_conv2d_sampling.h", "deform_conv2d_cpu_im2col.h")  # OpenCL only
# deform_conv2d_cpu_gemm's work-item: CPU_GEMM_PB points x CPU_GEMM_OB out-channels (OB of the kernel).
CPU_GEMM_PB = 12
CPU_GEMM_OB = 32
# Channel blocks per work-group (sharing its points' columns): 2 ran steadier than 1 on PoCL under load.
CPU_GEMM_ROWS = 2
KERNEL_NAMES = ("deform_conv2d_im2col", "deform_conv2d_col2im", "deform_conv2d_col2im_coord", "deform_conv2d_pack",
                "deform_conv2d_copy_pixels", "deform_conv2d_bias_grad", "deform_conv2d_accumulate")
# A tile's column buffer (pixels x C * taps floats) stays under this many bytes, by device kind. CPU: small
# enough that a tile's columns stay in the caches between im2col and GEMM. GPU: conventional, not measured.
COLUMN_BYTES = {"cpu": 8 << 20, "gpu": 256 << 20}
# Work-group width of the kernels above; their second launch dimension (rows) stays within CUDA's grid.
LOCAL_SIZE = 64
MAX_ROWS = 65535


def _rows_launch(width: int, rows: int, local: int, scalars: tuple) -> Launch:
    """Work-items (x < width, row): x over work-groups of `local`, one row per work-group row."""
    return Launch((max(1, math.ceil(width / local)) * local, rows, 1), (local, 1, 1), scalars)


def _i32(*values) -> tuple:
    return tuple(np.int32(v) for v in values)


def _gemm(rt: KernelRuntime, w: np.ndarray, b=None, groups: int = 1, activation=None,
          upload_weights: bool = True) -> _Stage:
    """A grouped 1x1 conv2d layer of weights w (its packed form uploaded unless each call brings it)."""
    spec = Conv2dSpec.create(w, b, groups=groups, activation=activation)
    plan, kernel = fit_plan(spec, w, b, rt.limits, lambda p: rt.kernel(p.source, p.kernel_name, p.options),
                            rt.max_threads)
    return _Stage(rt, plan, kernel, upload_weights)


def implicit_gemm_options(tiles, activation_code: int, index_type: str) -> tuple[str, ...]:
    return tuple(f"-D{k}={v}" for k, v in tiles.defines().items()) + (
        f"-DACTIVATION={activation_code}", f"-DINDEX_T={index_type}")


def operand_layout(plan) -> tuple[int, int, int, int, int, int]:
    """(kpad, ogpad, block, s_g, s_mb, s_k): where a 1x1 Plan's packed weights keep A[k][m] of group g,
    g * s_g + (m / block) * s_mb + k * s_k + m % block (conv2d.py's `_pack` and `Plan`)."""
    og = plan.spec.out_channels // plan.spec.groups
    if plan.algorithm == "depthwise":  # one input channel per group: w as given, (O,)
        return 1, og, og, og, 0, og
    if plan.algorithm == "cpu_gemm":  # [group][ogpad / 8][kpad][8]
        return plan.kpad, plan.ogpad, 8, plan.kpad * plan.ogpad, 8 * plan.kpad, 8
    return plan.kpad, plan.ogpad, plan.ogpad, plan.kpad * plan.ogpad, 0, plan.ogpad  # [group][kpad][ogpad]


class _ImplicitGemm:
    """deform_conv2d_implicit_gemm for one layer: GPU tiles (re-chosen once if the built kernel allows fewer
    work-items than the device), weights packed as conv2d_implicit_gemm's."""

    def __init__(self, rt: KernelRuntime, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None):
        groups, og = spec.groups, spec.out_channels // spec.groups
        self.kdim = (spec.in_channels // groups) * spec.kh * spec.kw
        limits = rt.limits
        for _ in range(2):
            self.tiles = choose_tiles(og, limits)
            options = implicit_gemm_options(self.tiles, spec.activation.code, limits.index_type)
            self.kernel = rt.kernel(source(*IMPLICIT_GEMM_SOURCE), "deform_conv2d_implicit_gemm", options)
            allowed = int(rt.max_threads(self.kernel))
            if self.tiles.threads <= allowed:
                break
            limits = replace(limits, max_threads=allowed)
        self.kpad = math.ceil(self.kdim / self.tiles.tk) * self.tiles.tk
        self.ogpad = math.ceil(og / self.tiles.tm) * self.tiles.tm
        packed = _pack(w, groups, og, self.kdim, self.kpad, self.ogpad)
        if packed.nbytes > rt.limits.max_alloc:
            raise ValueError(f"{rt.info.backend}: the packed weights need {packed.nbytes} bytes, more than the "
                             f"device's largest buffer ({rt.max_alloc_name}: {rt.limits.max_alloc} bytes)")
        self.weights = rt.upload(packed)
        self.bias = rt.upload(b if b is not None else np.zeros(spec.out_channels, np.float32))
        self.activation = spec.activation

    def launch(self, geom: DeformConv2dGeometry) -> Launch:
        t, npix = self.tiles, geom.oh * geom.ow
        ptiles = math.ceil(npix / t.tn)
        lx, ly, _ = t.local_size
        return Launch((ptiles * geom.n * geom.groups * lx, (self.ogpad // t.tm) * ly, 1), t.local_size,
                      _i32(*_deform.Tile(0, geom.n, 0, npix).scalars(geom), self.kdim, self.kpad, self.ogpad, ptiles)
                      + (np.float32(self.activation.alpha), np.float32(self.activation.beta)))


class _CpuColumns:
    """The CPU forward (deform_conv2d_cpu_im2col.h): the channels-last copy, point-major columns and their
    GEMM, with the weights packed [group][CPU_GEMM_OB-channel block][tap][c][CPU_GEMM_OB]."""

    def __init__(self, rt: KernelRuntime, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None):
        groups, og, cg, taps = spec.groups, spec.out_channels // spec.groups, spec.in_channels // spec.groups, \
            spec.kh * spec.kw
        self.oblocks = math.ceil(og / CPU_GEMM_OB)
        padded = np.zeros((groups, self.oblocks * CPU_GEMM_OB, cg, taps), np.float32)
        padded[:, :og] = w.reshape(groups, og, cg, taps)
        packed = padded.reshape(groups, self.oblocks, CPU_GEMM_OB, cg, taps).transpose(0, 1, 4, 3, 2)
        self.weights = rt.upload(np.ascontiguousarray(packed))
        self.bias = rt.upload(b if b is not None else np.zeros(spec.out_channels, np.float32))
        options = (f"-DPTS={CPU_GEMM_PB}", f"-DACTIVATION={spec.activation.code}", f"-DINDEX_T={rt.limits.index_type}")
        self.kernels = {name: rt.kernel(source(*CPU_SOURCE), f"deform_conv2d_{name}", options)
                        for name in ("channels_last", "cpu_im2col", "cpu_gemm")}
        self.groups, self.activation = groups, spec.activation

    @staticmethod
    def blocks(tile: _deform.Tile) -> int:
        return math.ceil(tile.nb * tile.count / CPU_GEMM_PB)

    def gemm_launch(self, geom: DeformConv2dGeometry, tile: _deform.Tile) -> Launch:
        rows = self.groups * self.oblocks
        return Launch((self.blocks(tile), math.ceil(rows / CPU_GEMM_ROWS) * CPU_GEMM_ROWS, 1), (1, CPU_GEMM_ROWS, 1),
                      _i32(*tile.scalars(geom), self.oblocks)
                      + (np.float32(self.activation.alpha), np.float32(self.activation.beta)))


class _Backward:
    """What backward adds to a layer, made on its first backward: the dcol GEMM (W^T) and grad_w's GEMMs,
    one per tile size (their weights come with each call)."""

    def __init__(self, rt: KernelRuntime, spec: DeformConv2dSpec, w: np.ndarray):
        self.dcol = _gemm(rt, _deform.transposed_weights(w, spec.groups), groups=spec.groups)
        o, groups = spec.out_channels, spec.groups
        self.grad_w = GeometryCache(lambda k: _gemm(rt, np.zeros((o, k, 1, 1), np.float32), groups=groups,
                                                    upload_weights=False), size=4)

    def clear(self) -> None:
        self.dcol.clear()
        self.grad_w.clear()


class KernelDeformPrepared(DeformConv2dPrepared):
    """A deformable layer on one device: the forward's column GEMM (CPU) or implicit GEMM (GPU), the helper
    kernels, and the backward's GEMMs once backward is called."""

    def __init__(self, rt: KernelRuntime, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None):
        self.device, self.spec, self._rt = rt.info, spec, rt
        self._w = w.copy()  # for the backward GEMMs, made on first use
        self._kind = "cpu" if rt.limits.is_cpu else "gpu"
        self._local = min(LOCAL_SIZE, rt.limits.max_threads)
        options = (f"-DINDEX_T={rt.limits.index_type}",)
        self._k = {name.removeprefix("deform_conv2d_"): rt.kernel(source(*IM2COL_SOURCE), name, options)
                   for name in KERNEL_NAMES}
        self._columns = self._implicit = None
        if rt.limits.is_cpu:
            self._columns = _CpuColumns(rt, spec, w, b)
        else:
            self._implicit = _ImplicitGemm(rt, spec, w, b)
        self._backward = None
        self._lock = threading.Lock()
        self._closed = False

    # -- sizes ----------------------------------------------------------------------------------------------
    def _tiles(self, geom: DeformConv2dGeometry) -> list[_deform.Tile]:
        cap = min(COLUMN_BYTES[self._kind], self._rt.limits.max_alloc)
        rows = max(geom.c, geom.o, geom.offset_groups * geom.taps)
        tiles = _deform.tiles(geom, cap)
        if any(t.nb * rows > MAX_ROWS for t in tiles):  # more images than a launch's rows may hold
            step = max(1, MAX_ROWS // rows)
            tiles = [_deform.Tile(n0, min(step, t.n0 + t.nb - n0), t.p0, t.count)
                     for t in tiles for n0 in range(t.n0, t.n0 + t.nb, step)]
        return tiles

    def _chunks(self, geom: DeformConv2dGeometry) -> list[tuple[int, DeformConv2dGeometry]]:
        """Host arrays go to the device in parts of the batch whose arrays (inputs, and outputs or gradients of
        the same sizes) each fit its largest buffer."""
        pixels, images = geom.oh * geom.ow, geom.h * geom.w
        arrays = {"copy of x": geom.c * images, "copy of offset": 2 * geom.offset_groups * geom.taps * pixels,
                  "copy of mask": geom.offset_groups * geom.taps * pixels, "buffer for y": geom.o * pixels}
        buffers = [CallBuffer(name, 4 * size) for name, size in arrays.items()]
        rt = self._rt
        per_chunk = images_per_chunk(geom.n, buffers, rt.limits.max_alloc, rt.max_alloc_name, self.device.backend)
        return [(start, replace(geom, n=min(per_chunk, geom.n - start))) for start in range(0, geom.n, per_chunk)]

    def _check_whole(self, geom: DeformConv2dGeometry, shapes: dict) -> None:
        """Device arrays are taken and returned whole: each must fit the device's largest buffer."""
        rt = self._rt
        for name, shape in shapes.items():
            nbytes = 4 * math.prod(shape)
            if nbytes > rt.limits.max_alloc:
                raise ValueError(
                    f"{self.device.backend}: {name} needs {nbytes} bytes, more than the device's largest buffer "
                    f"({rt.max_alloc_name}: {rt.limits.max_alloc} bytes); pass numpy arrays to run the batch in parts")

    def _launch(self, name: str, launch: Launch, buffers: list) -> None:
        self._rt.launch(self._k[name], launch, buffers)

    def _gemm_steps(self, stage: _Stage, x, y, geom, weights=None) -> None:
        for kernel, launch, buffers in stage.steps(x, y, geom, weights):
            self._rt.launch(kernel, launch, buffers)

    def _copy_pixels(self, src, dst, rows: int, count: int, src_stride: int, src_start: int, dst_stride: int,
                     dst_start: int) -> None:
        scalars = _i32(count, src_stride) + (np.int64(src_start),) + _i32(dst_stride) + (np.int64(dst_start),)
        self._launch("copy_pixels", _rows_launch(count, rows, self._local, scalars), [src, dst])

    # -- forward --------------------------------------------------------------------------------------------
    def _forward(self, x, offset, mask, y, geom: DeformConv2dGeometry) -> None:
        """y = the layer at (x, offset, mask): device buffers of one batch (mask: any buffer without one)."""
        if self._implicit is not None:
            self._rt.launch(self._implicit.kernel, self._implicit.launch(geom),
                            [x, offset, mask, self._implicit.weights, self._implicit.bias, y])
            return
        rt, g, cpu = self._rt, geom, self._columns
        tiles = self._tiles(g)
        cols = rt.empty((max(cpu.blocks(t) for t in tiles) * CPU_GEMM_PB * g.c * g.taps,))
        bordered = rt.empty((g.n, g.h + 3, g.w + 2, g.c))
        rt.launch(cpu.kernels["channels_last"], _rows_launch(g.w + 2, g.n * (g.h + 3), self._local,
                                                             _i32(g.c, g.h, g.w)), [x, bordered])
        for t in tiles:
            # The GEMM reads whole blocks of points: the rows of the last one past the tile's points, which no
            # im2col writes, are zeroed (a pooled buffer's old bits there, as denormals, slow every FMA).
            points, rows = t.nb * t.count, g.c * g.taps
            rt.zero(cols, points * rows, (cpu.blocks(t) * CPU_GEMM_PB - points) * rows)
            rt.launch(cpu.kernels["cpu_im2col"], _rows_launch(t.count, t.nb * g.offset_groups, self._local,
                                                              _i32(*t.scalars(g))), [bordered, offset, mask, cols])
            rt.launch(cpu.kernels["cpu_gemm"], cpu.gemm_launch(g, t), [cols, cpu.weights, cpu.bias, y])

    def _run(self, x, offset, mask, geom: DeformConv2dGeometry, timed: bool):
        rt = self._rt
        self._check_open()
        with rt.timer() if timed else contextlib.nullcontext([None]) as seconds:
            if isinstance(x, np.ndarray):
                y = np.empty(geom.output_shape, np.float32)
                for start, part in self._chunks(geom) if geom.n else ():
                    images = slice(start, start + part.n)
                    xd, od = rt.upload(x[images]), rt.upload(offset[images])
                    md = od if mask is None else rt.upload(mask[images])
                    yd = rt.empty(part.output_shape)
                    self._forward(xd, od, md, yd, part)
                    rt.read(yd, y[images])
            else:
                self._check_whole(geom, {"the output": geom.output_shape})
                x, offset = rt.device_input(x), rt.device_input(offset)
                mask = offset if mask is None else rt.device_input(mask)
                y = rt.empty_array(geom.output_shape)
                if geom.n:
                    self._forward(x, offset, mask, y, geom)
                y = rt.returned(y)
        return y, seconds[0]

    def run(self, x, offset, mask, geom: DeformConv2dGeometry):
        return self._run(x, offset, mask, geom, timed=False)[0]

    def profile(self, x, offset, mask, geom: DeformConv2dGeometry):
        return self._run(x, offset, mask, geom, timed=True)

    # -- backward -------------------------------------------------------------------------------------------
    def _backward_stages(self) -> _Backward:
        with self._lock:
            self._check_open()
            if self._backward is None:
                self._backward = _Backward(self._rt, self.spec, self._w)
            return self._backward

    def _gradients(self, grad_y, x, offset, mask, outputs: list, geom: DeformConv2dGeometry, offset_host: np.ndarray,
                   mask_host: np.ndarray | None, first: bool) -> None:
        """The five gradients of one batch of device buffers into `outputs` (grad_x, grad_offset, grad_mask or a
        stand-in, grad_w, grad_b); `first` False: grad_w and grad_b add to what an earlier part left there.
        offset_host and mask_host: the same offset and mask on the host, for the inverse map."""
        rt, g, stages = self._rt, geom, self._backward_stages()
        grad_x, grad_offset, grad_mask, grad_w, grad_b = outputs
        npix, rows = g.oh * g.ow, g.c * g.taps
        jg = g.cg * g.taps  # grad_w's columns per output channel
        self._launch("bias_grad", _rows_launch(g.o, 1, self._local, _i32(g.n, g.o, npix, not first)), [grad_y, grad_b])
        tiles = self._tiles(g)
        largest = max(t.nb * t.count for t in tiles)
        dcol, cols = rt.empty((largest * rows,)), rt.empty((largest * rows,))
        direct = len(tiles) == 1
        gy_tile = None if direct else rt.empty((largest * g.o,))
        partial = None if direct and first else rt.empty((g.o * jg,))
        for i, t in enumerate(tiles):
            scalars = _i32(*t.scalars(g))
            if not direct:
                self._copy_pixels(grad_y, gy_tile, t.nb * g.o, t.count, npix, t.n0 * g.o * npix + t.p0, t.count, 0)
            gy = grad_y if direct else gy_tile
            self._gemm_steps(stages.dcol, gy, dcol, stages.dcol.plan.spec.geometry((t.nb, g.o, 1, t.count)))
            self._launch("col2im_coord", _rows_launch(t.count, t.nb * g.offset_groups * g.taps, self._local, scalars),
                         [x, offset, mask, dcol, grad_offset, grad_mask])
            starts, points, weights = _deform.inverse_map(offset_host, mask_host, g, t)
            if not points.size:  # no point touches the image: empty runs, but buffers need a size
                points, weights = np.zeros(1, np.int32), np.zeros((1, 4), np.float32)
            self._launch("col2im", _rows_launch(g.h * g.w, t.nb * g.c, self._local, scalars + _i32(t.p0 > 0)),
                         [dcol, rt.upload(starts), rt.upload(points), rt.upload(weights), grad_x])
            # The tile's columns pixel-major, [weight group][n * count + p][c * taps + k within the group].
            k = t.nb * t.count
            strides = _i32(t.count * jg, jg, g.taps, (k - 1) * jg, 1)
            self._launch("im2col", _rows_launch(t.count, t.nb * g.offset_groups, self._local, scalars + strides),
                         [x, offset, mask, cols])
            stage = stages.grad_w.get(k)
            kpad, ogpad, block, s_g, s_mb, s_k = operand_layout(stage.plan)
            packed = rt.empty((g.groups * s_g,))
            self._launch("pack", _rows_launch(kpad, g.groups * ogpad, self._local,
                                              scalars + _i32(kpad, ogpad, block, s_g, s_mb, s_k)), [grad_y, packed])
            out = grad_w if first and i == 0 else partial
            self._gemm_steps(stage, cols, out, stage.plan.spec.geometry((1, g.groups * k, 1, jg)), packed)
            if out is partial:
                self._launch("accumulate", _rows_launch(g.o * jg, 1, self._local, _i32(g.o * jg)), [grad_w, partial])

    def _backward_run(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry, timed: bool):
        rt, g = self._rt, geom
        self._check_open()
        shapes = [g.input_shape, g.offset_shape, g.mask_shape if mask is not None else None, g.weight_shape, (g.o,)]
        with rt.timer() if timed else contextlib.nullcontext([None]) as seconds:
            if isinstance(x, np.ndarray):
                grads = [None if s is None else np.zeros(s, np.float32) for s in shapes]
                grad_w, grad_b = rt.empty(g.weight_shape), rt.empty((g.o,))
                for index, (start, part) in enumerate(self._chunks(g) if g.n else ()):
                    images = slice(start, start + part.n)
                    xd, od, gyd = rt.upload(x[images]), rt.upload(offset[images]), rt.upload(grad_y[images])
                    md = od if mask is None else rt.upload(mask[images])
                    per_image = [rt.empty((part.n, *s[1:])) if s is not None else None for s in shapes[:3]]
                    outputs = [per_image[0], per_image[1], per_image[2] or per_image[1], grad_w, grad_b]
                    self._gradients(gyd, xd, od, md, outputs, part, offset[images],
                                    None if mask is None else mask[images], index == 0)
                    for host, device in zip(grads[:3], per_image):
                        if device is not None:
                            rt.read(device, host[images])
                if g.n:
                    rt.read(grad_w, grads[3])
                    rt.read(grad_b, grads[4])
            else:
                self._check_whole(g, {f"grad {name}": s for name, s in zip(("x", "offset", "mask"), shapes) if s})
                grad_y, x, offset = (rt.device_input(a) for a in (grad_y, x, offset))
                mask = offset if mask is None else rt.device_input(mask)
                grads = [None if s is None else rt.empty_array(s) for s in shapes]
                if g.n:
                    hosts = [None if s is None else np.empty(s, np.float32) for s in shapes[1:3]]
                    for device, host in zip((offset, mask), hosts):
                        if host is not None:
                            rt.read(device, host)  # for the inverse map
                    outputs = [grads[0], grads[1], grads[2] if grads[2] is not None else grads[1], *grads[3:]]
                    self._gradients(grad_y, x, offset, mask, outputs, g, *hosts, True)
                grads = [None if a is None else rt.returned(a) for a in grads]
        return tuple(grads), seconds[0]

    def backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        return self._backward_run(grad_y, x, offset, mask, geom, timed=False)[0]

    def profile_backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        return self._backward_run(grad_y, x, offset, mask, geom, timed=True)

    # -- lifetime -------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this layer is closed")

    def close(self) -> None:
        with self._lock:
            if self._backward is not None:
                self._backward.clear()
            self._columns = self._implicit = self._backward = None
            self._closed = True


def prepare(backend, spec: DeformConv2dSpec, w: np.ndarray, b: np.ndarray | None, device) -> KernelDeformPrepared:
    return KernelDeformPrepared(backend.runtime(device), spec, w, b)
