"""The spec, resolved once: validation, padding modes, dtype policy, and what every backend shares."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convbackends
from convbackends import Conv2d, Conv2dSpec, conv2d
from convbackends.runtime import get_backend
from convbackends.spec import ACTIVATION_CODES, INT32_MAX, Activation

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
X = RNG.uniform(-1, 1, (1, 6, 8, 8)).astype(np.float32)
W = RNG.uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32)  # groups=2 layer: C=6
B = RNG.uniform(-1, 1, 4).astype(np.float32)

# (description, x, w, b, kwargs, exception, message pattern): each names the parameter and the value.
BAD_INPUTS = [
    ("x 3-D", X[0], W, B, dict(groups=2), ValueError, r"x must be 4-D NCHW, got shape \(6, 8, 8\)"),
    ("x float64", X.astype(np.float64), W, B, dict(groups=2), TypeError, r"x must be float32, got float64"),
    ("x float16", X.astype(np.float16), W, B, dict(groups=2), TypeError, r"x must be float32, got float16"),
    ("x int", X.astype(np.int32), W, B, dict(groups=2), TypeError, r"x must be float32, got int32"),
    ("x list", X.tolist(), W, B, dict(groups=2), TypeError, r"x must be an array, got list"),
    ("w float64", X, W.astype(np.float64), B, dict(groups=2), TypeError, r"w must be float32, got float64"),
    ("w 3-D", X, W[0], B, dict(groups=2), ValueError, r"w must be 4-D"),
    ("C mismatch", X, W, B, dict(groups=1), ValueError, r"x has 6 channels but w expects 3"),
    ("groups not dividing C", X, W[:, :2].copy(), B, dict(groups=4), ValueError, r"groups=4 must divide the input channels of x, got C=6"),
    ("groups not dividing O", X, W[:3].copy(), B[:3].copy(), dict(groups=2), ValueError, r"groups=2 must divide out_channels=3"),
    ("groups zero", X, W, B, dict(groups=0), ValueError, r"groups must be >= 1, got 0"),
    ("groups float", X, W, B, dict(groups=2.0), TypeError, r"groups must be an int, got 2.0"),
    ("stride zero", X, W, B, dict(groups=2, stride=0), ValueError, r"stride must be >= 1, got 0"),
    ("stride negative pair", X, W, B, dict(groups=2, stride=(1, -2)), ValueError, r"stride must be >= 1, got \(1, -2\)"),
    ("stride triple", X, W, B, dict(groups=2, stride=(1, 1, 1)), TypeError, r"stride must be an int or a pair"),
    ("dilation zero", X, W, B, dict(groups=2, dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    ("padding negative", X, W, B, dict(groups=2, padding=-1), ValueError, r"padding must be >= 0, got -1"),
    ("padding 3 values", X, W, B, dict(groups=2, padding=(1, 1, 1)), ValueError, r"padding must have 1, 2 or 4 values, got \(1, 1, 1\)"),
    ("padding mode", X, W, B, dict(groups=2, padding="full"), ValueError, r"padding must be .*got 'full'"),
    ("padding float", X, W, B, dict(groups=2, padding=1.5), TypeError, r"padding must be made of ints, got 1.5"),
    ("output below 1", X, RNG.uniform(-1, 1, (4, 3, 9, 3)).astype(np.float32), B, dict(groups=2), ValueError, r"output size \(0, 6\) is below 1"),
    ("bias shape", X, W, B[:3].copy(), dict(groups=2), ValueError, r"b must have shape \(4,\), got \(3,\)"),
    ("bias float64", X, W, B.astype(np.float64), dict(groups=2), TypeError, r"b must be float32, got float64"),
    ("activation unknown", X, W, B, dict(groups=2, activation="gelu"), ValueError, r"activation must be one of .*got 'gelu'"),
    ("activation no alpha", X, W, B, dict(groups=2, activation="leaky_relu"), ValueError, r"activation 'leaky_relu' needs parameters"),
    ("clip reversed", X, W, B, dict(groups=2, activation=("clip", 1.0, 0.0)), ValueError, r"needs lo <= hi, got \('clip', 1.0, 0.0\)"),
    ("backend unknown", X, W, B, dict(groups=2, backend="metal"), ValueError, r"backend must be one of .*got 'metal'"),
    ("device out of range", X, W, B, dict(groups=2, device=99), ValueError, r"device 99 is out of range for backend 'numpy'"),
    ("device no match", X, W, B, dict(groups=2, device="quantum"), ValueError, r"device 'quantum' matches no device of backend 'numpy'"),
]


@pytest.mark.parametrize("desc,x,w,b,kwargs,exc,pattern", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(desc, x, w, b, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        conv2d(x, w, b, **kwargs)


@pytest.mark.parametrize("row", [r for r in BAD_INPUTS if "backend" not in r[4] and "device" not in r[4]], ids=lambda r: r[0])
def test_same_error_on_every_backend(target, row):
    """Validation lives in the spec, so every backend raises the same type and text."""
    _, x, w, b, kwargs, exc, _ = row
    backend, device = target
    with pytest.raises(exc) as expected:
        conv2d(x, w, b, **kwargs)
    with pytest.raises(exc) as got:
        conv2d(x, w, b, backend=backend, device=device, **kwargs)
    assert str(got.value) == str(expected.value)


# Activation(...) itself, not only parse(), refuses what no backend could run.
BAD_ACTIVATIONS = [
    (("clip",), ValueError, r"activation 'clip' needs parameters"),
    (("leaky_relu",), ValueError, r"activation 'leaky_relu' needs parameters"),
    (("clip", 0.5), ValueError, r"activation 'clip' needs parameters"),
    (("gelu",), ValueError, r"activation must be one of .*got 'gelu'"),
    ((3,), ValueError, r"activation must be one of .*got 3"),
    (("relu", 0.5), ValueError, r"activation must be one of .*got \('relu', 0.5\)"),
    (("leaky_relu", 0.1, 2.0), ValueError, r"activation must be one of .*got \('leaky_relu', 0.1, 2.0\)"),
    (("clip", 1.0, 0.0), ValueError, r"needs lo <= hi, got \('clip', 1.0, 0.0\)"),
    (("clip", -np.inf, np.inf), ValueError, r"finite float32 values \(\|v\| <= 3.4028235e\+38\), got \('clip', -inf, inf\)"),
    (("leaky_relu", 4e38), ValueError, r"finite float32 values .*got \('leaky_relu', 4e\+38\)"),
    (("leaky_relu", "0.1"), TypeError, r"activation parameters must be real numbers, got \('leaky_relu', '0.1'\)"),
    (("leaky_relu", True), TypeError, r"activation parameters must be real numbers"),
]


@pytest.mark.parametrize("args,exc,pattern", BAD_ACTIVATIONS, ids=[repr(row[0]) for row in BAD_ACTIVATIONS])
def test_activation_validates_itself(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Activation(*args)


def test_activation_is_normalised():
    """Names in any case, parameters as floats, the ones an activation does not take as 0.0; parse
    builds the same value."""
    assert Activation("ReLU") == Activation("relu", 0.0, 0.0) == Activation.parse("RELU")
    assert Activation("relu").alpha == Activation("relu").beta == 0.0
    clip = Activation("clip", np.float32(-1), np.int64(2))
    assert (clip.kind, clip.alpha, clip.beta) == ("clip", -1.0, 2.0) and type(clip.beta) is float
    assert Activation.parse(("Clip", -1, 2)) == clip
    assert Activation("leaky_relu", 0.1) == Activation.parse(("leaky_relu", 0.1))
    assert Activation.parse(None) == Activation()


def test_float32_extremes_are_valid_clip_bounds():
    """float32's largest magnitude is a finite bound: it clips nothing."""
    bound = float(np.finfo(np.float32).max)
    y = conv2d(X, W, B, groups=2, activation=("clip", -bound, bound))
    np.testing.assert_array_equal(y, conv2d(X, W, B, groups=2))


def test_int32_limits_are_inclusive():
    """Exactly INT32_MAX is accepted (stride, dilation, padding, one image's elements), one more is not."""
    w1 = np.zeros((1, 1, 1, 1), np.float32)
    spec = Conv2dSpec.create(w1, stride=INT32_MAX, dilation=INT32_MAX, padding=(0, 0, 0, INT32_MAX - 8))
    assert spec.geometry((1, 1, 1, 8)).output_shape == (1, 1, 1, 1)
    assert Conv2dSpec.create(w1).geometry((3, 1, 1, INT32_MAX)).output_shape == (3, 1, 1, INT32_MAX)
    with pytest.raises(ValueError, match=r"x of shape \(1, 1, 1, 2147483647\) padded by \(0, 0, 0, 1\) has 2147483648"):
        Conv2dSpec.create(w1, padding=(0, 0, 0, 1)).geometry((1, 1, 1, INT32_MAX))
    with pytest.raises(ValueError, match=r"the output of shape \(1, 2, 1, 2147483647\) has 4294967294 elements"):
        Conv2dSpec.create(np.zeros((2, 1, 1, 1), np.float32)).geometry((1, 1, 1, INT32_MAX))
    extent = Conv2dSpec.create(np.zeros((1, 1, 2, 1), np.float32), dilation=(INT32_MAX - 1, 1))
    assert (extent.kh - 1) * extent.dilation[0] + 1 == INT32_MAX
    with pytest.raises(ValueError, match=r"extent \(2147483648, 1\)"):
        Conv2dSpec.create(np.zeros((1, 1, 2, 1), np.float32), dilation=(INT32_MAX, 1))


@pytest.mark.parametrize("index", [np.int64(0), np.int32(0), np.uint8(0)], ids=lambda i: type(i).__name__)
def test_device_index_may_be_a_numpy_integer(index):
    assert get_backend("numpy").select(index).index == 0
    np.testing.assert_array_equal(conv2d(X, W, B, groups=2, device=index), conv2d(X, W, B, groups=2))


def test_device_refuses_bools_and_floats():
    for device in (True, np.True_, 0.0):
        with pytest.raises(TypeError, match="device must be None, an int index or a name substring"):
            get_backend("numpy").select(device)


def test_unavailable_backend_names_the_reason():
    for name, availability in convbackends.available_backends().items():
        if not availability.available:
            assert availability.reason
            with pytest.raises(ValueError, match=f"backend '{name}' is not available: "):
                Conv2d(W, groups=2, backend=name)


def test_closed_layer_refuses_to_run():
    layer = Conv2d(W, groups=2)
    layer.close()
    layer.close()
    with pytest.raises(ValueError, match="closed"):
        layer(X)


@pytest.mark.parametrize("size,k,s,d,expected", [
    # ONNX SAME_UPPER, dilation-aware: total = (ceil(in/s)-1)*s + (k-1)*d + 1 - in, extra at the end.
    (8, 3, 1, 1, (1, 1)), (8, 3, 2, 1, (0, 1)), (7, 3, 2, 1, (1, 1)), (8, 4, 1, 1, (1, 2)),
    (8, 3, 1, 2, (2, 2)), (8, 3, 1, 3, (3, 3)), (9, 3, 2, 2, (2, 2)), (10, 5, 3, 2, (4, 4)),
    (5, 1, 1, 1, (0, 0)), (5, 1, 2, 1, (0, 0)), (4, 3, 4, 1, (0, 0)), (6, 2, 2, 3, (1, 1)),
])
def test_same_padding_table(size, k, s, d, expected):
    w = np.zeros((1, 1, k, 1), np.float32)
    geom = Conv2dSpec.create(w, stride=(s, 1), dilation=(d, 1), padding="same").geometry((1, 1, size, 3))
    assert (geom.pt, geom.pb) == expected
    assert geom.oh == -(-size // s)
    assert (geom.pl, geom.pr) == (0, 0)


@pytest.mark.parametrize("size,k,s", [(8, 3, 2), (9, 4, 1), (10, 5, 3), (7, 2, 2), (6, 3, 1), (11, 4, 3)])
def test_same_padding_matches_onnxruntime_same_upper(size, k, s):
    """An independent SAME_UPPER implementation agrees (onnxruntime's auto_pad refuses dilation,
    so dilated SAME is covered by the table above)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    x = RNG.uniform(-1, 1, (1, 2, size, size + 1)).astype(np.float32)
    w = RNG.uniform(-1, 1, (3, 2, k, k)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[s, s])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"x": x})[0]
    y = conv2d(x, w, stride=s, padding="same")
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-4 * max(1, np.abs(ref).max()), rtol=0)


def test_padding_forms_are_equivalent():
    explicit = Conv2dSpec.create(W, padding=(1, 2, 1, 2), groups=2).geometry(X.shape)
    assert Conv2dSpec.create(W, padding=(1, 2), groups=2).geometry(X.shape) == explicit
    assert Conv2dSpec.create(W, padding=[1, 2], groups=2).geometry(X.shape) == explicit
    assert Conv2dSpec.create(W, padding="valid", groups=2).geometry(X.shape).oh == 6
    assert Conv2dSpec.create(W, padding=np.int64(1), groups=2).geometry(X.shape).oh == 8


def test_geometry_counts_flops_and_channels():
    geom = Conv2dSpec.create(W, padding=1, groups=2).geometry((2, 6, 8, 8))
    assert (geom.cg, geom.og, geom.output_shape) == (3, 2, (2, 4, 8, 8))
    assert geom.flops == 2 * 2 * 4 * 8 * 8 * 3 * 9


def test_algorithm_is_chosen_by_shape():
    depthwise = np.zeros((12, 1, 3, 3), np.float32)
    assert Conv2dSpec.create(depthwise, groups=6).algorithm == "depthwise"
    assert Conv2dSpec.create(np.zeros((8, 4, 1, 1), np.float32)).algorithm == "gemm_1x1"
    assert Conv2dSpec.create(np.zeros((8, 4, 1, 1), np.float32), padding="same").algorithm == "gemm_1x1"
    assert Conv2dSpec.create(np.zeros((8, 4, 1, 1), np.float32), stride=2).algorithm == "implicit_gemm"
    assert Conv2dSpec.create(W, groups=2).algorithm == "implicit_gemm"


@pytest.mark.parametrize("path", ["kernels/prelude.h", "shaders/activation.glsl"])
def test_activation_codes_agree_across_languages(path):
    source = (ROOT / path).read_text()
    codes = {name.lower(): int(value) for name, value in re.findall(r"#define\s+ACT_([A-Z0-9_]+)\s+(\d+)", source)}
    assert codes == ACTIVATION_CODES


def test_import_loads_no_gpu_or_reference_library():
    code = ("import sys, convbackends; convbackends.Conv2d; "
            "print(sorted(m for m in ('pyopencl', 'vulkan', 'cupy', 'cv2', 'onnx', 'rich', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_available_backends_reports_every_backend():
    report = convbackends.available_backends()
    assert set(report) == {"numpy", "opencl", "cuda", "vulkan"}
    assert report["numpy"].available
    for availability in report.values():
        assert availability.available or availability.reason


def test_auto_backend_runs():
    y = conv2d(X, W, groups=2, padding=1, backend="auto")
    assert y.shape == (1, 4, 8, 8)
