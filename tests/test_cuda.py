"""The CUDA runtime: unavailable with the driver's reason where there is no GPU; on a GPU, device
arrays in and out, profiling, and a numeric spot check (full parity is in test_parity.py)."""
import importlib

import numpy as np
import pytest

from conftest import run_threads
from convbackends import Conv2d, available_backends
from convbackends.runtime import BackendUnavailable, get_backend
from convbackends.parity import Case
from convbackends.reference import conv2d_float64

_availability = available_backends()["cuda"]
needs_gpu = pytest.mark.skipif(not _availability.available, reason=f"no CUDA GPU: {_availability.reason}")


def test_module_imports_without_a_driver():
    pytest.importorskip("cupy")
    module = importlib.import_module("convbackends.runtime.cuda")
    assert module.BACKEND.name == "cuda"


@pytest.mark.skipif(_availability.available, reason="a CUDA GPU answers here")
def test_unavailable_with_the_drivers_reason():
    assert _availability.reason
    with pytest.raises(BackendUnavailable, match="cuda") as info:
        get_backend("cuda")
    assert isinstance(info.value, ValueError)
    assert _availability.reason in str(info.value)
    w = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="not available"):
        Conv2d(w, backend="cuda")


def _tensors(x_shape, w_shape, seed=0):
    return Case("layer", x_shape, w_shape, seed=seed).tensors()


CASES = [
    ((3, 6, 9, 7), (9, 2, 3, 3), dict(groups=3, stride=(2, 1), padding=(0, 1, 2, 1), dilation=(1, 2), activation="mish")),
    ((2, 13, 5, 6), (17, 13, 1, 1), dict(activation=("leaky_relu", 0.1))),
    ((3, 5, 8, 9), (10, 1, 3, 3), dict(groups=5, stride=2, padding=1, activation="hardswish")),
    ((1, 64, 28, 28), (128, 64, 3, 3), dict(padding=1, activation="relu")),
]


@needs_gpu
@pytest.mark.parametrize("x_shape, w_shape, kwargs", CASES, ids=["implicit_gemm", "gemm_1x1", "depthwise", "tiles"])
def test_numpy_and_cupy_inputs_match_float64(x_shape, w_shape, kwargs):
    import cupy as cp

    x, w, b = _tensors(x_shape, w_shape)
    ref = conv2d_float64(x, w, b, **kwargs)
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    with Conv2d(w, b, backend="cuda", **kwargs) as layer:
        assert np.abs(layer(x) - ref).max() <= tol
        y = layer(cp.asarray(x))
        assert isinstance(y, cp.ndarray)
        assert np.abs(y.get() - ref).max() <= tol
        y, seconds = layer.profile(x)
        assert seconds is not None and seconds > 0


@needs_gpu
def test_non_contiguous_cupy_view():
    import cupy as cp

    x, w, b = _tensors((2, 4, 12, 14), (6, 4, 3, 3))
    view = cp.asarray(x)[:, :, 1:, ::2]
    with Conv2d(w, b, backend="cuda", padding=1) as layer:
        y = layer(view)
    assert isinstance(y, cp.ndarray)
    ref = conv2d_float64(np.ascontiguousarray(x[:, :, 1:, ::2]), w, b, padding=1)
    assert np.abs(y.get() - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@needs_gpu
def test_build_error_carries_the_nvrtc_log():
    from convbackends.runtime import kernels as kernel_runtime
    from convbackends.runtime.cuda import BACKEND

    source = kernel_runtime.read_kernel("prelude.h") + "KERNEL void broken(GLOBAL float* y) { y[0] = no_such_value; }\n"
    with pytest.raises(kernel_runtime.KernelBuildError, match="no_such_value"):
        BACKEND.runtime().kernel(source, "broken")


@needs_gpu
def test_winograd_for_host_input_direct_kernels_for_cupy_arrays():
    import cupy as cp

    x, w, b = _tensors((2, 64, 30, 28), (96, 64, 3, 3))
    ref = conv2d_float64(x, w, b, padding=1, activation="relu")
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    with Conv2d(w, b, backend="cuda", padding=1, activation="relu") as layer:
        geom = layer.geometry(x)
        assert layer._prepared.uses_winograd(x, geom)
        assert np.abs(layer(x) - ref).max() <= tol
        assert not layer._prepared.uses_winograd(cp.asarray(x), geom)
        assert np.abs(layer(cp.asarray(x)).get() - ref).max() <= tol


@needs_gpu
def test_threads_share_a_layer_each_on_its_own_stream_or_the_default_one():
    import cupy as cp

    rng = np.random.default_rng(7)
    w = rng.uniform(-1, 1, (32, 16, 3, 3)).astype(np.float32)
    inputs = [rng.uniform(-1, 1, (2, 16, 9, 10)).astype(np.float32) for _ in range(8)]
    refs = [conv2d_float64(x, w, padding=1) for x in inputs]
    wrong = [0] * len(inputs)
    with Conv2d(w, padding=1, backend="cuda") as layer:
        def work(t):
            stream = cp.cuda.Stream(non_blocking=True) if t % 2 else cp.cuda.Stream.null
            with stream:
                xd = cp.asarray(inputs[t])
                for i in range(50):
                    y = layer(xd).get() if i % 5 == 0 else layer(inputs[t])
                    wrong[t] += not np.abs(y - refs[t]).max() <= 1e-4 * max(1.0, np.abs(refs[t]).max())

        run_threads(work, len(inputs))
    assert sum(wrong) == 0


@needs_gpu
def test_a_batch_over_the_buffer_cap_runs_in_parts(monkeypatch):
    import dataclasses

    import cupy as cp

    from convbackends.runtime.cuda import BACKEND

    x, w, b = _tensors((5, 8, 16, 16), (4, 8, 3, 3))
    kwargs = dict(stride=2, padding=1)
    ref = conv2d_float64(x, w, b, **kwargs)
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    with Conv2d(w, b, backend="cuda", **kwargs) as layer:
        rt = BACKEND.runtime()
        geom = layer.geometry(x)
        padded = layer._prepared._direct.plan.call_buffers(geom)[0].nbytes(1)  # the largest per image
        monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=2 * padded))
        assert len(layer._prepared.chunks(geom, winograd=False, one_output=True)) == 3
        assert np.abs(layer(x) - ref).max() <= tol
        assert np.abs(layer(cp.asarray(x)).get() - ref).max() <= tol
