"""Reliability on every target: threads, non-finite values through every activation, the limits of
the spec, empty inputs. Each check holds on every backend and device alike."""
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import run_threads
import convbackends as cb
from convbackends import Conv2d, conv2d
from convbackends.parity import ACTIVATIONS, tolerance
from convbackends.reference import activation_float64, conv2d_float64
from convbackends.spec import FLOAT32_MAX, INT32_MAX, Activation

RNG = np.random.default_rng(7)
THREADS = 8
CALLS = 100


def _uniform(*shape) -> np.ndarray:
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def _assert_close(y, ref) -> None:
    assert y.shape == ref.shape
    error, bound = float(np.abs(y - ref).max()), tolerance(ref)
    assert error <= bound, f"max abs error {error:.3g} against the float64 oracle, above {bound:.3g}"


# Two input sizes, so threads also race on the per-size caches (gather tables, staging buffers, plans).
THREAD_W, THREAD_B = _uniform(32, 16, 3, 3), _uniform(32)
THREAD_X = [_uniform(1, 16, 12, 12) if i % 2 else _uniform(1, 16, 9, 10) for i in range(THREADS)]
THREAD_KW = dict(padding=1, activation="relu")
THREAD_REF = [conv2d_float64(x, THREAD_W, THREAD_B, **THREAD_KW) for x in THREAD_X]


def _calls(layer, t: int) -> None:
    """CALLS calls from thread t, cycling through the inputs from its own; each output checked."""
    for i in range(CALLS):
        k = (t + i) % len(THREAD_X)
        _assert_close(layer(THREAD_X[k]), THREAD_REF[k])


def test_threads_share_one_layer(target):
    """One layer called from many threads: its per-call state (staging buffers, plans, queues) must
    not be shared between calls in flight."""
    backend, device = target
    with Conv2d(THREAD_W, THREAD_B, **THREAD_KW, backend=backend, device=device) as layer:
        run_threads(lambda t: _calls(layer, t), THREADS)


def test_threads_with_a_layer_each(target):
    """Layers built and run at once: what layers share (runtimes, kernel caches, memory pools) is
    thread-safe."""
    backend, device = target

    def work(t: int) -> None:
        with Conv2d(THREAD_W, THREAD_B, **THREAD_KW, backend=backend, device=device) as layer:
            _calls(layer, t)

    run_threads(work, THREADS)


def _non_finite_input(c: int) -> np.ndarray:
    """NaN, +inf and -inf at pixels far enough apart that no 3x3 window holds two of them, so the
    outputs show every case: NaN, +inf and -inf (by the weight's sign), and finite values."""
    x = _uniform(2, c, 12, 12)
    x[0, 1 % c, 2, 3] = np.nan
    x[0, 5 % c, 6, 8] = np.inf
    x[0, 9 % c, 9, 2] = -np.inf
    x[1, 3 % c, 0, 11] = -np.inf
    x[1, 7 % c, 11, 0] = np.inf
    return x


def _assert_ieee_like_oracle(target, w, where: str, **kwargs) -> None:
    """On `_non_finite_input`: NaN and +-inf exactly where the float64 oracle has them, the rest close."""
    backend, device = target
    x, b = _non_finite_input(w.shape[1] * kwargs.get("groups", 1)), _uniform(w.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        ref = conv2d_float64(x, w, b, **kwargs)
    if kwargs.get("activation") is None:  # the input reaches every case
        assert np.isnan(ref).any() and np.isposinf(ref).any() and np.isneginf(ref).any()
    y = conv2d(x, w, b, **kwargs, backend=backend, device=device)
    assert np.array_equal(np.isnan(y), np.isnan(ref)), f"NaN positions differ: {where}"
    assert np.array_equal(np.isposinf(y), np.isposinf(ref)), f"+inf positions differ: {where}"
    assert np.array_equal(np.isneginf(y), np.isneginf(ref)), f"-inf positions differ: {where}"
    finite = np.isfinite(ref)
    assert np.abs(y[finite] - ref[finite]).max() <= tolerance(ref), where


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a if isinstance(a, str) else str(a and a[0]))
def test_nan_and_inf_through_every_activation(target, activation):
    """Each activation's IEEE semantics on a dense 3x3 layer (the numpy backend, a target too, is held
    to the same oracle)."""
    _assert_ieee_like_oracle(target, _uniform(24, 16, 3, 3), f"activation {activation!r}", padding=1,
                             activation=activation)


# (name, w shape, kwargs): the other kernels (the activation's code is the same epilogue in each).
NON_FINITE_LAYERS = [
    ("1x1", (24, 16, 1, 1), {}),
    ("strided 3x3", (24, 16, 3, 3), dict(stride=2, padding=1)),
    ("depthwise", (32, 1, 3, 3), dict(padding=1, groups=16)),
]


@pytest.mark.parametrize("layer", NON_FINITE_LAYERS, ids=[row[0] for row in NON_FINITE_LAYERS])
def test_nan_and_inf_through_every_kernel(target, layer):
    name, shape, kwargs = layer
    _assert_ieee_like_oracle(target, _uniform(*shape), f"{name} layer", **kwargs)


def _fake_input(*shape):
    """What validation reads of an input (dtype and shape), without the memory behind it."""
    return SimpleNamespace(dtype=np.dtype(np.float32), shape=shape)


LIMIT_X = _uniform(1, 3, 8, 8)
W1, W3 = _uniform(4, 3, 1, 1), _uniform(4, 3, 3, 3)

# (description, x, w, kwargs, exception, message pattern): refused by the spec, before any backend
# allocates or compiles, with a message naming the parameter and the value.
LIMITS = [
    ("stride 2**31", LIMIT_X, W1, dict(stride=2**31), ValueError, r"stride must be <= 2147483647 \(int32\), got 2147483648"),
    ("stride pair", LIMIT_X, W1, dict(stride=(1, 2**31)), ValueError, r"stride must be <= 2147483647 \(int32\), got \(1, 2147483648\)"),
    ("dilation 2**31", LIMIT_X, W1, dict(dilation=2**31), ValueError, r"dilation must be <= 2147483647 \(int32\), got 2147483648"),
    ("padding 2**31", LIMIT_X, W1, dict(padding=2**31), ValueError, r"padding must be <= 2147483647 \(int32\), got 2147483648"),
    ("padding 4-tuple", LIMIT_X, W1, dict(padding=(0, 0, 0, 2**31)), ValueError, r"padding must be <= 2147483647 \(int32\), got \(0, 0, 0, 2147483648\)"),
    ("np.int64 stride", LIMIT_X, W1, dict(stride=np.int64(2**40)), ValueError, r"stride must be <= 2147483647 \(int32\), got np.int64\(1099511627776\)"),
    ("kernel extent", LIMIT_X, W3, dict(dilation=2**30), ValueError, r"extent \(2147483649, 2147483649\) .* must be <= 2147483647"),
    ("clip huge", LIMIT_X, W3, dict(activation=("clip", -1e39, 1e39)), ValueError,
     r"activation parameters must be finite float32 values \(\|v\| <= 3.4028235e\+38\), got \('clip', -1e\+39, 1e\+39\)"),
    ("clip huge int", LIMIT_X, W3, dict(activation=("clip", 0, 10**39)), ValueError, r"finite float32 values .*got \('clip', 0, 10{39}\)"),
    ("clip nan", LIMIT_X, W3, dict(activation=("clip", float("nan"), 1.0)), ValueError, r"finite float32 values .*got \('clip', nan, 1.0\)"),
    ("clip inf", LIMIT_X, W3, dict(activation=("clip", 0.0, float("inf"))), ValueError, r"finite float32 values .*got \('clip', 0.0, inf\)"),
    ("leaky_relu nan", LIMIT_X, W3, dict(activation=("leaky_relu", float("nan"))), ValueError, r"finite float32 values .*got \('leaky_relu', nan\)"),
    ("leaky_relu inf", LIMIT_X, W3, dict(activation=("leaky_relu", float("inf"))), ValueError, r"finite float32 values .*got \('leaky_relu', inf\)"),
    ("leaky_relu -inf", LIMIT_X, W3, dict(activation=("leaky_relu", -np.inf)), ValueError, r"finite float32 values .*got \('leaky_relu', -inf\)"),
    ("input plane", _fake_input(1, 1, 50000, 50000), _uniform(4, 1, 1, 1), {}, ValueError,
     r"x of shape \(1, 1, 50000, 50000\) padded by \(0, 0, 0, 0\) has 2500000000 elements per image \(1 x 50000 x 50000\), "
     r"above the 2147483647"),
    ("input channels", _fake_input(2, 2**16, 182, 182), _uniform(4, 2**16, 1, 1), {}, ValueError,
     r"has 2170814464 elements per image \(65536 x 182 x 182\), above the 2147483647"),
    ("padded plane", LIMIT_X, W1, dict(padding=(0, 2**30, 0, 2**30)), ValueError,
     r"x of shape \(1, 3, 8, 8\) padded by \(0, 1073741824, 0, 1073741824\) has 51539607744 elements per image \(3 x 8 x 2147483656\)"),
    ("output", _fake_input(1, 1, 1024, 1024), _uniform(2048, 1, 1, 1), {}, ValueError,
     r"the output of shape \(1, 2048, 1024, 1024\) has 2147483648 elements per image \(2048 x 1024 x 1024\)"),
]


@pytest.mark.parametrize("row", LIMITS, ids=[row[0] for row in LIMITS])
def test_limits_give_the_same_error_on_every_backend(target, row):
    _, x, w, kwargs, exc, pattern = row
    backend, device = target
    with pytest.raises(exc, match=pattern) as expected:
        conv2d(x, w, **kwargs)
    with pytest.raises(exc) as got:
        conv2d(x, w, **kwargs, backend=backend, device=device)
    assert str(got.value) == str(expected.value)


# (description, x shape, w shape, kwargs): the largest values the spec accepts.
LARGEST = [
    ("1x1 stride", (1, 3, 8, 8), (4, 3, 1, 1), dict(stride=INT32_MAX)),
    ("1x1 dilation", (1, 3, 8, 8), (4, 3, 1, 1), dict(dilation=INT32_MAX)),
    ("3x3 stride, padded", (1, 3, 8, 8), (4, 3, 3, 3), dict(stride=INT32_MAX, padding=1)),
    ("depthwise stride, padded", (1, 6, 8, 8), (6, 1, 3, 3), dict(stride=INT32_MAX, padding=1, groups=6)),
    ("3x3 dilation 2**16", (1, 1, 3, 2**17 + 1), (4, 1, 3, 3), dict(dilation=(1, 2**16))),
    ("clip at float32's range", (1, 3, 8, 8), (4, 3, 3, 3), dict(activation=("clip", -FLOAT32_MAX, FLOAT32_MAX))),
]


@pytest.mark.parametrize("row", LARGEST, ids=[row[0] for row in LARGEST])
def test_largest_accepted_values_run_everywhere(target, row):
    """What the spec accepts, every backend runs: the limits are the spec's, not a backend's."""
    backend, device = target
    _, x_shape, w_shape, kwargs = row
    x, w = _uniform(*x_shape), _uniform(*w_shape)
    _assert_close(conv2d(x, w, **kwargs, backend=backend, device=device), conv2d_float64(x, w, **kwargs))


def test_numpy_integer_device_index(target):
    backend, device = target
    y = conv2d(LIMIT_X, W3, padding=1, backend=backend, device=np.int64(device))
    _assert_close(y, conv2d_float64(LIMIT_X, W3, padding=1))


@pytest.mark.parametrize("shape", [(2, 128, 0, 130), (1, 128, 130, 0)], ids=["H=0", "W=0"])
def test_empty_input_with_padding_gives_bias_and_activation(target, shape):
    """Every output lies in the padding: bias plus activation. 128 channels and 33 4x4 tiles make the
    layer large enough for every backend's Winograd path."""
    backend, device = target
    w, b = _uniform(128, 128, 3, 3), _uniform(128)
    x = np.zeros(shape, np.float32)
    y = conv2d(x, w, b, padding=2, activation="sigmoid", backend=backend, device=device)
    n, _, h, wd = shape
    expected = activation_float64(b.astype(np.float64), Activation("sigmoid"))[None, :, None, None]
    _assert_close(y, np.broadcast_to(expected, (n, 128, h + 2, wd + 2)))


def _poison_pools(monkeypatch, backend: str) -> None:
    """Every buffer the backend's pools hand out is first filled with NaN bits, as a last user's data could be."""
    if backend == "opencl":
        import pyopencl as cl

        from convbackends.runtime import opencl

        empty, empty_array = opencl.Runtime.empty, opencl.Runtime.empty_array

        def fill(rt, buf, offset, nbytes):
            if nbytes >= 4:
                cl.enqueue_fill_buffer(rt.queue, buf, np.float32(np.nan), offset, nbytes // 4 * 4)

        def poisoned_empty(rt, *args, **kwargs):
            buf = empty(rt, *args, **kwargs)
            fill(rt, buf, 0, buf.size)
            return buf

        def poisoned_empty_array(rt, *args, **kwargs):
            arr = empty_array(rt, *args, **kwargs)
            fill(rt, arr.base_data, arr.offset, arr.nbytes)
            return arr

        monkeypatch.setattr(opencl.Runtime, "empty", poisoned_empty)
        monkeypatch.setattr(opencl.Runtime, "empty_array", poisoned_empty_array)
    elif backend == "cuda":
        from convbackends.runtime import cuda

        empty = cuda.Runtime.empty

        def poisoned_empty(rt, *args, **kwargs):
            arr = empty(rt, *args, **kwargs)
            if arr.dtype.itemsize == 4:
                arr.view(np.float32).fill(np.nan)
            return arr

        monkeypatch.setattr(cuda.Runtime, "empty", poisoned_empty)
        monkeypatch.setattr(cuda.Runtime, "empty_array", poisoned_empty)
    elif backend == "vulkan":
        from convbackends.runtime import vulkan

        acquire = vulkan.Device._acquire

        def poisoned_acquire(dev, *args):
            buf = acquire(dev, *args)
            dev.fill(buf, np.nan)
            return buf

        monkeypatch.setattr(vulkan.Device, "_acquire", poisoned_acquire)


def _every_op(backend, device):
    """One output per op and kernel kind (forward and deform's backward), as float arrays."""
    rng = np.random.default_rng(11)

    def u(*shape):
        return rng.uniform(-1, 1, shape).astype(np.float32)

    on = dict(backend=backend, device=device)
    outputs = []
    x = u(2, 64, 13, 11)
    for w, kwargs in [(u(64, 64, 3, 3), dict(padding=1)), (u(32, 64, 1, 1), {}), (u(64, 1, 3, 3), dict(stride=2, groups=64)),
                      (u(64, 8, 3, 3), dict(padding=1, groups=8)), (u(16, 64, 3, 3), dict(dilation=2, padding=2)),
                      (u(8, 64, 7, 7), dict(stride=2, padding=3))]:
        with Conv2d(w, u(w.shape[0]), activation="relu", **kwargs, **on) as layer:
            outputs.append(layer(x))
    with cb.ConvTranspose2d(u(64, 16, 4, 4), u(16), stride=2, padding=1, **on) as layer:
        outputs.append(layer(x))
    xd, wd = u(2, 16, 9, 7), u(24, 16, 3, 3)
    offset, mask = 3 * u(2, 18, 9, 7), u(2, 9, 9, 7)
    with cb.DeformConv2d(wd, u(24), padding=1, **on) as layer:
        outputs.append(layer(xd, offset, mask))
        outputs.extend(layer.backward(u(2, 24, 9, 7), xd, offset, mask))
    sites = np.stack(np.unravel_index(rng.choice(2 * 8 * 9 * 10, 150, replace=False), (2, 8, 9, 10)), 1).astype(np.int32)
    t = cb.SparseTensor(u(150, 12), sites, (8, 9, 10), 2)
    with cb.SparseConv3d(u(20, 12, 3, 3, 3), subm=True, **on) as subm, cb.SparseConv3d(u(8, 20, 3, 3, 3), stride=2, **on) as down:
        s = subm(t)
        outputs.extend([s.features, down(s).features])
    return [np.asarray(o) for o in outputs if o is not None]


def test_no_kernel_reads_memory_no_kernel_wrote(target, monkeypatch):
    """With every pooled device buffer handed out full of NaN, every op and kernel kind gives bitwise the same
    outputs as with the pools as they were: no output depends on memory that no kernel (or upload) wrote. A pad
    kernel that skipped the border fails it. (Reads whose results are dropped stay unseen here: llvmpipe's GEMM
    once read a last user's denormals past a column block's end, right results 30x slower; plans now take their
    buffers zeroed, tests/test_vulkan.py.)"""
    backend, device = target
    clean = _every_op(backend, device)
    assert all(np.isfinite(o).all() for o in clean)
    _poison_pools(monkeypatch, backend)
    poisoned = _every_op(backend, device)
    assert len(poisoned) == len(clean)
    for i, (a, b) in enumerate(zip(clean, poisoned)):
        assert np.array_equal(a, b), f"output {i}: {np.isnan(b).sum()} NaN, max abs difference {np.nanmax(np.abs(a - b))}"
