"""The OpenCL runtime: device arrays stay on the device, device selection, build errors, caching.

Numerics over the whole conv2d surface are in test_parity.py; the layers here reuse a handful of
programs, since each new one costs PoCL a few seconds.
"""
import numpy as np
import pytest

from conftest import assert_winograd_leaves_non_finite_input, cpu_device, require
from convbackends import Conv2d, available_backends, conv2d
from convbackends.backends import _kernels
from convbackends.parity import Case
from convbackends.reference import conv2d_float64

cl = pytest.importorskip("pyopencl")
cla = pytest.importorskip("pyopencl.array")

from convbackends.backends.opencl import BACKEND  # noqa: E402


@pytest.fixture(autouse=True)
def _available():
    availability = available_backends()["opencl"]
    if not availability.available:
        require("opencl", availability.reason)


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


def test_device_array_from_another_context_is_refused():
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    other = cl.CommandQueue(cl.Context([BACKEND.runtime().device]))
    with Conv2d(w, b, padding=1, backend="opencl") as layer, pytest.raises(ValueError, match="another OpenCL context"):
        layer(cla.to_device(other, x))


def test_numpy_calls_reuse_device_buffers_but_return_fresh_arrays():
    x1, w, b = _tensors((3, 4, 6, 5), (8, 4, 3, 3), seed=1)
    x2 = _tensors((3, 4, 6, 5), (8, 4, 3, 3), seed=2)[0]
    with Conv2d(w, b, padding=1, backend="opencl") as layer:
        y1, y2 = layer(x1), layer(x2)
        _assert_close(y1, conv2d_float64(x1, w, b, padding=1))
        _assert_close(y2, conv2d_float64(x2, w, b, padding=1))
        y, seconds = layer.profile(x1)
        _assert_close(y, y1)
        assert seconds is not None and seconds > 0


def test_programs_are_built_once_and_kernels_kept(rt):
    x, w, b = _tensors((1, 4, 6, 5), (8, 4, 3, 3))
    with Conv2d(w, b, padding=1, backend="opencl") as a, Conv2d(w * 2, None, padding=1, backend="opencl") as c:
        assert a._prepared._direct.kernel is c._prepared._direct.kernel
    source = _kernels.source("copy_strided")
    assert rt.kernel(source, "copy_strided") is rt.kernel(source, "copy_strided")


def test_build_error_carries_the_build_log(rt):
    source = _kernels.read_kernel("prelude.h") + "KERNEL void broken(GLOBAL float* y) { y[0] = no_such_value; }\n"
    with pytest.raises(_kernels.KernelBuildError, match="no_such_value"):
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
