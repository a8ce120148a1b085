"""deform_conv2d on every backend and device: the parity suite "deform" against the float64 oracle (itself checked
against onnx.reference's DeformConv and, at zero offsets, cv2.dnn's Conv), random layers, samples outside the
image, NaN, non-contiguous inputs, errors; and the five gradients against finite differences of the oracle, away
from the kinks, in the border cells and, one-sided, at integer sample coordinates."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convbackends as cb
from conftest import parity_tests
from convbackends.ops.deform_conv2d import DeformConv2d, DeformConv2dSpec, deform_conv2d, deform_conv2d_backward
from convbackends.parity import ACTIVATIONS, SUITES, Case, check, compare, float64_output
from convbackends.reference import cv2_conv2d, deform_conv2d_float64, onnx_deform_conv2d
from convbackends.spec import Conv2dSpec

CASES = SUITES["deform"]


test_parity_with_the_float64_oracle, oracle = parity_tests(CASES)


def _one_output_channel_per_group(case: Case) -> Case:
    """The case with one output channel per weight group: onnx.reference loops over output channels (seconds a
    case), and the sampling, the offset groups against the weight groups and the epilogue are all still there."""
    groups = case.kwargs.get("groups", 1)
    return dataclasses.replace(case, name=case.name + "-o1pergroup", w_shape=(groups, *case.w_shape[1:]))


# Activations other than mish and clip are left out: the oracle's epilogue is conv2d's, checked against cv2.dnn.
ONNX_CASES = [_one_output_channel_per_group(c) for c in CASES
              if str(c.kwargs.get("activation", "")) in ("", "None", "mish", "('clip', -0.3, 0.4)")]


@pytest.mark.parametrize("case", ONNX_CASES, ids=str)
def test_float64_oracle_agrees_with_onnx_reference(case):
    """Two independent definitions: the oracle's direct bilinear sums and onnx.reference's GridSample loops."""
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    _, _, _, passed, detail = compare(onnx_deform_conv2d(x, offset, w, b, mask, **case.kwargs), float64_output(case))
    assert passed, f"{case}: {detail}"


def test_zero_offsets_and_unit_mask_are_cv2_dnn_conv(target):
    """At zero offsets every tap samples a pixel (or the padding) exactly: the layer is conv2d."""
    backend, device = target
    case = Case("zero", (2, 6, 7, 8), (8, 3, 3, 3), True, dict(stride=(1, 2), padding=(1, 2, 0, 1), dilation=(2, 1),
                                                              groups=2, activation="relu"), 4)
    x, w, b = case.tensors()
    conv = Conv2dSpec.create(w, **case.kwargs).geometry(x.shape)
    offset = np.zeros((2, 36, conv.oh, conv.ow), np.float32)
    mask = np.ones((2, 18, conv.oh, conv.ow), np.float32)
    ref = cv2_conv2d(x, w, b, **case.kwargs)
    with DeformConv2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        assert compare(layer(x, offset), ref)[3]
        assert compare(layer(x, offset, mask), ref)[3]


@st.composite
def random_layers(draw):
    groups, offset_groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = groups * offset_groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kwargs = dict(stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                  dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                  padding=draw(st.one_of(st.integers(0, 2), st.tuples(*[st.integers(0, 3)] * 4), st.just("same"))),
                  groups=groups, activation=draw(st.sampled_from(ACTIVATIONS)))
    x_shape = (draw(st.integers(1, 3)), c, draw(st.integers(2, 8)), draw(st.integers(2, 8)))
    w_shape = (draw(st.integers(1, 3)) * groups, c // groups, kh, kw)
    case = Case("random", x_shape, w_shape, draw(st.booleans()), kwargs, draw(st.integers(0, 2**31)),
                "deform_conv2d", offset_groups, draw(st.booleans()), draw(st.sampled_from([0.0, 0.5, 2.0, 5.0])))
    try:
        Conv2dSpec.create(np.zeros(w_shape, np.float32), **kwargs).geometry(x_shape)
    except ValueError:  # no output pixel: pads and kernel larger than the input
        return None
    return case


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_random_layers_against_float64(target, case):
    if case is None:
        return
    backend, device = target
    result = check(case, backend, device, ref=float64_output(case))
    assert result.passed, f"{case.x_shape} {case.w_shape} {case.kwargs} G={case.offset_groups}: {result.detail}"


def test_samples_far_outside_read_zero(target):
    """Offsets of tens of pixels: every sample reads 0, the output is the activated bias."""
    backend, device = target
    case = Case("far", (1, 4, 5, 6), (3, 4, 3, 3), True, dict(padding=1, activation="sigmoid"), 6, "deform_conv2d",
                2, True, 1.0)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    far = np.sign(offset) * 40 + offset
    ref = deform_conv2d_float64(x, far, w, b, mask, **case.kwargs)
    assert np.allclose(ref, 1 / (1 + np.exp(-b[None, :, None, None])))
    with DeformConv2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        assert compare(layer(x, far, mask), ref)[3]


def test_non_contiguous_inputs(target):
    backend, device = target
    case = Case("strided", (2, 4, 6, 7), (5, 4, 3, 3), True, dict(padding=1), 7, "deform_conv2d", 2, True, 2.0)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    x_view = np.ascontiguousarray(x[:, :, ::-1].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)[:, :, ::-1]
    offset_view = np.ascontiguousarray(offset[::-1])[::-1]
    mask_view = np.asfortranarray(mask)
    w_view = np.asfortranarray(w)
    assert not (x_view.flags.c_contiguous or offset_view.flags.c_contiguous or mask_view.flags.c_contiguous)
    ref = deform_conv2d_float64(x, offset, w, b, mask, **case.kwargs)
    with DeformConv2d(w_view, b, backend=backend, device=device, **case.kwargs) as layer:
        assert compare(layer(x_view, offset_view, mask_view), ref)[3]
        grads = layer.backward(np.ones(ref.shape, np.float32), x_view, offset_view, mask_view)
        expected = layer.backward(np.ones(ref.shape, np.float32), x, offset, mask)
    for got, want in zip(grads, expected):
        assert np.array_equal(got, want)


def test_nan_offset_and_nan_pixel_reach_exactly_their_outputs(target):
    """A NaN offset makes its output pixel NaN, an infinite one reads 0, an infinite pixel spreads where sampled."""
    backend, device = target
    case = Case("nan", (1, 4, 6, 6), (3, 4, 3, 3), True, dict(padding=1), 8, "deform_conv2d", 1, True, 1.5)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    offset[0, 4, 2, 3] = np.nan
    offset[0, 7, 1, 1], offset[0, 8, 4, 4] = np.inf, -np.inf
    x[0, 1, 5, 0] = np.inf
    with np.errstate(invalid="ignore"):
        ref = deform_conv2d_float64(x, offset, w, b, mask, **case.kwargs)
    assert np.isnan(ref[0, :, 2, 3]).all() and np.isfinite(ref).any()
    with DeformConv2d(w, b, backend=backend, device=device, **case.kwargs) as layer, np.errstate(invalid="ignore"):
        assert compare(layer(x, offset, mask), ref)[3]


def test_a_point_at_minus_one_reads_zero_beside_an_infinite_pixel(target):
    """y = -1 (or x = -1) exactly reads 0: the cell it keeps for the right derivative holds an inf pixel with
    weight 0, which must not make 0 * inf = NaN, in the forward or in grad_w."""
    backend, device = target
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (2, 3, 4, 5)).astype(np.float32)
    w = rng.uniform(-1, 1, (2, 3, 1, 1)).astype(np.float32)
    b = rng.uniform(-1, 1, 2).astype(np.float32)
    mask = rng.uniform(0, 1, (2, 1, 4, 5)).astype(np.float32)
    # With zero offsets only output (0, 0) would read pixel (0, 0) (every point sits on its cell's top-left
    # corner); it samples y = -1 above it in image 0 and x = -1 left of it in image 1 instead.
    offset = np.zeros((2, 2, 4, 5), np.float32)
    x[0, :, 0, 0], offset[0, 0, 0, 0] = np.inf, -1
    x[1, :, 0, 0], offset[1, 1, 0, 0] = -np.inf, -1
    with np.errstate(invalid="ignore"):  # the oracle's zero-weight corners meet the inf pixels (masked out)
        ref = deform_conv2d_float64(x, offset, w, b, mask)
    assert np.isfinite(ref).all()
    finite_x = np.where(np.isfinite(x), x, np.float32(0))  # the same samples: the inf pixels are never read
    with DeformConv2d(w, b, backend=backend, device=device) as layer, np.errstate(invalid="ignore", over="ignore"):
        assert compare(layer(x, offset, mask), ref)[3]
        gy = rng.uniform(-1, 1, ref.shape).astype(np.float32)
        grad_w = layer.backward(gy, x, offset, mask)[3]
        assert compare(grad_w, layer.backward(gy, finite_x, offset, mask)[3].astype(np.float64))[3]


def test_one_shot_forms_reuse_the_layer_and_see_weights_changed_in_place(target):
    backend, device = target
    case = Case("one-shot", (1, 4, 5, 5), (4, 4, 3, 3), True, dict(padding=1), 9, "deform_conv2d", 2, True, 2.0)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    first = deform_conv2d(x, offset, w, b, mask=mask, padding=1, backend=backend, device=device)
    assert compare(first, deform_conv2d_float64(x, offset, w, b, mask, padding=1))[3]
    w[0, 1, 2, 0] += 1.0
    second = deform_conv2d(x, offset, w, b, mask=mask, padding=1, backend=backend, device=device)
    assert compare(second, deform_conv2d_float64(x, offset, w, b, mask, padding=1))[3]
    gy = np.ones(first.shape, np.float32)
    grads = deform_conv2d_backward(gy, x, offset, w, padding=1, backend=backend, device=device)
    assert len(grads) == 5 and grads[2] is None
    assert np.allclose(grads[4], first.shape[2] * first.shape[3])
    w *= 2  # changed in place again: grad_x and grad_offset are linear in w, grad_w does not depend on it
    doubled = deform_conv2d_backward(gy, x, offset, w, padding=1, backend=backend, device=device)
    for index in (0, 1):
        assert compare(doubled[index], 2 * grads[index].astype(np.float64))[3]
    assert compare(doubled[3], grads[3].astype(np.float64))[3]


def test_one_shot_forms_keep_one_prepared_layer_per_weights(monkeypatch):
    cb.clear_one_shot_cache()
    case = Case("one-shot", (1, 4, 5, 5), (4, 4, 3, 3), True, dict(padding=1), 9, "deform_conv2d", 2, True, 2.0)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    made = []
    original = DeformConv2d.__init__

    def counted(self, *args, **kwargs):
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DeformConv2d, "__init__", counted)
    for _ in range(3):
        deform_conv2d(x, offset, w, b, mask=mask, padding=1)
        deform_conv2d_backward(np.ones((1, 4, 5, 5), np.float32), x, offset, w, mask, padding=1)
    assert len(made) == 2  # one layer with the bias (forward), one without (backward)


def _layer_args(offset_channels=36, mask_channels=18, c=4):
    return np.zeros((1, c, 5, 5), np.float32), np.zeros((1, offset_channels, 5, 5), np.float32), \
        np.zeros((1, mask_channels, 5, 5), np.float32)


@pytest.mark.parametrize("shapes, message", [
    (dict(offset_channels=30), r"offset has 30 channels, which is not a positive multiple of 2\*kh\*kw = 18"),
    (dict(offset_channels=0), r"offset has 0 channels"),
    (dict(offset_channels=54, mask_channels=27), r"x has C=4 channels, not divisible by the 3 offset groups"),
    (dict(mask_channels=9), r"mask must have shape \(N, offset_groups\*kh\*kw, Ho, Wo\) = \(1, 18, 5, 5\)"),
])
def test_bad_offsets_and_masks_are_refused_with_the_same_message_on_every_backend(target, shapes, message):
    backend, device = target
    x, offset, mask = _layer_args(**shapes)
    with DeformConv2d(np.zeros((2, 4, 3, 3), np.float32), padding=1, backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match=message):
            layer(x, offset, mask)
        with pytest.raises(ValueError, match=message):
            layer.backward(np.zeros((1, 2, 5, 5), np.float32), x, offset, mask)
    with pytest.raises(ValueError, match=message):
        deform_conv2d(x, offset, np.zeros((2, 4, 3, 3), np.float32), mask=mask, padding=1, backend=backend,
                      device=device)


def test_bad_inputs_are_refused(target):
    backend, device = target
    x, offset, mask = _layer_args()
    w = np.zeros((2, 4, 3, 3), np.float32)
    with DeformConv2d(w, padding=1, backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match=r"offset must be \(N, 2\*offset_groups\*kh\*kw, Ho, Wo\) = "
                                             r"\(1, 2\*offset_groups\*9, 5, 5\), got shape \(1, 36, 4, 5\)"):
            layer(x, offset[:, :, 1:])
        with pytest.raises(ValueError, match=r"offset must be 4-D"):
            layer(x, offset[0])
        with pytest.raises(TypeError, match="offset must be float32"):
            layer(x, offset.astype(np.float64))
        with pytest.raises(TypeError, match="mask must be float32"):
            layer(x, offset, mask.astype(np.float16))
        with pytest.raises(ValueError, match="x has 3 channels but w expects 4"):
            layer(x[:, :3], offset)
        with pytest.raises(ValueError, match=r"grad_y must have the output's shape \(1, 2, 5, 5\)"):
            layer.backward(np.zeros((1, 2, 4, 5), np.float32), x, offset, mask)
    with DeformConv2d(w, padding=1, activation="relu", backend=backend, device=device) as layer:
        with pytest.raises(ValueError, match="backward is for the linear deform_conv2d.*'relu'"):
            layer.backward(np.zeros((1, 2, 5, 5), np.float32), x, offset, mask)


# ---- gradients -------------------------------------------------------------------------------------------------

def _loss_terms(x, offset, mask, w, grad_y, kwargs) -> np.ndarray:
    """Per image and output pixel: sum over output channels of grad_y * y (float64 oracle)."""
    return (deform_conv2d_float64(x, offset, w, None, mask, **kwargs) * grad_y).sum(axis=1)


def numerical_gradients(x, offset, mask, w, grad_y, kwargs, h=1e-3, one_sided=False):
    """The gradients of sum(grad_y * y) by differences of the float64 oracle. Offsets and the mask act on their
    own output pixel only and w on its own output channel, so one perturbed channel gives all its entries at
    once; x entries are perturbed one pixel at a time (all images together). `one_sided`: offsets by forward
    differences (the right-sided derivative), for sample points at integer coordinates."""
    args = [a.astype(np.float64) for a in (x, offset, w)] + [None if mask is None else mask.astype(np.float64)]
    x64, off64, w64, m64 = args

    def terms(x_=x64, off_=off64, w_=w64, m_=m64, per_channel=False):
        y = deform_conv2d_float64(x_, off_, w_, None, m_, **kwargs) * grad_y
        return y.sum(axis=(0, 2, 3)) if per_channel else y.sum(axis=1)

    def shifted(array, index, step):
        out = array.copy()
        out[index] += step
        return out

    grad_offset = np.empty(offset.shape)
    base = terms() if one_sided else None
    for ch in range(offset.shape[1]):
        index = (slice(None), ch)
        plus = terms(off_=shifted(off64, index, h))
        grad_offset[:, ch] = (plus - base) / h if one_sided else (plus - terms(off_=shifted(off64, index, -h))) / (2 * h)
    grad_mask = None
    if mask is not None:
        grad_mask = np.empty(mask.shape)
        for ch in range(mask.shape[1]):
            index = (slice(None), ch)
            grad_mask[:, ch] = (terms(m_=shifted(m64, index, h)) - terms(m_=shifted(m64, index, -h))) / (2 * h)
    grad_w = np.empty(w.shape)
    for c in range(w.shape[1]):
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                index = (slice(None), c, i, j)
                grad_w[index] = (terms(w_=shifted(w64, index, h), per_channel=True)
                                 - terms(w_=shifted(w64, index, -h), per_channel=True)) / (2 * h)
    grad_x = np.empty(x.shape)
    for c in range(x.shape[1]):
        for r in range(x.shape[2]):
            for q in range(x.shape[3]):
                index = (slice(None), c, r, q)
                diff = terms(x_=shifted(x64, index, h)) - terms(x_=shifted(x64, index, -h))
                grad_x[index] = diff.sum(axis=(1, 2)) / (2 * h)
    return grad_x, grad_offset, grad_mask, grad_w, grad_y.sum(axis=(0, 2, 3), dtype=np.float64)


def _sample_bases(geom) -> tuple[np.ndarray, np.ndarray]:
    """The undeformed sample coordinates (N, G, taps, 2, Ho, Wo) in the layout of offset."""
    i, j = np.divmod(np.arange(geom.taps), geom.kw)
    ys = np.arange(geom.oh)[:, None] * geom.sh - geom.pt + i[:, None, None] * geom.dh + np.zeros((1, 1, geom.ow))
    xs = np.arange(geom.ow)[None, :] * geom.sw - geom.pl + j[:, None, None] * geom.dw + np.zeros((1, geom.oh, 1))
    return ys, xs


def offsets_away_from_kinks(geom, rng, low_margin=1.9, high_margin=0.9) -> np.ndarray:
    """Offsets whose sample points fall uniformly in [-low_margin, H + high_margin) x [-.., W + ..), at least
    0.05 from any integer coordinate: many land in the border cells (-1, 0) and (H - 1, H) and beyond."""
    ys, xs = _sample_bases(geom)
    shape = (geom.n, geom.offset_groups, geom.taps, geom.oh, geom.ow)

    def targets(size):
        whole = rng.integers(-int(np.ceil(low_margin)), size + int(np.ceil(high_margin)), shape)
        return whole + rng.uniform(0.05, 0.95, shape)

    offset = np.stack((targets(geom.h) - ys, targets(geom.w) - xs), axis=3)
    return offset.reshape(geom.offset_shape).astype(np.float32)


GRADIENT_LAYERS = [
    pytest.param((1, 4, 5, 5), (3, 4, 3, 3), dict(padding=1), 1, True, id="v2-3x3-pad1"),
    pytest.param((2, 4, 4, 5), (4, 2, 3, 3), dict(padding=1, groups=2), 2, False, id="v1-groups2-G2-batch2"),
    pytest.param((1, 6, 5, 6), (6, 2, 3, 2), dict(stride=(2, 1), dilation=(1, 2), padding=(0, 1, 2, 3), groups=3),
                 3, True, id="v2-stride-dilation-asym-groups3-G3"),
    pytest.param((2, 4, 4, 4), (2, 4, 1, 1), dict(), 4, True, id="v2-1x1-G4"),
    pytest.param((1, 3, 4, 5), (3, 1, 3, 3), dict(padding="same", groups=3), 3, True, id="v2-depthwise-same"),
]


def _gradient_problem(x_shape, w_shape, kwargs, offset_groups, with_mask, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, x_shape).astype(np.float32)
    w = rng.uniform(-1, 1, w_shape).astype(np.float32)
    conv = Conv2dSpec.create(w, **kwargs).geometry(x_shape)
    taps = conv.kh * conv.kw
    geom = DeformConv2dSpec.create(w, **kwargs).geometry(x_shape, (conv.n, 2 * offset_groups * taps, conv.oh, conv.ow))
    mask = rng.uniform(0, 1, geom.mask_shape).astype(np.float32) if with_mask else None
    grad_y = rng.uniform(-1, 1, geom.output_shape).astype(np.float32)
    return rng, geom, x, w, mask, grad_y


def _assert_gradients(got, want):
    names = ("grad_x", "grad_offset", "grad_mask", "grad_w", "grad_b")
    for name, g, ref in zip(names, got, want):
        if ref is None:
            assert g is None, name
            continue
        assert g.shape == ref.shape and g.dtype == np.float32, name
        _, _, _, passed, detail = compare(g, ref)
        assert passed, f"{name}: {detail}"


@pytest.mark.parametrize("x_shape, w_shape, kwargs, offset_groups, with_mask", GRADIENT_LAYERS)
def test_gradients_match_central_differences_including_the_border_cells(target, x_shape, w_shape, kwargs,
                                                                        offset_groups, with_mask):
    backend, device = target
    rng, geom, x, w, mask, grad_y = _gradient_problem(x_shape, w_shape, kwargs, offset_groups, with_mask, 11)
    offset = offsets_away_from_kinks(geom, rng)
    want = numerical_gradients(x, offset, mask, w, grad_y, kwargs)
    with DeformConv2d(w, backend=backend, device=device, **kwargs) as layer:
        _assert_gradients(layer.backward(grad_y, x, offset, mask), want)


def test_gradients_at_integer_coordinates_are_right_sided(target):
    """Zero and integer offsets with padding 1 sample exactly on pixels, on -1 and on H: there the offset
    gradient is the right-sided derivative (torchvision's rule), non-zero at -1, zero at H."""
    backend, device = target
    rng, geom, x, w, mask, grad_y = _gradient_problem((1, 3, 5, 4), (2, 3, 3, 3), dict(padding=1), 1, True, 12)
    offsets = [np.zeros(geom.offset_shape, np.float32),
               rng.integers(-2, 3, geom.offset_shape).astype(np.float32)]
    with DeformConv2d(w, padding=1, backend=backend, device=device) as layer:
        for offset in offsets:
            want = numerical_gradients(x, offset, mask, w, grad_y, dict(padding=1), one_sided=True)
            _assert_gradients(layer.backward(grad_y, x, offset, mask), want)
            if not offset.any():
                # Tap (0, 1) (y-offset channel 2) of output row 0 samples y = -1: a right derivative that is not
                # 0 (mmcv's rule would give 0); tap (2, 1) (channel 14) of the last row samples y = H: 0.
                assert np.abs(want[1][0, 2, 0]).min() > 1e-3
                assert not want[1][0, 14, -1].any()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_random_layers_directional_derivatives(target, case):
    """<grad, v> for a random direction v of each input against the central difference of the oracle along v."""
    if case is None:
        return
    backend, device = target
    kwargs = dict(case.kwargs, activation=None)
    x, w, _ = case.tensors()
    offset, mask = case.inputs()
    geom = DeformConv2dSpec.create(w, **kwargs).geometry(x.shape, offset.shape, None if mask is None else mask.shape)
    rng = np.random.default_rng(case.seed)
    offset = offsets_away_from_kinks(geom, rng)
    grad_y = rng.uniform(-1, 1, geom.output_shape).astype(np.float32)
    with DeformConv2d(w, backend=backend, device=device, **kwargs) as layer:
        grads = layer.backward(grad_y, x, offset, mask)
    h = 1e-3
    args = [x, offset, mask, w]
    for position, grad in zip(range(4), grads):
        if args[position] is None:
            continue
        direction = rng.uniform(-1, 1, args[position].shape)
        moved = [None if a is None else a.astype(np.float64) for a in args]
        values = []
        for step in (h, -h):
            moved[position] = args[position].astype(np.float64) + step * direction
            values.append(_loss_terms(moved[0], moved[1], moved[2], moved[3], grad_y, kwargs).sum())
        numerical = (values[0] - values[1]) / (2 * h)
        analytic = float((grad.astype(np.float64) * direction).sum())
        scale = float(np.abs(grad.astype(np.float64) * direction).sum())
        assert abs(analytic - numerical) <= 1e-4 * max(1.0, scale), (position, analytic, numerical)


# ---- numpy specifics -------------------------------------------------------------------------------------------

def test_numpy_tiles_give_the_same_result_and_are_deterministic(monkeypatch):
    """Small COLUMNS_BYTES forces runs of pixels within an image, then several images per tile: the same
    outputs and gradients within tolerance, and bit-identical on repetition."""
    from convbackends.backends.numpy import deform_conv2d as numpy_deform

    case = Case("tiles", (3, 8, 9, 7), (6, 4, 3, 3), True, dict(padding=1, groups=2), 13, "deform_conv2d", 2, True, 3.0)
    x, w, b = case.tensors()
    offset, mask = case.inputs()
    grad_y = np.random.default_rng(5).uniform(-1, 1, (3, 6, 9, 7)).astype(np.float32)
    results = []
    for columns_bytes in (1 << 30, 9 * 8 * 4 * 10, 9 * 8 * 4 * 63 * 2):
        monkeypatch.setattr(numpy_deform, "COLUMNS_BYTES", columns_bytes)
        with DeformConv2d(w, b, padding=1, groups=2) as layer:
            runs = [(layer(x, offset, mask), *layer.backward(grad_y, x, offset, mask)) for _ in range(2)]
        for first, again in zip(*runs):
            assert np.array_equal(first, again)
        results.append(runs[0])
    ref = deform_conv2d_float64(x, offset, w, b, mask, padding=1, groups=2)
    for result in results:
        assert compare(result[0], ref)[3]
        for got, want in zip(result[1:], results[0][1:]):
            assert compare(got, want.astype(np.float64))[3]


def test_importing_convbackends_does_not_import_torch():
    code = "import sys, convbackends, convbackends.ops.deform_conv2d; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_public_names():
    assert cb.DeformConv2d is DeformConv2d and cb.deform_conv2d is deform_conv2d
    assert cb.deform_conv2d_backward is deform_conv2d_backward
