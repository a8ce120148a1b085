"""deform_conv2d on the device backends (OpenCL/CUDA kernels, Vulkan shaders) beyond the op's own suite
(test_deform_conv2d.py): NaN and inf through every activation, bit-identical repeats, threads sharing a layer,
column tiles that keep memory bounded (and give the same results as one tile), host batches split at the
device's largest buffer, device arrays in and out, the GPU code paths on CPU devices, release; and the
host-side pieces the backends share (tiles, the inverse map)."""
import dataclasses

import numpy as np
import pytest

from conftest import cpu_device, require_backend, run_threads
from convbackends.backends import _deform
from convbackends.ops.deform_conv2d import DeformConv2d, DeformConv2dSpec
from convbackends.parity import ACTIVATIONS, compare
from convbackends.reference import deform_conv2d_float64

LAYER = dict(padding=1, groups=2)


def _problem(n=2, c=8, h=6, w=7, o=6, offset_groups=2, seed=0, scale=2.0, kwargs=LAYER):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(np.float32)
    wt = rng.uniform(-1, 1, (o, c // kwargs.get("groups", 1), 3, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, o).astype(np.float32)
    geom = DeformConv2dSpec.create(wt, **kwargs).conv.geometry(x.shape)
    offset = (rng.uniform(-scale, scale, (n, 2 * offset_groups * 9, geom.oh, geom.ow))).astype(np.float32)
    mask = rng.uniform(0, 1, (n, offset_groups * 9, geom.oh, geom.ow)).astype(np.float32)
    grad_y = rng.uniform(-1, 1, (n, o, geom.oh, geom.ow)).astype(np.float32)
    return x, wt, b, offset, mask, grad_y


def _assert_same(got, want):
    """Bit-identical results (None where None)."""
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            assert np.array_equal(g, r, equal_nan=True)


def _assert_close(got, want):
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            _, _, _, passed, detail = compare(np.asarray(g), np.asarray(r, np.float64))
            assert passed, detail


# ---- every target -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a if isinstance(a, str) else str(a and a[0]))
def test_nan_and_inf_through_every_activation(target, activation):
    """NaN and +-inf pixels and a NaN offset: non-finite outputs exactly where the float64 oracle has them."""
    backend, device = target
    x, w, b, offset, mask, _ = _problem(n=1, h=9, w=9)
    x[0, 1, 2, 3], x[0, 5, 6, 7], x[0, 6, 1, 1] = np.nan, np.inf, -np.inf
    offset[0, 5, 7, 4] = np.nan
    kwargs = dict(LAYER, activation=activation)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = deform_conv2d_float64(x, offset, w, b, mask, **kwargs)
        with DeformConv2d(w, b, backend=backend, device=device, **kwargs) as layer:
            y = layer(x, offset, mask)
    if activation is None:
        assert np.isnan(ref).any() and np.isinf(ref).any()
    _, _, _, passed, detail = compare(y, ref)
    assert passed, detail


def test_repeated_calls_are_bit_identical(target):
    backend, device = target
    x, w, b, offset, mask, grad_y = _problem(seed=1)
    with DeformConv2d(w, b, backend=backend, device=device, **LAYER) as layer:
        first = layer(x, offset, mask)
        assert np.array_equal(first, layer(x, offset, mask))
    with DeformConv2d(w, backend=backend, device=device, **LAYER) as layer:
        _assert_same(layer.backward(grad_y, x, offset, mask), layer.backward(grad_y, x, offset, mask))
        _assert_same(layer.backward(grad_y, x, offset, None), layer.backward(grad_y, x, offset, None))


def test_threads_share_a_layer(target):
    """8 threads call one layer, forward and backward, each on its own input: every result is the oracle's
    (forward) and bit-identical to the same call made alone (backward)."""
    backend, device = target
    problems = [_problem(n=1, seed=10 + t) for t in range(8)]
    w = problems[0][1]
    refs = [deform_conv2d_float64(x, offset, w, None, mask, **LAYER) for x, _, _, offset, mask, _ in problems]
    wrong = []
    with DeformConv2d(w, backend=backend, device=device, **LAYER) as layer:
        alone = [layer.backward(gy, x, offset, mask) for x, _, _, offset, mask, gy in problems]

        def work(t):
            x, _, _, offset, mask, gy = problems[t]
            for _ in range(3):
                if not compare(layer(x, offset, mask), refs[t])[3]:
                    wrong.append(("forward", t))
                grads = layer.backward(gy, x, offset, mask)
                if not all(np.array_equal(g, a) for g, a in zip(grads, alone[t]) if a is not None):
                    wrong.append(("backward", t))

        run_threads(work, len(problems))
    assert not wrong, wrong


def test_one_output_pixel_per_image_with_groups(target):
    """One output pixel and one image: grad_w's GEMM contracts a single pixel per weight group (a depthwise
    1x1 layer of conv2d), and with one out-channel per group so is the dcol GEMM."""
    backend, device = target
    rng = np.random.default_rng(6)
    x = rng.uniform(-1, 1, (1, 4, 3, 3)).astype(np.float32)
    offset = rng.uniform(-1, 1, (1, 2 * 2 * 9, 1, 1)).astype(np.float32)
    mask = rng.uniform(0, 1, (1, 2 * 9, 1, 1)).astype(np.float32)
    for o in (2, 6):
        w = rng.uniform(-1, 1, (o, 2, 3, 3)).astype(np.float32)
        grad_y = rng.uniform(-1, 1, (1, o, 1, 1)).astype(np.float32)
        with DeformConv2d(w, groups=2) as reference, \
                DeformConv2d(w, groups=2, backend=backend, device=device) as layer:
            _assert_close([layer(x, offset, mask)], [deform_conv2d_float64(x, offset, w, None, mask, groups=2)])
            _assert_close(layer.backward(grad_y, x, offset, mask), reference.backward(grad_y, x, offset, mask))


# ---- the shared host pieces -------------------------------------------------------------------------------

def _geometry(x_shape, w_shape, offset_groups=1, mask=True, **kwargs):
    spec = DeformConv2dSpec.create(np.zeros(w_shape, np.float32), **kwargs)
    conv = spec.conv.geometry(x_shape)
    taps = w_shape[2] * w_shape[3]
    offset_shape = (x_shape[0], 2 * offset_groups * taps, conv.oh, conv.ow)
    return spec.geometry(x_shape, offset_shape, (x_shape[0], offset_groups * taps, conv.oh, conv.ow) if mask else None)


@pytest.mark.parametrize("cap_pixels", [1, 5, 8, 13, 30, 42, 43, 86, 87, 1000])
def test_tiles_cover_the_batch_once_within_the_cap(cap_pixels):
    geom = _geometry((3, 4, 6, 7), (5, 4, 3, 3), padding=1)
    cap = cap_pixels * _deform.column_bytes(geom)
    seen = np.zeros((geom.n, geom.oh * geom.ow), int)
    for t in _deform.tiles(geom, cap):
        assert t.nb * t.count * _deform.column_bytes(geom) <= cap
        assert t.nb == 1 or t.whole_images(geom)
        seen[t.n0:t.n0 + t.nb, t.p0:t.p0 + t.count] += 1
    assert (seen == 1).all()


def test_tiles_refuse_a_pixel_over_the_cap():
    geom = _geometry((1, 4, 6, 7), (5, 4, 3, 3), padding=1)
    with pytest.raises(ValueError, match="one output pixel's columns need 144 bytes"):
        _deform.tiles(geom, 100)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_inverse_map_lists_each_touching_point_under_its_cell_in_order(with_mask):
    """Against a loop over the points: every point with a corner in the image (coordinates in [-1, H) x
    [-1, W)) under the cell floor() gives, in tap-then-pixel order, with its corners' bilinear weights
    times its mask; none else (NaN, outside, exactly H)."""
    geom = _geometry((2, 4, 5, 6), (4, 2, 3, 3), offset_groups=2, groups=2, padding=1, stride=(1, 2))
    rng = np.random.default_rng(3)
    offset = rng.uniform(-3, 3, geom.offset_shape).astype(np.float32)
    offset[0, :4, 0, 0] = [0, 0, np.nan, 1]  # output 0: tap 0 at (-1, -1) exactly (kept), tap 1 at y NaN
    offset[1, 2, 1, 1] = 5  # tap 1 of output (1, 1): y = H exactly (dropped)
    mask = rng.uniform(0, 1, geom.mask_shape).astype(np.float32) if with_mask else None
    for t in (_deform.Tile(0, 2, 0, geom.oh * geom.ow), _deform.Tile(1, 1, 2, 7)):
        starts, points, weights = _deform.inverse_map(offset, mask, geom, t)
        cells = (geom.h + 1) * (geom.w + 1)
        expected = [[] for _ in range(t.nb * geom.offset_groups * cells)]
        for nl in range(t.nb):
            for g in range(geom.offset_groups):
                for k in range(geom.taps):
                    for pl in range(t.count):
                        p = t.p0 + pl
                        oy, ox, (i, j) = p // geom.ow, p % geom.ow, divmod(k, geom.kw)
                        dy, dx = offset[t.n0 + nl, g * 2 * geom.taps + 2 * k: g * 2 * geom.taps + 2 * k + 2, oy, ox]
                        py = np.float32(oy * geom.sh - geom.pt + i * geom.dh) + dy
                        px = np.float32(ox * geom.sw - geom.pl + j * geom.dw) + dx
                        if -1 <= py < geom.h and -1 <= px < geom.w:
                            cy, cx = np.floor(py), np.floor(px)
                            m = np.float32(1) if mask is None else mask[t.n0 + nl, g * geom.taps + k, oy, ox]
                            wy, wx = (m * (1 - (py - cy)), m * (py - cy)), (1 - (px - cx), px - cx)
                            cell = (int(cy) + 1) * (geom.w + 1) + int(cx) + 1
                            expected[(nl * geom.offset_groups + g) * cells + cell].append(
                                (k * t.count + pl, [wy[a] * wx[b] for a in (0, 1) for b in (0, 1)]))
        assert starts.dtype == points.dtype == np.int32 and weights.dtype == np.float32 and starts[0] == 0
        assert [list(points[starts[s]:starts[s + 1]]) for s in range(len(expected))] == [
            [point for point, _ in run] for run in expected]
        assert starts[-1] == len(points) == len(weights)
        assert np.array_equal(weights, np.array([w for run in expected for _, w in run], np.float32).reshape(-1, 4))


# ---- OpenCL -----------------------------------------------------------------------------------------------

@pytest.fixture
def opencl():
    require_backend("opencl")
    from convbackends.runtime.opencl import BACKEND

    return BACKEND


@pytest.fixture(params=[False, True], ids=["cpu-kernels", "gpu-kernels"])
def as_gpu(request):
    return request.param


def _record_allocations(monkeypatch, rt) -> list:
    """The float counts of every buffer the runtime's pool hands out from now on."""
    sizes = []
    empty = rt.empty

    def recorded(shape):
        sizes.append(int(np.prod(shape)))
        return empty(shape)

    monkeypatch.setattr(rt, "empty", recorded)
    return sizes


def test_opencl_plans_by_device_kind(opencl, monkeypatch, as_gpu):
    """CPU devices sample point-major columns for their column GEMM; GPUs sample in the implicit GEMM."""
    index = cpu_device(monkeypatch, "opencl", as_gpu)
    _, w, b, _, _, _ = _problem()
    with DeformConv2d(w, b, backend="opencl", device=index, **LAYER) as layer:
        prepared = layer._prepared
        assert (prepared._implicit is not None) == as_gpu and (prepared._columns is not None) != as_gpu


def test_opencl_column_tiles_stay_under_the_cap_and_agree(opencl, monkeypatch, as_gpu):
    """Caps of 2.5 images' columns (whole-image tiles) and of 20 pixels' (runs of pixels within an image):
    no buffer but the call's own arrays grows past the cap, forward is bit-identical to one tile (each
    output's sum runs in the same order) and backward within tolerance (grad_w adds tiles)."""
    from convbackends.backends.kernel import deform_conv2d as kernel_deform

    index = cpu_device(monkeypatch, "opencl", as_gpu)
    rt = opencl.runtime(index)
    x, w, b, offset, mask, grad_y = _problem(n=5)
    kind = "gpu" if as_gpu else "cpu"
    with DeformConv2d(w, b, backend="opencl", device=index, **LAYER) as layer:
        geom = layer.geometry(x, offset, mask)
        whole = layer(x, offset, mask), layer.backward(grad_y, x, offset, mask)
        per_pixel = _deform.column_bytes(geom)
        arrays = {int(np.prod(s)) for s in (geom.input_shape, geom.offset_shape, geom.mask_shape, geom.output_shape,
                                            geom.weight_shape, (geom.h + 3, geom.w + 2, geom.c, geom.n))}
        for cap in (int(2.5 * per_pixel * geom.oh * geom.ow), 20 * per_pixel):
            monkeypatch.setitem(kernel_deform.COLUMN_BYTES, kind, cap)
            assert len(layer._prepared._tiles(geom)) > 1
            sizes = _record_allocations(monkeypatch, rt)
            forward = layer(x, offset, mask)
            backward = layer.backward(grad_y, x, offset, mask)
            assert np.array_equal(forward, whole[0])
            _assert_close(backward, whole[1])
            # Columns round up to whole GEMM blocks (12 points) and packed operands to whole tiles.
            assert max(s for s in sizes if s not in arrays) * 4 <= cap + 64 * per_pixel


def test_opencl_host_batch_runs_in_parts_at_the_largest_buffer(opencl, monkeypatch, as_gpu):
    index = cpu_device(monkeypatch, "opencl", as_gpu)
    rt = opencl.runtime(index)
    x, w, b, offset, mask, grad_y = _problem(n=5)
    with DeformConv2d(w, b, backend="opencl", device=index, **LAYER) as layer:
        whole = layer(x, offset, mask), layer.backward(grad_y, x, offset, mask)
        geom = layer.geometry(x, offset, mask)
        two_offsets = 2 * 4 * int(np.prod(geom.offset_shape[1:]))  # two images' offset, the largest array
        monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=two_offsets))
        assert len(layer._prepared._chunks(geom)) == 3
        assert np.array_equal(layer(x, offset, mask), whole[0])
        _assert_close(layer.backward(grad_y, x, offset, mask), whole[1])
        monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=1000))
        with pytest.raises(ValueError, match=r"opencl: one image needs a copy of x of 1344 bytes, more than the "
                                             r"device's largest buffer \(CL_DEVICE_MAX_MEM_ALLOC_SIZE: 1000 bytes\)"):
            layer(x, offset, mask)


def test_opencl_device_arrays_in_device_arrays_out(opencl, monkeypatch, as_gpu):
    """pyopencl arrays (one a strided view) give pyopencl arrays, the same values as numpy arrays."""
    import pyopencl.array as cla

    index = cpu_device(monkeypatch, "opencl", as_gpu)
    queue = opencl.runtime(index).queue
    x, w, b, offset, mask, grad_y = _problem(seed=4)
    with DeformConv2d(w, b, backend="opencl", device=index, **LAYER) as layer:
        host = layer(x, offset, mask), layer.backward(grad_y, x, offset, mask)
        wide = cla.to_device(queue, np.concatenate([x, x], axis=3))
        x_view = wide[:, :, :, : x.shape[3]]
        assert not x_view.flags.c_contiguous
        arrays = [cla.to_device(queue, a) for a in (offset, mask, grad_y)]
        y = layer(x_view, arrays[0], arrays[1])
        grads = layer.backward(arrays[2], x_view, arrays[0], arrays[1])
        no_mask = layer.backward(arrays[2], x_view, arrays[0])
    assert isinstance(y, cla.Array) and all(isinstance(g, cla.Array) for g in grads)
    assert np.array_equal(y.get(), host[0])
    _assert_same([g.get() for g in grads], host[1])
    assert no_mask[2] is None


def test_opencl_closed_layer_refuses_work(opencl):
    x, w, b, offset, mask, grad_y = _problem(n=1)
    layer = DeformConv2d(w, b, backend="opencl", **LAYER)
    prepared = layer._prepared
    layer(x, offset, mask)
    layer.close()
    prepared.close()
    with pytest.raises(ValueError, match="closed"):
        prepared.run(x, offset, mask, layer.geometry(x, offset, mask))


# ---- Vulkan -----------------------------------------------------------------------------------------------

@pytest.fixture
def vulkan():
    require_backend("vulkan")
    from convbackends.runtime import vulkan as vk_runtime

    return vk_runtime


def _record_acquires(monkeypatch, dev) -> list:
    sizes = []
    acquire = dev.acquire

    def recorded(nbytes, host, **options):
        sizes.append((nbytes, host))
        return acquire(nbytes, host, **options)

    monkeypatch.setattr(dev, "acquire", recorded)
    return sizes


def test_vulkan_column_tiles_stay_under_the_cap_and_agree(vulkan, monkeypatch, as_gpu):
    """As for OpenCL: device buffers (columns, dcol, packed operands) within the cap, host buffers the
    call's arrays and tiles; forward bit-identical, backward within tolerance."""
    from convbackends.backends.vulkan import deform_conv2d as vulkan_deform

    index = cpu_device(monkeypatch, "vulkan", as_gpu)
    x, w, b, offset, mask, grad_y = _problem(n=5)
    kind = "gpu" if as_gpu else "cpu"
    with DeformConv2d(w, b, backend="vulkan", device=index, **LAYER) as layer:
        geom = layer.geometry(x, offset, mask)
        whole = layer(x, offset, mask), layer.backward(grad_y, x, offset, mask)
    per_pixel = _deform.column_bytes(geom)
    for cap in (int(2.5 * per_pixel * geom.oh * geom.ow), 20 * per_pixel):
        monkeypatch.setitem(vulkan_deform.COLUMN_BYTES, kind, 2 * cap)  # the plans take half, for padding
        with DeformConv2d(w, b, backend="vulkan", device=index, **LAYER) as layer:
            assert len(layer._prepared.tiles(geom)) > 1
            sizes = _record_acquires(monkeypatch, layer._prepared.dev)
            forward = layer(x, offset, mask)
            backward = layer.backward(grad_y, x, offset, mask)
            assert np.array_equal(forward, whole[0])
            _assert_close(backward, whole[1])
            device = [n for n, host in sizes if not host]
            bordered = 4 * geom.n * (geom.h + 3) * (geom.w + 2) * geom.c
            assert max(n for n in device if n != bordered) <= cap + 64 * per_pixel


def test_vulkan_plans_by_device_kind(vulkan, monkeypatch, as_gpu):
    """CPU devices sample from the channels-last copy (C/G a multiple of 4) with the direct GEMM; GPUs take
    the generic im2col and the shared-memory GEMM."""
    index = cpu_device(monkeypatch, "vulkan", as_gpu)
    x, w, b, offset, mask, _ = _problem(n=1)
    with DeformConv2d(w, b, backend="vulkan", device=index, **LAYER) as layer:
        layer(x, offset, mask)
        prepared = layer._prepared
        plan = next(iter(prepared._held.plans.values()))
        used = {name for name, pipeline in prepared.pipelines.items()
                for d in plan._dispatches if d.pipeline is pipeline}
        assert used == ({"im2col"} if as_gpu else {"channels_last", "cpu_im2col"})
        assert prepared.columns.tiles.stage == as_gpu


def test_vulkan_layer_collected_without_close_gives_everything_back(vulkan):
    """The finalizer holds the device objects, never the layer (nor do its plans): dropping the last reference
    releases weights, recorded plans and pipelines' uses."""
    import gc
    import weakref

    x, w, b, offset, mask, grad_y = _problem(n=1)
    layer = DeformConv2d(w, b, backend="vulkan", **LAYER)
    held = layer._prepared._held
    layer(x, offset, mask)
    layer.backward(grad_y, x, offset, mask)
    assert held.plans and held.buffers and held.pipelines
    users = {id(p): p.users for p in held.pipelines}
    pipelines = list(held.pipelines)
    prepared = weakref.ref(layer._prepared)
    del layer
    gc.collect()
    assert prepared() is None
    assert not held.plans and not held.buffers and not held.pipelines
    assert all(p.users == users[id(p)] - pipelines.count(p) for p in pipelines)


def test_vulkan_releases_what_a_layer_records(vulkan):
    _, w, b, _, _, _ = _problem(n=1)
    per_layer = ("descriptor_set", "command_buffer", "query_pool")
    before = {k: vulkan.LIVE[k] for k in per_layer}
    with DeformConv2d(w, b, backend="vulkan", **LAYER) as layer:
        prepared = layer._prepared
        dev = prepared.dev
        for n, h in ((1, 6), (2, 5)):
            x, _, _, offset, mask, grad_y = _problem(n=n, h=h)
            layer(x, offset, mask)
        layer.backward(grad_y, x, offset, mask)
        in_use = dev.in_use_bytes
    assert dev.in_use_bytes < in_use
    assert {k: vulkan.LIVE[k] for k in per_layer} == before
    prepared.close()
    with pytest.raises(ValueError, match="closed"):
        prepared.run(x, offset, mask, None)


# ---- CUDA (where a GPU is lent) ---------------------------------------------------------------------------

def test_cuda_device_arrays_in_device_arrays_out():
    """CuPy arrays (one a strided view) give CuPy arrays, the same values as numpy arrays."""
    require_backend("cuda")
    import cupy as cp

    x, w, b, offset, mask, grad_y = _problem(seed=5)
    with DeformConv2d(w, b, backend="cuda", **LAYER) as layer:
        host = layer(x, offset, mask), layer.backward(grad_y, x, offset, mask)
        x_view = cp.asarray(np.concatenate([x, x], axis=3))[:, :, :, : x.shape[3]]
        arrays = [cp.asarray(a) for a in (offset, mask, grad_y)]
        y = layer(x_view, arrays[0], arrays[1])
        grads = layer.backward(arrays[2], x_view, arrays[0], arrays[1])
    assert isinstance(y, cp.ndarray) and all(isinstance(g, cp.ndarray) for g in grads)
    _assert_close([cp.asnumpy(y)], [host[0]])
    _assert_close([cp.asnumpy(g) for g in grads], host[1])
