"""conv_transpose2d on every backend and device: cv2.dnn parity (ONNX ConvTranspose), random layers against the
float64 scatter oracle, the phase decomposition, output_size, device arrays, and the errors."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convbackends as cb
from conftest import parity_tests, run_threads
from convbackends.ops.conv_transpose2d import ConvTranspose2d, ConvTranspose2dSpec, conv_transpose2d
from convbackends.parity import ACTIVATIONS, SUITES, Case, compare, float64_output
from convbackends.reference import conv_transpose2d_float64, cv2_conv_transpose2d

CASES = SUITES["transposed"]


test_parity_with_cv2_dnn, cv2_reference = parity_tests(CASES)


def test_float64_oracle_agrees_with_cv2_dnn():
    """The oracle (a scatter by definition) and cv2.dnn are independent; they must agree on the sweep."""
    for case in CASES:
        _, _, _, passed, detail = compare(cv2_reference(case), float64_output(case))
        assert passed, f"{case}: {detail}"


@st.composite
def random_layers(draw):
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    padding = draw(st.one_of(st.integers(0, 3), st.tuples(*[st.integers(0, 4)] * 4), st.just("valid")))
    kwargs = dict(stride=stride, dilation=dilation, output_padding=output_padding, padding=padding, groups=groups,
                  activation=draw(st.sampled_from(ACTIVATIONS)))
    x_shape = (draw(st.integers(1, 3)), cg * groups, draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    case = Case("random", x_shape, (cg * groups, og, kh, kw), draw(st.booleans()), kwargs,
                draw(st.integers(0, 2**31)), "conv_transpose2d")
    try:
        ConvTranspose2dSpec.create(np.zeros(case.w_shape, np.float32), **kwargs).geometry(x_shape)
    except ValueError:  # an output below one pixel: pads larger than the output
        return None
    return case


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_random_layers_against_float64(target, case):
    if case is None:
        return
    backend, device = target
    x, w, b = case.tensors()
    with case.layer(w, b, backend=backend, device=device) as layer:
        y = layer(x)
    _, _, _, passed, detail = compare(y, float64_output(case))
    assert passed, f"{case.x_shape} {case.w_shape} {case.kwargs}: {detail}"


def test_output_size_and_non_contiguous_input(target):
    backend, device = target
    case = Case("T", (2, 6, 5, 4), (6, 4, 3, 3), True, dict(stride=2, padding=1, groups=2), 3, "conv_transpose2d")
    x, w, b = case.tensors()
    with ConvTranspose2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        for output_size in ((9, 7), (10, 8), (9, 8)):
            oph, opw = output_size[0] - 9, output_size[1] - 7
            ref = conv_transpose2d_float64(x, w, b, output_padding=(oph, opw), **case.kwargs)
            assert compare(layer(x, output_size=output_size), ref)[3]
        flipped = x[:, :, ::-1, ::2]
        assert compare(layer(flipped), conv_transpose2d_float64(flipped, w, b, **case.kwargs))[3]


def test_nan_and_inf_reach_exactly_their_outputs(target):
    backend, device = target
    case = Case("T", (1, 4, 6, 5), (4, 3, 4, 4), True, dict(stride=2, padding=1), 5, "conv_transpose2d")
    x, w, b = case.tensors()
    x[0, 1, 2, 3], x[0, 2, 4, 0] = np.nan, np.inf
    with np.errstate(invalid="ignore"):
        ref = conv_transpose2d_float64(x, w, b, **case.kwargs)
    with ConvTranspose2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        y = layer(x)
    assert np.isnan(ref).any() and np.isfinite(ref).any()
    assert compare(y, ref)[3]


@pytest.mark.parametrize("kernel, kwargs", [((1, 1), dict(stride=2)), ((2, 1), dict(stride=(1, 3), dilation=(2, 1))),
                                            ((5, 5), dict(stride=4, padding=(6, 1, 0, 2)))])
def test_outputs_no_tap_reaches_are_the_bias_whatever_x_holds(target, kernel, kwargs):
    """Phases that see only the bias run on zeros: a NaN in x's first pixel must not reach them."""
    backend, device = target
    case = Case("T", (1, 3, 4, 5), (3, 2, *kernel), True, dict(kwargs, activation="sigmoid"), 6, "conv_transpose2d")
    x, w, b = case.tensors()
    x[:, :, 0, 0] = np.nan
    with np.errstate(invalid="ignore"):
        ref = conv_transpose2d_float64(x, w, b, **case.kwargs)
    with ConvTranspose2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        y = layer(x)
    assert compare(y, ref)[3]


def test_one_shot_call_reuses_the_layer_and_sees_weights_changed_in_place(target):
    backend, device = target
    case = Case("T", (1, 4, 5, 5), (4, 2, 4, 4), True, dict(stride=2, padding=1), 9, "conv_transpose2d")
    x, w, b = case.tensors()
    first = conv_transpose2d(x, w, b, backend=backend, device=device, **case.kwargs)
    assert compare(first, conv_transpose2d_float64(x, w, b, **case.kwargs))[3]
    w[0, 1, 2, 3] += 1.0
    second = conv_transpose2d(x, w, b, backend=backend, device=device, **case.kwargs)
    assert compare(second, conv_transpose2d_float64(x, w, b, **case.kwargs))[3]
    assert not np.allclose(first, second)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=2, output_padding=2), "output_padding must be smaller than stride or dilation"),
    (dict(output_padding=1), "output_padding must be smaller than stride or dilation"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(groups=3), "groups=3 must divide in_channels=4"),
    (dict(padding="same", stride=4), 'padding="same"'),
    (dict(padding=-1), "padding must be >= 0"),
])
def test_bad_layers_are_refused_with_the_same_message_on_every_backend(target, kwargs, message):
    backend, device = target
    w = np.zeros((4, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match=message):
        ConvTranspose2d(w, backend=backend, device=device, **kwargs)


def test_bad_inputs_are_refused(target):
    backend, device = target
    w = np.zeros((4, 2, 3, 3), np.float32)
    with ConvTranspose2d(w, stride=2, padding=1, backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match="x has 3 channels but w expects 4"):
            layer(np.zeros((1, 3, 5, 5), np.float32))
        with pytest.raises(ValueError, match=r"output_size \(20, 9\) is unreachable.*height can be 9..10"):
            layer(np.zeros((1, 4, 5, 5), np.float32), output_size=(20, 9))
        with pytest.raises(TypeError, match="x must be float32"):
            layer(np.zeros((1, 4, 5, 5), np.float64))
    with pytest.raises(ValueError, match=r"w must be 4-D \(in_channels, out_channels/groups, kh, kw\)"):
        ConvTranspose2d(np.zeros((4, 2, 3), np.float32), backend=backend, device=device)
    with pytest.raises(ValueError, match="output_size cannot be combined"):
        conv_transpose2d(np.zeros((1, 4, 5, 5), np.float32), w, stride=2, padding="same", output_size=(10, 10),
                         backend=backend, device=device)


def test_same_padding_gives_input_times_stride():
    """ONNX SAME_UPPER for ConvTranspose: output = input * stride, the odd padding row at the end."""
    w = np.random.default_rng(1).uniform(-1, 1, (3, 2, 4, 3)).astype(np.float32)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 5, 7)).astype(np.float32)
    for stride in ((1, 1), (2, 3), (3, 2)):
        spec = ConvTranspose2dSpec.create(w, stride=stride, padding="same")
        total = [(k - 1) + 1 - s for k, s in zip((4, 3), stride)]
        assert spec.pads == (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
        y = conv_transpose2d(x, w, stride=stride, padding="same")
        assert y.shape[2:] == (5 * stride[0], 7 * stride[1])
        assert compare(y, cv2_conv_transpose2d(x, w, stride=stride, padding="same"))[3]


def test_phases_multiply_no_zeros():
    """Every phase's taps are the kernel taps that reach it: together each tap once per phase grid."""
    spec = ConvTranspose2dSpec.create(np.zeros((4, 2, 4, 4), np.float32), stride=2, padding=1)
    phases = spec.phases(spec.geometry((1, 4, 8, 8)))
    assert len(phases) == 4
    assert sorted(i for p in phases[::2] for i in p.rows.taps) == [0, 1, 2, 3]
    assert all(p.spec.kh == 2 and p.spec.kw == 2 and p.spec.stride == (1, 1) for p in phases)


def _stacks(w_shape, x_shape, **kwargs):
    from convbackends.backends._phases import stacks

    spec = ConvTranspose2dSpec.create(np.zeros(w_shape, np.float32), **kwargs)
    return stacks(spec, spec.geometry(x_shape))


def test_phases_of_one_shape_run_as_one_stacked_conv2d():
    # DCGAN's 4x4 stride 2 pad 1: four 2x2 phases, each padded on other sides: one conv2d of 4 x O outputs over
    # x padded by 1 all round, 9x9 outputs of which each phase takes an 8x8 window.
    (dcgan,) = _stacks((512, 256, 4, 4), (1, 512, 8, 8), stride=2, padding=1)
    assert len(dcgan.phases) == 4 and dcgan.spec.out_channels == 1024 and (dcgan.spec.kh, dcgan.spec.kw) == (2, 2)
    assert dcgan.spec.pads == (1, 1, 1, 1) and (dcgan.rows.count, dcgan.cols.count) == (9, 9)
    assert sorted(dcgan.offsets) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # U-Net's 2x2 stride 2: four 1x1 phases over all of x, no padding: one 1x1 GEMM.
    (unet,) = _stacks((256, 128, 2, 2), (1, 256, 64, 64), stride=2)
    assert unet.spec.out_channels == 512 and unet.spec.pads == (0, 0, 0, 0) and set(unet.offsets) == {(0, 0)}
    # Depthwise: the phases stack within each group, a channel multiplier of 4.
    (fcn,) = _stacks((21, 1, 4, 4), (1, 21, 64, 64), stride=2, padding=1, groups=21)
    assert fcn.spec.groups == 21 and fcn.spec.out_channels == 84
    # 3x3 stride 2: phases of 1x1, 1x2, 2x1 and 2x2 taps, no two alike.
    assert [len(s.phases) for s in _stacks((128, 64, 3, 3), (1, 128, 32, 32), stride=2, padding=1,
                                           output_padding=1)] == [1, 1, 1, 1]
    # On a 1x1 input the union window would double each side of every phase's output: not stacked.
    assert [len(s.phases) for s in _stacks((8, 4, 4, 4), (1, 8, 1, 1), stride=2, padding=1)] == [1, 1, 1, 1]


def _plans_as_cpu_device(backend: str, device: int) -> bool:
    if backend == "opencl":
        from convbackends.runtime.opencl import BACKEND

        return BACKEND.runtime(device).limits.is_cpu
    if backend == "vulkan":
        from convbackends.runtime import vulkan as _vk

        return _vk.device(device).type == "cpu"
    return False


def test_cpu_devices_stack_only_phases_whose_windows_are_the_same(target):
    """PoCL and llvmpipe ran a stack over grown windows slower than its phases: there only exact stacks."""
    backend, device = target
    with ConvTranspose2d(np.zeros((16, 8, 4, 4), np.float32), stride=2, padding=1, backend=backend,
                         device=device) as dcgan, \
            ConvTranspose2d(np.zeros((16, 8, 2, 2), np.float32), stride=2, backend=backend, device=device) as unet:
        x = np.zeros((1, 16, 8, 8), np.float32)
        grown = [len(s.phases) for s in dcgan._prepared.plan(dcgan.geometry(x))[1]]
        exact = [len(s.phases) for s in unet._prepared.plan(unet.geometry(x))[1]]
    assert grown == ([1, 1, 1, 1] if _plans_as_cpu_device(backend, device) else [4])
    assert exact == [4]


def test_numpy_runs_col2im_where_the_phases_do_not_stack_and_tiles_it():
    from convbackends.backends.numpy import conv_transpose2d as numpy_ct

    case = Case("T", (3, 6, 7, 5), (6, 4, 3, 3), True, dict(stride=2, padding=1, output_padding=1, groups=2,
                                                             activation="relu"), 2, "conv_transpose2d")
    x, w, b = case.tensors()
    with ConvTranspose2d(w, b, **case.kwargs) as layer:
        prepared = layer._prepared
        geom = layer.geometry(x)
        assert prepared.uses_col2im(geom)
        ref = float64_output(case)
        assert compare(layer(x), ref)[3]
    # Z in bands of one input row (and one image): every band adds its taps into rows other bands add to.
    for tile_bytes in (1, 4 * 4 * 9 * 5 * 7, 4 * 4 * 9 * 5 * 7 * 2):
        out = np.empty(geom.output_shape, np.float32)
        numpy_ct.conv_transpose2d_col2im(x, prepared.w_t, prepared.bias, prepared.spec.activation, geom, out,
                                         tile_bytes)
        assert compare(out, ref)[3], tile_bytes
    with ConvTranspose2d(np.zeros((8, 4, 4, 4), np.float32), stride=2, padding=1) as layer:
        assert not layer._prepared.uses_col2im(layer.geometry(np.zeros((1, 8, 8, 8), np.float32)))


def test_public_names():
    assert cb.ConvTranspose2d is ConvTranspose2d and cb.conv_transpose2d is conv_transpose2d


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
def test_opencl_device_arrays_in_and_out(monkeypatch, as_gpu):
    """pyopencl arrays stay on the device: the phases run on views of x and are interleaved there."""
    from conftest import cpu_device

    device = cpu_device(monkeypatch, "opencl", as_gpu)
    import pyopencl.array as cla

    from convbackends.runtime.opencl import BACKEND

    queue = BACKEND.runtime(device).queue
    case = Case("T", (2, 6, 7, 5), (6, 4, 4, 3), True, dict(stride=(2, 3), padding=(3, 0, 1, 1), groups=2,
                                                             activation="relu"), 4, "conv_transpose2d")
    x, w, b = case.tensors()
    with ConvTranspose2d(w, b, backend="opencl", device=device, **case.kwargs) as layer:
        y = layer(cla.to_device(queue, x))
        assert isinstance(y, cla.Array)
        assert compare(y.get(), conv_transpose2d_float64(x, w, b, **case.kwargs))[3]


def test_threads_share_a_layer(target):
    """8 threads x 20 calls on one layer, every output checked against the float64 oracle."""
    backend, device = target
    case = Case("T", (1, 6, 5, 4), (6, 4, 4, 4), True, dict(stride=2, padding=1, activation="relu"), 11,
                "conv_transpose2d")
    _, w, b = case.tensors()
    inputs = [np.random.default_rng(t).uniform(-1, 1, case.x_shape).astype(np.float32) for t in range(8)]
    refs = [conv_transpose2d_float64(x, w, b, **case.kwargs) for x in inputs]
    wrong = [0] * len(inputs)
    with ConvTranspose2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        def work(t):
            for _ in range(20):
                wrong[t] += not compare(layer(inputs[t]), refs[t])[3]

        run_threads(work, len(inputs))
    assert sum(wrong) == 0


def test_phase_sets_kept_per_layer_are_bounded(monkeypatch):
    """A layer keeps one prepared phase set per output_padding in use, at most PHASE_SETS_KEPT."""
    from convbackends.backends import _phases

    monkeypatch.setattr(_phases, "PHASE_SETS_KEPT", 2)
    case = Case("T", (1, 3, 4, 4), (3, 2, 3, 3), True, dict(stride=4, padding=1), 2, "conv_transpose2d")
    x, w, b = case.tensors()
    with ConvTranspose2d(w, b, **case.kwargs) as layer:
        for extra in range(4):  # output_padding 0..3: four distinct phase sets
            size = (4 * (4 - 1) + 2 + 1 - 2 + extra,) * 2  # stride * (H - 1) + (k - 1) + 1 - pads + extra
            y = layer(x, output_size=size)
            ref = conv_transpose2d_float64(x, w, b, output_padding=extra, **case.kwargs)
            assert compare(y, ref)[3]
            assert len(layer._prepared._sets) <= 2


def test_one_layer_takes_inputs_of_every_size(target):
    """A phase set prepared for one input size serves the next size of the same key with that size's outputs."""
    backend, device = target
    case = Case("T", (1, 4, 4, 3), (4, 6, 4, 4), True, dict(stride=2, padding=2), 5, "conv_transpose2d")
    _, w, b = case.tensors()
    rng = np.random.default_rng(5)
    with ConvTranspose2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        for h, w_ in ((4, 3), (4, 6), (7, 6), (6, 3), (5, 5), (4, 3)):
            x = rng.uniform(-1, 1, (1, 4, h, w_)).astype(np.float32)
            assert compare(layer(x), conv_transpose2d_float64(x, w, b, **case.kwargs))[3], (h, w_)
