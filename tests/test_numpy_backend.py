"""What only the numpy backend has: tiled column buffers, Winograd beside GEMM, depthwise columns, its epilogue.

The shared parity suite checks results against cv2.dnn; these tests pin the backend's own paths against
the float64 oracle, forcing each path and tile split directly.
"""
import threading
import tracemalloc
import warnings

import numpy as np
import pytest

import convbackends
from convbackends import Conv2d
from convbackends.backends import _winograd
from convbackends.backends.numpy import conv2d as nc
from convbackends.runtime import numpy as numpy_runtime
from convbackends.parity import Case, compare
from convbackends.reference import activation_float64, conv2d_float64
from convbackends.spec import Activation, Conv2dSpec


def _tensors(x_shape, w_shape, seed=0):
    return Case("numpy-backend", x_shape, w_shape, seed=seed).tensors()


def _assert_matches(y, ref):
    *_, passed, detail = compare(y, ref)
    assert passed, detail
    assert y.dtype == np.float32 and y.flags.c_contiguous


def _assert_same_non_finite(x, w, b, **kwargs):
    """NaN and inf land exactly where the float64 oracle puts them, with no floating-point warning."""
    with np.errstate(invalid="ignore"):
        ref = conv2d_float64(x, w, b, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = Conv2d(w, b, **kwargs)(x)
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.array_equal(np.isinf(y), np.isinf(ref))


def _peak_bytes_in_fresh_thread(fn) -> tuple[object, int]:
    """Peak traced allocation of fn(); a new thread starts with empty scratch buffers, so they count."""
    result = {}

    def target():
        tracemalloc.start()
        try:
            result["value"] = fn()
            result["peak"] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return result["value"], result["peak"]


def test_device_names_numpy_and_blas():
    (device,) = numpy_runtime.BACKEND.devices()
    assert device.type == "cpu" and device.facts["numpy"] == np.__version__
    assert np.__version__ in device.name and device.facts["blas"] in device.name
    assert device.facts["cores"] >= 1


def test_tile_cap_bounds_peak_memory():
    # A whole im2col would be 32*25*96*96*4 B = 29 MB; a 1 MB cap keeps the run near input + output.
    x, w, b = _tensors((1, 32, 96, 96), (16, 32, 5, 5))
    layer = Conv2d(w, b, padding=2, activation="relu")
    layer._prepared.tile_bytes = 1 << 20
    y, peak = _peak_bytes_in_fresh_thread(lambda: layer(x))
    assert peak < 4 * x.nbytes, f"peak {peak / 2**20:.1f} MB"
    _assert_matches(y, conv2d_float64(x, w, b, padding=2, activation="relu"))


def test_default_cap_on_layer_whose_im2col_exceeds_it():
    x, w, b = _tensors((1, 64, 192, 192), (32, 64, 3, 3))
    kwargs = dict(padding=2, dilation=2)  # dilation keeps it off Winograd
    layer = Conv2d(w, b, **kwargs)
    full_columns = 64 * 9 * 192 * 192 * 4
    assert full_columns > 2 * nc.TILE_BYTES
    y, peak = _peak_bytes_in_fresh_thread(lambda: layer(x))
    assert peak < nc.TILE_BYTES + 3 * x.nbytes, f"peak {peak / 2**20:.1f} MB"
    # The float64 oracle on a band: output rows 40..49 read input rows 38..51 (pad 2, dilation 2).
    ref = conv2d_float64(x[:, :, 38:52], w, b, padding=(0, 2, 0, 2), dilation=2)
    _assert_matches(np.ascontiguousarray(y[:, :, 40:50]), ref)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((3, 6, 11, 13), (9, 2, 3, 3), dict(padding=(2, 1, 0, 1), groups=3)),  # stride 1: whole-row runs
        ((3, 6, 11, 13), (8, 6, 3, 2), dict(stride=(2, 1), dilation=(1, 2), padding=1)),  # strided view
        ((2, 5, 9, 10), (4, 5, 4, 4), dict(stride=3, padding=(1, 2, 3, 0))),
        ((2, 8, 10, 9), (12, 2, 3, 3), dict(stride=2, padding=1, groups=4)),
    ],
)
@pytest.mark.parametrize("tile_elems", [1, 60, 700, 1 << 20])
def test_forced_tiles_split_images_rows_and_columns(x_shape, w_shape, kwargs, tile_elems, monkeypatch):
    # 1 element forces single-column runs, 60 and 700 row bands or partial rows, 1M whole batches;
    # grouped layers then also go one group at a time.
    monkeypatch.setattr(nc, "GROUP_COLUMNS_ELEMS", 1 if tile_elems < 1000 else nc.GROUP_COLUMNS_ELEMS)
    x, w, b = _tensors(x_shape, w_shape)
    layer = Conv2d(w, b, activation="silu", **kwargs)
    layer._prepared.tile_bytes = tile_elems * 4
    _assert_matches(layer(x), conv2d_float64(x, w, b, activation="silu", **kwargs))


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((2, 12, 9, 11), (8, 3, 3, 3), dict(padding=1, groups=4)),
        ((1, 12, 10, 13), (12, 4, 3, 5), dict(padding=(2, 3, 0, 5), dilation=(1, 2), groups=3)),  # asymmetric
        ((2, 64, 8, 7), (32, 32, 3, 3), dict(padding=2, dilation=2, groups=2)),  # 32 channels per group
    ],
)
@pytest.mark.parametrize("forced", [False, True])
def test_grouped_tap_gemms(x_shape, w_shape, kwargs, forced, monkeypatch):
    # Forced: bands of one output row and blocks of one group.
    if forced:
        monkeypatch.setattr(nc, "GEMM_SERIAL_ELEMS", 1)
        monkeypatch.setattr(nc, "TAP_GEMM_BLOCK_ELEMS", 1)
    x, w, b = _tensors(x_shape, w_shape)
    layer = Conv2d(w, b, activation="silu", **kwargs)
    assert layer._prepared.path == "tap_gemms"
    _assert_matches(layer(x), conv2d_float64(x, w, b, activation="silu", **kwargs))


def test_grouped_layers_with_many_channels_per_group_take_implicit_gemm():
    x, w, b = _tensors((1, 128, 9, 9), (16, 64, 3, 3))
    assert Conv2d(w, b, padding=1, groups=2)._prepared.path == "implicit_gemm"
    assert Conv2d(w[:, :8], b, padding=1, stride=2, groups=16)._prepared.path == "implicit_gemm"


def test_grouped_tap_gemms_keep_non_finite_mask():
    x, w, b = _tensors((1, 8, 9, 9), (8, 2, 3, 3))
    x[0, 1, 0, 8], x[0, 2, 5, 0], x[0, 7, 8, 8] = np.inf, np.nan, -np.inf
    _assert_same_non_finite(x, w, b, padding=1, groups=4)


@pytest.mark.parametrize("hw", [(12, 12), (13, 18), (31, 29)])
def test_winograd_and_gemm_agree_with_float64(hw):
    x, w, b = _tensors((2, 64, *hw), (72, 64, 3, 3))
    spec = Conv2dSpec.create(w, b, padding=(1, 0, 2, 1), activation="hardswish")
    geom = spec.geometry(x.shape)
    prepared = nc.prepare(numpy_runtime.BACKEND, spec, w, b, numpy_runtime.BACKEND.devices()[0])
    assert prepared.winograd is not None
    ref = conv2d_float64(x, w, b, padding=(1, 0, 2, 1), activation="hardswish")
    for tile_bytes in (nc.TILE_BYTES, 36 * 72 * 4 * 5):  # whole batch, and runs of 5 tiles
        wino = np.empty(geom.output_shape, np.float32)
        nc.conv2d_winograd(x, prepared.winograd, b, spec.activation, geom, wino, tile_bytes)
        _assert_matches(wino, ref)
    gemm = np.empty(geom.output_shape, np.float32)
    nc.conv2d_implicit_gemm(x, prepared.w, prepared.bias, spec.activation, geom, gemm)
    _assert_matches(gemm, ref)


@pytest.mark.parametrize(
    "hw, dilation, pads, phases_split",
    [
        ((32, 40), 2, 2, True),
        ((36, 42), (2, 3), (2, 3, 4, 0), True),  # asymmetric dilation and pads, still whole phases
        ((33, 40), 2, 2, False),  # 33 rows do not split into 2 phases: the GEMM
        ((32, 40), 2, 1, False),  # a pad of 1 is not a whole phase row: the GEMM
    ],
)
def test_dilated_winograd_over_phases(hw, dilation, pads, phases_split):
    x, w, b = _tensors((2, 64, *hw), (72, 64, 3, 3))
    kwargs = dict(dilation=dilation, padding=pads, activation="relu")
    layer = Conv2d(w, b, **kwargs)
    phases = nc.winograd_phases(layer.spec.geometry(x.shape))
    assert (phases is not None) == phases_split
    if phases_split:
        dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
        assert (phases.n, phases.dh, phases.dw) == (2 * dh * dw, 1, 1)
        assert nc.winograd_tiles(phases) >= nc.WINOGRAD_MIN_TILES
    _assert_matches(layer(x), conv2d_float64(x, w, b, **kwargs))


def test_dilated_winograd_layer_falls_back_to_gemm_on_non_finite_input():
    x, w, b = _tensors((1, 64, 32, 32), (64, 64, 3, 3))
    x[0, 3, 10, 10], x[0, 7, 21, 5] = np.nan, np.inf
    _assert_same_non_finite(x, w, b, dilation=2, padding=2)


@pytest.mark.parametrize("o, c", [(72, 64), (5, 3)])
def test_winograd_weights_match_float64_transform(o, c):
    # The float32 GEMM against G w G^T in float64, written out per (o, c) and independent of it.
    _, w, _ = _tensors((1, c, 3, 3), (o, c, 3, 3), seed=4)
    g = _winograd.G
    ref = np.stack([[g @ w[i, j].astype(np.float64) @ g.T for j in range(c)] for i in range(o)])
    u = _winograd.weights(w)
    assert u.shape == (36, c, o) and u.dtype == np.float32
    assert np.abs(u - ref.reshape(o, c, 36).transpose(2, 1, 0)).max() <= 1e-6
    # The (36, O, C) under the view is contiguous: the device backends' GEMM weights without a copy.
    assert u.transpose(0, 2, 1).flags.c_contiguous


def test_winograd_error_with_512_channels():
    x, w, b = _tensors((1, 512, 16, 16), (512, 512, 3, 3), seed=3)
    spec = Conv2dSpec.create(w, b, padding=1)
    geom = spec.geometry(x.shape)
    y = np.empty(geom.output_shape, np.float32)
    nc.conv2d_winograd(x, _winograd.weights(w), b, spec.activation, geom, y)
    _assert_matches(y, conv2d_float64(x, w, b, padding=1))


def test_winograd_layer_takes_gemm_for_huge_finite_input():
    # 3e37 is finite, but Winograd's transforms (entries up to 25) would scale it past float32's range.
    x, w, b = _tensors((1, 64, 28, 28), (64, 64, 3, 3))
    x[0, 5, 14, 14] = 3e37
    layer = Conv2d(w, b, padding=1)
    _assert_matches(layer(x), conv2d_float64(x, w, b, padding=1))


def test_winograd_layer_falls_back_to_gemm_on_non_finite_input():
    x, w, b = _tensors((1, 64, 28, 28), (64, 64, 3, 3))
    x[0, 3, 10, 10], x[0, 7, 20, 5], x[0, 9, 0, 27] = np.nan, np.inf, -np.inf
    layer = Conv2d(w, b, padding=1, activation="relu")
    assert layer._prepared.winograd is not None
    with np.errstate(invalid="ignore"):
        ref = conv2d_float64(x, w, b, padding=1, activation="relu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    assert np.array_equal(np.isfinite(y), np.isfinite(ref))
    _assert_matches(y, ref)
    # Why it must fall back: a Winograd tile spreads the NaN over all 16 of its outputs.
    geom = layer.spec.geometry(x.shape)
    wino = np.empty(geom.output_shape, np.float32)
    with np.errstate(invalid="ignore"):
        nc.conv2d_winograd(x, layer._prepared.winograd, b, layer.spec.activation, geom, wino)
    assert np.count_nonzero(~np.isfinite(wino)) > np.count_nonzero(~np.isfinite(ref))


@pytest.mark.parametrize("view", ["flipped", "strided", "transposed"])
def test_non_contiguous_inputs(view):
    x, w, b = _tensors((2, 8, 20, 22), (12, 8, 3, 3))
    x = {"flipped": x[:, :, ::-1, ::-1], "strided": x[:, :, ::2, 1::2], "transposed": x.transpose(0, 1, 3, 2)}[view]
    assert not x.flags.c_contiguous
    y = Conv2d(w, b, padding=1)(x)
    _assert_matches(y, conv2d_float64(np.ascontiguousarray(x), w, b, padding=1))


@pytest.mark.parametrize(
    "stride, dilation, pads",
    [
        ((1, 1), (1, 1), 1),
        ((2, 3), (1, 2), (0, 2, 3, 1)),
        ((3, 2), (2, 3), (4, 0, 1, 3)),
        ((2, 1), (1, 1), (1, 2)),  # OW == W with a row stride: rows are not one run
    ],
)
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_strides_and_dilations(stride, dilation, pads, mult):
    x, w, b = _tensors((2, 5, 17, 16), (5 * mult, 1, 3, 5))
    kwargs = dict(stride=stride, dilation=dilation, padding=pads, groups=5, activation="mish")
    _assert_matches(Conv2d(w, b, **kwargs)(x), conv2d_float64(x, w, b, **kwargs))


@pytest.mark.parametrize(
    "kernel, dilation, pads",
    [
        ((3, 3), (1, 1), 1),
        ((3, 5), (1, 2), (2, 3, 0, 5)),  # asymmetric: runs shifted 3 columns left, 5 right
        ((1, 3), (1, 1), (0, 0, 0, 2)),  # every shifted run crosses the row end
        ((5, 3), (2, 1), (4, 2, 4, 0)),
    ],
)
@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_rows_without_pad_columns(kernel, dilation, pads, mult):
    # Stride 1 with OW == W: taps whose runs cross a row end read pad columns, zeroed in the columns.
    x, w, b = _tensors((2, 6, 9, 11), (6 * mult, 1, *kernel))
    kwargs = dict(dilation=dilation, padding=pads, groups=6, activation="silu")
    y = Conv2d(w, b, **kwargs)(x)
    assert y.shape[-1] == x.shape[-1]
    _assert_matches(y, conv2d_float64(x, w, b, **kwargs))


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_keeps_non_finite_mask_at_row_ends(stride):
    # The entries that stand for pad columns read a real pixel of the next row: zeroed, not multiplied.
    x, w, b = _tensors((1, 4, 9, 9), (4, 1, 3, 3))
    x[0, 1, 0, 8], x[0, 2, 5, 0], x[0, 3, 8, 8] = np.inf, np.nan, -np.inf
    _assert_same_non_finite(x, w, b, stride=stride, padding=1, groups=4)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs",
    [
        ((1, 64, 40, 40), (128, 1, 3, 3), dict(padding=1, groups=64)),  # depthwise, channel blocks
        ((2, 24, 31, 29), (24, 1, 3, 3), dict(stride=2, padding=1, groups=24)),  # depthwise, strided
        ((2, 32, 20, 20), (48, 32, 1, 1), dict()),  # 1x1
        ((1, 16, 30, 30), (24, 16, 3, 3), dict(padding=2, dilation=2)),  # whole-row runs
        ((2, 16, 30, 30), (24, 16, 3, 3), dict(stride=2, padding=1)),  # strided view
        ((1, 32, 24, 24), (32, 4, 3, 3), dict(padding=1, groups=8)),  # grouped
        ((2, 64, 46, 46), (72, 64, 3, 3), dict(padding=1)),  # Winograd, wide blocks, cropped
        ((1, 64, 14, 14), (80, 64, 3, 3), dict(padding=1)),  # Winograd, few tiles
        ((1, 64, 32, 32), (64, 64, 3, 3), dict(padding=2, dilation=2)),  # Winograd over dilation phases
    ],
)
def test_paths_split_across_threads(x_shape, w_shape, kwargs, monkeypatch):
    # Three parts whatever the machine: copies, epilogues and depthwise blocks all run on the pool.
    monkeypatch.setattr(numpy_runtime, "workers", lambda: 3)
    monkeypatch.setattr(nc, "workers", lambda: 3)
    monkeypatch.setattr(numpy_runtime, "PARALLEL_MIN_ELEMS", 64)
    x, w, b = _tensors(x_shape, w_shape)
    kwargs = dict(kwargs, activation="relu6")
    _assert_matches(Conv2d(w, b, **kwargs)(x), conv2d_float64(x, w, b, **kwargs))


ACTIVATIONS = ["relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.1),
               ("leaky_relu", -0.5), ("leaky_relu", 3.0), ("clip", -0.3, 0.4)]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_activation_extremes_without_warnings(activation):
    act = Activation.parse(activation)
    big = np.finfo(np.float32).max
    y = np.array([-big, -1e30, -100.0, -20.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 20.0, 100.0, 1e30, big, np.nan],
                 np.float32)
    with np.errstate(invalid="ignore"):
        ref = activation_float64(y.astype(np.float64), act)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nc.activate(y, act)
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(y[-1])
    finite = np.abs(ref) <= big  # leaky_relu(-big, 3) overflows float32 itself; NaN compares False
    assert np.all(np.abs(y[finite] - ref[finite]) <= 1e-6 * np.maximum(1, np.abs(ref[finite])))


@pytest.fixture
def restore_threads():
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        convbackends.set_num_threads(None)


def test_set_num_threads_sets_pool_and_blas(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, w, b = _tensors((1, 32, 20, 20), (32, 1, 3, 3))
    convbackends.set_num_threads(1)
    assert convbackends.get_num_threads() == 1
    assert {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"} == {1}
    _assert_matches(Conv2d(w, b, padding=1, groups=32)(x), conv2d_float64(x, w, b, padding=1, groups=32))
    convbackends.set_num_threads(None)
    assert convbackends.get_num_threads() == numpy_runtime.cores()


def test_set_num_threads_without_threadpoolctl_warns(restore_threads, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "threadpoolctl", None)  # import fails
    with pytest.warns(RuntimeWarning, match="threadpoolctl is not installed"):
        convbackends.set_num_threads(3)
    assert convbackends.get_num_threads() == 3
    x, w, b = _tensors((2, 16, 30, 30), (16, 2, 3, 3))
    _assert_matches(Conv2d(w, b, padding=1, groups=8)(x), conv2d_float64(x, w, b, padding=1, groups=8))


@pytest.mark.parametrize("bad, error, message", [
    (0, ValueError, "num_threads must be >= 1, got 0"),
    (-2, ValueError, "num_threads must be >= 1, got -2"),
    (1.5, TypeError, "num_threads must be an int or None, got float 1.5"),
    (True, TypeError, "num_threads must be an int or None, got bool True"),
    ("2", TypeError, "num_threads must be an int or None, got str '2'"),
])
def test_set_num_threads_rejects_bad_counts(bad, error, message):
    with pytest.raises(error) as info:
        convbackends.set_num_threads(bad)
    assert str(info.value) == message
