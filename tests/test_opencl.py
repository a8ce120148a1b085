"""The OpenCL runtime: device arrays stay on the device, device selection, build errors, caching.

Numerics over the whole conv2d surface are in test_parity.py; the layers here reuse a handful of
programs, since each new one costs PoCL a few seconds.
"""
import dataclasses

import numpy as np
import pytest

from conftest import assert_winograd_leaves_non_finite_input, cpu_device, require_backend, run_threads
from convbackends import Conv2d, conv2d
from convbackends.backends.kernel import conv2d as _kernels
from convbackends.runtime import kernels as kernel_runtime
from convbackends.parity import Case
from convbackends.reference import conv2d_float64

cl = pytest.importorskip("pyopencl")
cla = pytest.importorskip("pyopencl.array")

from convbackends.runtime.opencl import BACKEND  # noqa: E402


@pytest.fixture(autouse=True)
def _available():
    require_backend("opencl")


@pytest.fixture
def rt():
    return BACKEND.runtime()


def _tensors(x_shape, w_shape, seed=0):
    return Case("layer", x_shape, w_shape, seed=seed).tensors()


def _assert_close(y, ref):
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_devices_report_their_facts():
    for device in BACKEND.devices():
        assert device.type in ("gpu", "integrated-gpu", "cpu", "other")
        for fact in ("platform", "driver", "opencl", "compute_units", "max_work_group_size", "local_memory", "max_buffer"):
            assert fact in device.facts


def test_device_selection_by_index_and_name_substring():
    first = BACKEND.devices()[0]
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    for device in (0, first.name[2:9].upper()):
        with Conv2d(w, b, padding=1, backend="opencl", device=device) as layer:
            assert layer.device == first
            _assert_close(layer(x), conv2d_float64(x, w, b, padding=1))
    with pytest.raises(ValueError, match="matches no device"):
        Conv2d(w, b, backend="opencl", device="no such device")
    with pytest.raises(ValueError, match="out of range"):
        Conv2d(w, b, backend="opencl", device=len(BACKEND.devices()))


@pytest.mark.parametrize(
    "gpu, w_shape, kwargs, kernel",
    [
        (False, (16, 8, 3, 3), dict(padding=1), "conv2d_cpu_gemm"),
        (False, (16, 8, 1, 1), {}, "conv2d_cpu_gemm"),
        (False, (16, 1, 3, 3), dict(groups=8, padding=1), "conv2d_depthwise"),
        (True, (16, 8, 3, 3), dict(padding=1), "conv2d_implicit_gemm"),
        (True, (16, 8, 1, 1), {}, "conv2d_gemm_1x1"),
        (True, (16, 1, 3, 3), dict(groups=8, padding=1), "conv2d_depthwise"),
    ],
)
def test_gpu_kernels_variant_runs_the_cuda_kernel_forms(monkeypatch, gpu, w_shape, kwargs, kernel):
    # The parity suite's opencl:N-gpu-kernels target must run what CUDA runs, not the CPU forms.
    cpu_device(monkeypatch, "opencl", gpu)
    x, w, b = _tensors((1, 8, 10, 9), w_shape)
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        plan = layer._prepared._plan
        assert plan.kernel_name == kernel
        assert ("-DINDEX_T=int" in plan.options) == gpu
        if kernel == "conv2d_depthwise":
            assert plan.dw_vec == (1 if gpu else _kernels.DEPTHWISE_CPU_VEC)
        _assert_close(layer(x), conv2d_float64(x, w, b, **kwargs))


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((3, 6, 9, 7), (9, 2, 3, 3), dict(groups=3, stride=(2, 1), padding=(0, 1, 2, 1), dilation=(1, 2))),
        ((2, 13, 5, 6), (17, 13, 1, 1), {}),
        ((3, 5, 8, 9), (10, 1, 3, 3), dict(groups=5, stride=2, padding=1)),
    ],
    ids=["implicit_gemm", "gemm_1x1", "depthwise"],
)
def test_device_array_in_device_array_out_without_host_copies(rt, monkeypatch, x_shape, w_shape, kwargs):
    x, w, b = _tensors(x_shape, w_shape)
    ref = conv2d_float64(x, w, b, **kwargs)
    xd = cla.to_device(rt.queue, x)
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        real_copy = cl.enqueue_copy

        def device_only_copy(queue, dest, src, **kw):
            assert not isinstance(dest, np.ndarray), "a device array input was read back to the host"
            return real_copy(queue, dest, src, **kw)

        monkeypatch.setattr(cl, "enqueue_copy", device_only_copy)
        monkeypatch.setattr(cla.Array, "get", lambda *a, **k: pytest.fail("host read of a device array"))
        y = layer(xd)
        monkeypatch.undo()
        assert isinstance(y, cla.Array) and y.dtype == np.float32
        _assert_close(y.get(), ref)


def test_non_contiguous_device_views_are_gathered_on_the_device(rt):
    x, w, b = _tensors((2, 4, 12, 14), (6, 4, 3, 3))
    kwargs = dict(padding=1)
    big = cla.to_device(rt.queue, x)
    views = {
        "strided": (big[:, :, 1:, ::2], x[:, :, 1:, ::2]),
        "offset": (big[1:], x[1:]),
    }
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        for name, (view, host) in views.items():
            assert not (view.flags.c_contiguous and view.offset == 0), name
            y = layer(view)
            assert isinstance(y, cla.Array)
            _assert_close(y.get(), conv2d_float64(np.ascontiguousarray(host), w, b, **kwargs))


def test_device_array_from_another_context_comes_back_in_its_context():
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    other = cl.CommandQueue(cl.Context([BACKEND.runtime().device]))
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        y = layer(cla.to_device(other, x))
    assert y.context == other.context
    _assert_close(y.get(), conv2d_float64(x, w, b, padding=1))


def test_numpy_calls_return_fresh_arrays():
    x1, w, b = _tensors((3, 4, 6, 5), (8, 4, 3, 3), seed=1)
    x2 = _tensors((3, 4, 6, 5), (8, 4, 3, 3), seed=2)[0]
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        y1, y2 = layer(x1), layer(x2)
        _assert_close(y1, conv2d_float64(x1, w, b, padding=1))
        _assert_close(y2, conv2d_float64(x2, w, b, padding=1))
        y, seconds = layer.profile(x1)
        _assert_close(y, y1)
        assert seconds is not None and seconds > 0


def test_zero_fills_only_its_range_in_launch_order(rt):
    """rt.zero (what the deform GEMM's tail of columns gets): the range and nothing else, after earlier writes."""
    import pyopencl as cl

    buf = rt.empty((1000,))
    cl.enqueue_copy(rt.queue, buf, np.full(1000, np.nan, np.float32))
    rt.zero(buf, 100, 250)
    rt.zero(buf, 999, 0)
    out = np.empty(1000, np.float32)
    rt.read(buf, out)
    assert np.isnan(out[:100]).all() and not out[100:350].view(np.uint32).any() and np.isnan(out[350:]).all()


def test_programs_are_built_once_and_kernels_kept(rt):
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    with Conv2d(w, b, padding=1, backend="opencl") as a, Conv2d(w * 2, None, padding=1, backend="opencl") as c:
        assert a._prepared._direct.kernel is c._prepared._direct.kernel
    source = kernel_runtime.source("copy_strided.h")
    assert rt.kernel(source, "copy_strided") is rt.kernel(source, "copy_strided")


def test_build_error_carries_the_build_log(rt):
    source = kernel_runtime.read_kernel("prelude.h") + "KERNEL void broken(GLOBAL float* y) { y[0] = no_such_value; }\n"
    with pytest.raises(kernel_runtime.KernelBuildError, match="no_such_value"):
        rt.kernel(source, "broken")


def test_prepared_close_is_idempotent_and_final():
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    layer = Conv2d(w, b, padding=1, backend="opencl")
    prepared = layer._prepared
    prepared.close()
    prepared.close()
    with pytest.raises(ValueError, match="closed"):
        prepared.run(x, layer.geometry(x))


WINOGRAD_CASES = [
    ((1, 128, 16, 16), (128, 128, 3, 3), dict(padding=1, activation="relu")),
    ((2, 128, 13, 18), (130, 128, 3, 3), dict(padding=(1, 0, 2, 1), activation="silu")),  # ragged tiles
    ((3, 130, 11, 13), (128, 130, 3, 3), dict(padding="same")),  # 3 images' tiles in one GEMM
]


@pytest.mark.parametrize("gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
@pytest.mark.parametrize("x_shape, w_shape, kwargs", WINOGRAD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_winograd_matches_float64(monkeypatch, gpu, x_shape, w_shape, kwargs):
    if gpu:
        cpu_device(monkeypatch, "opencl", as_gpu=True)
    x, w, b = _tensors(x_shape, w_shape)
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        assert layer._prepared.uses_winograd(x, layer.geometry(x))
        _assert_close(layer(x), conv2d_float64(x, w, b, **kwargs))


def test_winograd_layer_takes_the_direct_kernels_for_non_finite_input_and_device_arrays(rt):
    x, w, b = _tensors((1, 128, 16, 16), (128, 128, 3, 3))
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        assert not layer._prepared.uses_winograd(cla.to_device(rt.queue, x), layer.geometry(x))
        _assert_close(layer(cla.to_device(rt.queue, x)).get(), conv2d_float64(x, w, b, padding=1))
        assert_winograd_leaves_non_finite_input(layer, x, w, b, padding=1)


@pytest.fixture(params=[False, True], ids=["device-kernels", "gpu-kernels"])
def as_gpu(request, monkeypatch):
    """The default device with its own plan, and (CPU devices only) planned as a GPU."""
    if request.param:
        cpu_device(monkeypatch, "opencl", as_gpu=True)
    return request.param


@pytest.fixture(params=[True, False], ids=["in-place", "copied"])
def host_memory(request, rt, monkeypatch):
    """Host arrays used in place (where the device shares host memory), or through device copies."""
    if not request.param:
        monkeypatch.setattr(rt, "unified", False)
    elif not rt.unified:
        pytest.skip("this device does not share host memory")
    return request.param


def _wrong_outputs_from_threads(layers, inputs, refs, calls, device_every=0):
    """Each thread calls its layer on its input `calls` times (every `device_every`-th call with a
    device array) under a 1 us switch interval; the count of outputs off the float64 oracle."""
    wrong = [0] * len(layers)
    queue = BACKEND.runtime().queue

    def work(t):
        xd = cla.to_device(queue, inputs[t])
        for i in range(calls):
            y = layers[t](xd).get() if device_every and i % device_every == 0 else layers[t](inputs[t])
            wrong[t] += not np.abs(y - refs[t]).max() <= 1e-4 * max(1.0, np.abs(refs[t]).max())

    run_threads(work, len(layers))
    return sum(wrong)


def test_threads_share_a_layer_and_the_runtime(as_gpu, host_memory):
    # Before the fix: 301 of 800 outputs wrong on one shared layer, some with layers of their own.
    threads, calls = 8, 100
    rng = np.random.default_rng(7)
    w = rng.uniform(-1, 1, (32, 16, 3, 3)).astype(np.float32)
    inputs = [rng.uniform(-1, 1, (1, 16, 9, 10)).astype(np.float32) for _ in range(threads)]
    refs = [conv2d_float64(x, w, padding=1) for x in inputs]
    with Conv2d(w, padding=1, backend="opencl") as shared:
        assert _wrong_outputs_from_threads([shared] * threads, inputs, refs, calls, device_every=5) == 0
    own = [Conv2d(w, padding=1, backend="opencl") for _ in range(threads)]
    try:
        assert _wrong_outputs_from_threads(own, inputs, refs, calls // 2) == 0
    finally:
        for layer in own:
            layer.close()


def test_winograd_layer_shared_by_threads(host_memory):
    x, w, b = _tensors((1, 128, 16, 16), (128, 128, 3, 3))
    inputs = [x, -x, 0.5 * x, x[:, :, ::-1]]
    refs = [conv2d_float64(np.ascontiguousarray(v), w, b, padding=1) for v in inputs]
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        assert layer._prepared.uses_winograd(x, layer.geometry(x))
        assert _wrong_outputs_from_threads([layer] * 4, [np.ascontiguousarray(v) for v in inputs], refs, 5) == 0


NON_FINITE = (np.nan, np.inf, -np.inf)


def _non_finite_input(shape, seed=3):
    """U(-8, 8) with NaN, +inf and -inf sprinkled in, and 0 and -0."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-8, 8, shape).astype(np.float32)
    flat = x.reshape(-1)
    spots = rng.permutation(flat.size)
    for i, value in enumerate(NON_FINITE * 3 + (0.0, -0.0)):
        flat[spots[i]] = value
    return x


def _assert_same_non_finite(y, ref):
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    assert np.array_equal(np.isposinf(y), np.isposinf(ref)) and np.array_equal(np.isneginf(y), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert np.abs(y[finite] - ref[finite]).max() <= 1e-4 * max(1.0, np.abs(ref[finite]).max())


ACTIVATIONS = [None, "relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.1),
               ("clip", -1.0, 2.0)]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_nan_and_inf_keep_their_meaning_through_every_activation(as_gpu, activation):
    # One input channel: each output is w * x + b, so NaN and +-inf reach the activation unmixed.
    x = _non_finite_input((2, 1, 5, 9))
    w = np.array([1.0, -1.0, 0.5, -2.0, 3.0, 0.25, -0.75, 1.5], np.float32).reshape(8, 1, 1, 1)
    b = np.linspace(-1, 1, 8).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        numpy_y = conv2d(x, w, b, activation=activation, backend="numpy")
        ref = conv2d_float64(x, w, b, activation=activation)
    with Conv2d(w, b, activation=activation, backend="opencl") as layer:
        y = layer(x)
    assert np.isnan(ref).any() and np.isinf(x).any()
    _assert_same_non_finite(y, numpy_y)
    _assert_same_non_finite(y, ref)


@pytest.mark.parametrize("activation", ["relu", ("clip", -1.0, 2.0)], ids=str)
@pytest.mark.parametrize("w_shape, kwargs", [((6, 3, 3, 3), dict(padding=1)), ((6, 1, 3, 3), dict(groups=3, padding=1))],
                         ids=["3x3", "depthwise"])
def test_nan_survives_the_activation_of_3x3_and_depthwise_kernels(as_gpu, activation, w_shape, kwargs):
    x = _non_finite_input((1, 3, 7, 9))
    w = np.random.default_rng(1).uniform(-1, 1, w_shape).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = conv2d_float64(x, w, activation=activation, **kwargs)
    with Conv2d(w, activation=activation, backend="opencl", **kwargs) as layer:
        _assert_same_non_finite(layer(x), ref)


def _limit_buffers(rt, monkeypatch, max_alloc):
    monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=max_alloc))


def _largest_image_buffer(layer, geom, winograd=False):
    """The bytes of one image's largest buffer in a call (input, output, padded copy, V, M)."""
    prepared = layer._prepared
    stage = prepared._winograd if winograd else prepared._direct
    per_image = [4 * geom.c * geom.h * geom.w, 4 * geom.o * geom.oh * geom.ow]
    return max(per_image + [b.nbytes(1) for b in stage.plan.call_buffers(geom)])


SPLIT_CASES = [
    ((5, 8, 10, 9), (16, 8, 3, 3), dict(padding=1, activation="relu")),
    ((3, 6, 9, 7), (9, 2, 3, 3), dict(groups=3, stride=(2, 1), padding=(0, 1, 2, 1), dilation=(1, 2))),
    ((4, 5, 8, 9), (10, 1, 3, 3), dict(groups=5, stride=2, padding=1)),
    ((3, 13, 5, 6), (17, 13, 1, 1), {}),
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", SPLIT_CASES, ids=["3x3", "grouped", "depthwise", "1x1"])
def test_a_batch_over_the_largest_buffer_runs_in_parts(rt, monkeypatch, as_gpu, host_memory, x_shape, w_shape, kwargs):
    x, w, b = _tensors(x_shape, w_shape)
    ref = conv2d_float64(x, w, b, **kwargs)
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        geom = layer.geometry(x)
        _limit_buffers(rt, monkeypatch, 2 * _largest_image_buffer(layer, geom))
        parts = layer._prepared.chunks(geom, winograd=False)
        n = x.shape[0]
        assert [(start, part.n) for start, part in parts] == [(i, min(2, n - i)) for i in range(0, n, 2)]
        _assert_close(layer(x), ref)


def test_a_device_array_whose_padded_copy_is_over_the_largest_buffer_runs_in_parts(rt, monkeypatch, as_gpu):
    # Its output (a quarter of the input at stride 2) must fit whole: it is the one array returned.
    x, w, b = _tensors((5, 8, 16, 16), (4, 8, 3, 3))
    kwargs = dict(stride=2, padding=1)
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        geom = layer.geometry(x)
        _limit_buffers(rt, monkeypatch, 2 * _largest_image_buffer(layer, geom))
        assert len(layer._prepared.chunks(geom, winograd=False, one_output=True)) == 3
        y = layer(cla.to_device(rt.queue, x)[:, :, :, ::-1])  # a view: each part gathered on the device
        assert isinstance(y, cla.Array)
        _assert_close(y.get(), conv2d_float64(np.ascontiguousarray(x[:, :, :, ::-1]), w, b, **kwargs))


def test_winograd_batch_runs_in_parts_of_whole_images(rt, monkeypatch, host_memory):
    x, w, b = _tensors((3, 128, 13, 18), (128, 128, 3, 3))
    kwargs = dict(padding=(1, 0, 2, 1), activation="silu")
    with Conv2d(w, b, backend="opencl", **kwargs) as layer:
        geom = layer.geometry(x)
        _limit_buffers(rt, monkeypatch, _largest_image_buffer(layer, geom, winograd=True))
        assert layer._prepared.uses_winograd(x, geom)
        assert len(layer._prepared.chunks(geom, winograd=True)) == 3
        _assert_close(layer(x), conv2d_float64(x, w, b, **kwargs))


def test_one_image_over_the_largest_buffer_is_refused_naming_the_buffer_and_the_limit(rt, monkeypatch):
    x, w, b = _tensors((2, 8, 10, 9), (16, 8, 3, 3))
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        limit = _largest_image_buffer(layer, layer.geometry(x)) - 1
        _limit_buffers(rt, monkeypatch, limit)
        with pytest.raises(ValueError, match=rf"opencl: one image needs a .+ of \d+ bytes, more than the device's "
                                             rf"largest buffer \(CL_DEVICE_MAX_MEM_ALLOC_SIZE: {limit} bytes\)"):
            layer(x)
        # a device array's output is one buffer: it must fit whole
        _limit_buffers(rt, monkeypatch, 4 * 16 * 10 * 9 * 2 - 1)
        with pytest.raises(ValueError, match="the output needs 11520 bytes, more than the device's largest buffer"):
            layer(cla.to_device(rt.queue, x))
    _limit_buffers(rt, monkeypatch, w.nbytes // 2)
    with pytest.raises(ValueError, match="opencl: the packed weights need"):
        Conv2d(w, b, padding=1, backend="opencl")


_READ_IN_PLACE_CHECK = r"""
import ctypes, dataclasses, mmap, sys
import numpy as np
from convbackends import Conv2d
from convbackends.runtime.opencl import BACKEND
from convbackends.reference import conv2d_float64

libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded(shape):
    # A float32 array that ends where an inaccessible page begins: a read past its end faults.
    nbytes, page = 4 * int(np.prod(shape)), mmap.PAGESIZE
    pages = -(-nbytes // page)
    base = libc.mmap(None, (pages + 1) * page, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base != ctypes.c_void_p(-1).value and libc.mprotect(base + pages * page, page, 0) == 0
    return np.frombuffer((ctypes.c_char * nbytes).from_address(base + pages * page - nbytes), np.float32).reshape(shape)


rt = BACKEND.runtime()
assert rt.unified
cases = [((1, 3, 7, 13), (8, 3, 1, 1), {}), ((2, 4, 11, 30), (8, 4, 3, 3), {}),
         ((1, 3, 9, 13), (8, 3, 3, 3), dict(stride=2)), ((1, 3, 9, 13), (6, 1, 3, 3), dict(groups=3, padding=1))]
for as_gpu in (False, True):
    if as_gpu:
        rt.limits = dataclasses.replace(rt.limits, type="gpu")
    for x_shape, w_shape, kwargs in cases:
        x = guarded(x_shape)
        x[...] = np.random.default_rng(0).uniform(-1, 1, x_shape)
        w = np.random.default_rng(1).uniform(-1, 1, w_shape).astype(np.float32)
        with Conv2d(w, backend="opencl", **kwargs) as layer:
            ref = conv2d_float64(x, w, **kwargs)
            assert np.abs(layer(x) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), (x_shape, w_shape, as_gpu)
print("ok")
"""


def test_host_inputs_read_in_place_are_not_read_past_their_end(rt):
    # Unpadded inputs on a device sharing host memory are read where numpy put them; conv2d_cpu_gemm's
    # ragged last block of a row gathers, so nothing reads past x. A child process, since an
    # over-read is a segfault there.
    import subprocess
    import sys

    if not rt.unified:
        pytest.skip("this device does not share host memory")
    child = subprocess.run([sys.executable, "-c", _READ_IN_PLACE_CHECK], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "ok", (child.returncode, child.stderr[-2000:])
