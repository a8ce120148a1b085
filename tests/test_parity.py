"""Every backend and device against cv2.dnn (and a float64 oracle for random layers)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import parity_tests
from convbackends import Conv2d
from convbackends.parity import ACTIVATIONS, SUITES, Case, compare
from convbackends.reference import conv2d_float64

CASES = SUITES["opencv"] + SUITES["wide"]


test_parity_with_cv2_dnn, cv2_reference = parity_tests(CASES)


@st.composite
def random_layers(draw):
    groups = draw(st.integers(1, 4))
    cg, og = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(
        st.integers(0, 3),
        st.tuples(st.integers(0, 3), st.integers(0, 3)),
        st.tuples(*[st.integers(0, 3)] * 4),
        st.sampled_from(["same", "valid"]),
    ))
    h = (kh - 1) * dilation[0] + 1 + draw(st.integers(0, 9))
    w = (kw - 1) * dilation[1] + 1 + draw(st.integers(0, 9))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                  activation=draw(st.sampled_from(ACTIVATIONS)))
    return Case("random", (draw(st.integers(1, 3)), cg * groups, h, w), (og * groups, cg, kh, kw),
                draw(st.booleans()), kwargs, draw(st.integers(0, 2**31)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=random_layers())
def test_random_layers_against_float64(target, case):
    backend, device = target
    x, w, b = case.tensors()
    with Conv2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        y = layer(x)
    max_abs, _, tol, passed, detail = compare(y, conv2d_float64(x, w, b, **case.kwargs))
    assert passed, f"{case.x_shape} {case.w_shape} {case.kwargs}: {detail}"


@pytest.mark.parametrize("groups", [1, 2])
def test_nan_and_inf_propagate(target, groups):
    """Non-finite inputs are no error: they reach their receptive field as IEEE NaN/Inf.

    cv2.dnn 5.0 saturates them to +-FLT_MAX (its SIMD output clamp) and, in grouped layers, leaks
    them into other groups' outputs; so values are checked against the float64 oracle, and only
    for groups=1 is the affected set also checked against cv2.dnn's saturated outputs.
    """
    from convbackends.reference import cv2_conv2d

    backend, device = target
    case = Case("nonfinite", (2, 6, 12, 11), (8, 6 // groups, 3, 3), True, dict(padding=1, groups=groups))
    x, w, b = case.tensors()
    x[0, 1, 3, 4] = np.nan
    x[1, 4, 7, 2] = np.inf
    x[1, 0, 0, 0] = -np.inf
    oracle = conv2d_float64(x, w, b, **case.kwargs)
    assert np.isnan(oracle).any() and np.isinf(oracle).any() and np.isfinite(oracle).any()
    if groups == 1:
        ref = cv2_conv2d(x, w, b, **case.kwargs)
        assert np.array_equal(~np.isfinite(oracle), ~np.isfinite(ref) | (np.abs(ref) >= np.finfo(np.float32).max / 2))
    with Conv2d(w, b, backend=backend, device=device, **case.kwargs) as layer:
        y = layer(x)
    *_, passed, detail = compare(y, oracle)
    assert passed, detail


@pytest.mark.parametrize("view", ["reversed_rows", "channel_slice", "transposed_hw"])
def test_non_contiguous_inputs(target, view):
    backend, device = target
    rng = np.random.default_rng(3)
    base = rng.uniform(-1, 1, (2, 10, 9, 9)).astype(np.float32)
    x = {
        "reversed_rows": base[:, :6, ::-1, :],
        "channel_slice": base[:, 1:7:1, :, 1:8],
        "transposed_hw": base[:, :6].transpose(0, 1, 3, 2),
    }[view]
    assert not x.flags.c_contiguous
    w = rng.uniform(-1, 1, (5, 6, 3, 2)).astype(np.float32)
    with Conv2d(w, padding=(1, 0, 0, 1), backend=backend, device=device) as layer:
        y = layer(x)
    *_, passed, detail = compare(y, conv2d_float64(x, w, padding=(1, 0, 0, 1)))
    assert passed, detail


def test_one_layer_many_input_sizes(target):
    """Weights are prepared once; "same" padding is resolved anew for each input size."""
    backend, device = target
    rng = np.random.default_rng(4)
    w = rng.uniform(-1, 1, (7, 5, 3, 4)).astype(np.float32)
    b = rng.uniform(-1, 1, 7).astype(np.float32)
    with Conv2d(w, b, stride=2, padding="same", dilation=(2, 1), activation="tanh",
                backend=backend, device=device) as layer:
        for shape in [(1, 5, 8, 8), (3, 5, 13, 7), (1, 5, 5, 30), (2, 5, 8, 8)]:
            x = rng.uniform(-1, 1, shape).astype(np.float32)
            ref = conv2d_float64(x, w, b, stride=2, padding="same", dilation=(2, 1), activation="tanh")
            y = layer(x)
            *_, passed, detail = compare(y, ref)
            assert passed, f"{shape}: {detail}"


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.2)])
def test_activations_at_large_magnitudes(target, activation):
    """Pre-activations of +-1e3 and beyond: no overflow to NaN in exp/tanh/softplus."""
    backend, device = target
    rng = np.random.default_rng(5)
    x = (rng.uniform(-1, 1, (1, 4, 6, 6)) * 300).astype(np.float32)
    w = rng.uniform(-1, 1, (4, 4, 3, 3)).astype(np.float32)
    with Conv2d(w, padding=1, activation=activation, backend=backend, device=device) as layer:
        y = layer(x)
    ref = conv2d_float64(x, w, padding=1, activation=activation)
    assert np.isfinite(y).all()
    *_, passed, detail = compare(y, ref)
    assert passed, detail
