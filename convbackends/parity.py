"""Parity suites and the one check shared by the tests and `convbackends parity`."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from .ops.conv2d import Conv2d
from .ops.conv_transpose2d import ConvTranspose2d
from .ops.deform_conv2d import DeformConv2d
from .spec import Conv2dSpec

ACTIVATIONS = (
    None, "relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.1), ("clip", -0.3, 0.4),
)


def tolerance(ref: np.ndarray) -> float:
    """The project's bar for float32 against a float32 or float64 reference, inputs U(-1, 1)."""
    finite = np.abs(ref[np.isfinite(ref)])
    return 1e-4 * max(1.0, float(finite.max()) if finite.size else 1.0)


@dataclass(frozen=True)
class Case:
    """One layer and input; tensors are drawn from U(-1, 1) with a fixed seed. deform_conv2d cases also draw
    offsets from U(-offset_scale, offset_scale) for `offset_groups` groups and, with `mask`, a mask from U(0, 1).
    `backward` (deform_conv2d, for the benchmark): the case stands for the layer's gradients, not its forward."""

    name: str
    x_shape: tuple
    w_shape: tuple
    bias: bool = True
    kwargs: dict = field(default_factory=dict, hash=False)
    seed: int = 0
    op: str = "conv2d"  # a key of OPS
    offset_groups: int = 1
    mask: bool = False
    offset_scale: float = 0.0
    backward: bool = False

    @property
    def out_channels(self) -> int:
        return self.w_shape[1] * self.kwargs.get("groups", 1) if self.op == "conv_transpose2d" else self.w_shape[0]

    def tensors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng(self.seed)
        x = rng.uniform(-1, 1, self.x_shape).astype(np.float32)
        w = rng.uniform(-1, 1, self.w_shape).astype(np.float32)
        b = rng.uniform(-1, 1, self.out_channels).astype(np.float32) if self.bias else None
        return x, w, b

    def inputs(self) -> tuple:
        """The layer call's arguments after x: (offset, mask or None) for deform_conv2d, () for the others."""
        if self.op != "deform_conv2d":
            return ()
        geom = Conv2dSpec.create(np.empty(self.w_shape, np.float32), **self.kwargs).geometry(self.x_shape)
        taps = geom.kh * geom.kw
        rng = np.random.default_rng([self.seed, 1])
        offset = rng.uniform(-self.offset_scale, self.offset_scale,
                             (geom.n, 2 * self.offset_groups * taps, geom.oh, geom.ow)).astype(np.float32)
        mask = rng.uniform(0, 1, (geom.n, self.offset_groups * taps, geom.oh, geom.ow)).astype(np.float32)
        return offset, mask if self.mask else None

    def layer(self, w, b, **options):
        """The case's op object for these weights (options: backend, device)."""
        return OPS[self.op](w, b, **options, **self.kwargs)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class CaseResult:
    case: Case
    backend: str
    device: str
    max_abs: float
    mean_abs: float
    tol: float
    passed: bool
    detail: str = ""


def _case(x_shape, o, kernel, *, bias=True, seed=0, **kwargs) -> Case:
    n, c, h, w = x_shape
    groups = kwargs.get("groups", 1)
    kh, kw = kernel
    name = f"n{n}c{c}h{h}w{w}-o{o}k{kh}x{kw}" + "".join(
        f"-{k}={_short(v)}" for k, v in kwargs.items()
    ) + ("" if bias else "-nobias")
    return Case(name, tuple(x_shape), (o, c // groups, kh, kw), bias, kwargs, seed)


def _transposed(x_shape, o, kernel, *, bias=True, seed=0, **kwargs) -> Case:
    """A conv_transpose2d case: w is (C, O/groups, kh, kw)."""
    case = _case(x_shape, o, kernel, bias=bias, seed=seed, **kwargs)
    c, groups = x_shape[1], kwargs.get("groups", 1)
    return Case("T" + case.name, case.x_shape, (c, o // groups, *kernel), bias, kwargs, seed, "conv_transpose2d")


def _deform(x_shape, o, kernel, *, offset_groups=1, mask=True, offset_scale=2.5, bias=True, seed=0,
            **kwargs) -> Case:
    """A deform_conv2d case (DCNv2 with `mask`, else v1)."""
    case = _case(x_shape, o, kernel, bias=bias, seed=seed, **kwargs)
    name = f"D{'v2' if mask else 'v1'}-{case.name}-G{offset_groups}-off{offset_scale}"
    return Case(name, case.x_shape, case.w_shape, bias, kwargs, seed, "deform_conv2d", offset_groups, mask,
                offset_scale)


def _short(value) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(_short(v) for v in value)
    return str(value)


def _opencv_sweep() -> list[Case]:
    """OpenCV's own conv layer sweep (test_layers.cpp style): 128 cases on 5x6 inputs."""
    cases = []
    for (c, o, g), kernel, stride, pad, dil, bias in itertools.product(
        [(6, 4, 1), (6, 9, 1), (6, 4, 2), (6, 9, 3)], [(3, 1), (1, 3)], [1, 2], [(1, 0), (0, 1)], [1, 2], [True, False]
    ):
        cases.append(_case((1, c, 5, 6), o, kernel, bias=bias, stride=stride, padding=pad, dilation=dil, groups=g))
    return cases


def _wide() -> list[Case]:
    """The sweep widened: big kernels, strides to 3, asymmetric pads, modes, activations, odd channels."""
    cases = []
    for k in (1, 2, 3, 5, 7):
        for stride in (1, 2, 3):
            cases.append(_case((1, 13, 17, 15), 15, (k, k), stride=stride, padding=k // 2))
    for pad in ((0, 1, 2, 3), (3, 0, 1, 2), (2, 2, 0, 0), "same", "valid"):
        for dil in (1, 2, 3):
            cases.append(_case((1, 5, 11, 13), 7, (3, 3), padding=pad, dilation=dil, stride=(1, 2)))
    for k in ((1, 5), (5, 1), (4, 2)):
        cases.append(_case((3, 15, 12, 9), 13, k, stride=(2, 1), padding="same", dilation=(1, 2)))
    for act in ACTIVATIONS:
        cases.append(_case((3, 13, 9, 10), 15, (3, 3), padding=1, activation=act))
        cases.append(_case((1, 16, 8, 8), 16, (1, 1), activation=act, bias=False))
        cases.append(_case((1, 6, 9, 9), 12, (3, 3), padding=1, groups=6, activation=act))
    for groups, c, o in ((13, 13, 26), (15, 15, 15), (16, 16, 32), (3, 15, 6), (5, 15, 10)):
        for stride, dil in ((1, 1), (2, 1), (1, 2)):
            cases.append(_case((2, c, 14, 11), o, (3, 3), stride=stride, dilation=dil, padding="same", groups=groups))
    cases.append(_case((1, 3, 33, 31), 16, (7, 7), stride=2, padding=3))  # a ResNet-like stem
    cases.append(_case((2, 24, 10, 10), 40, (1, 1), stride=2))  # strided 1x1
    cases.append(_case((1, 32, 20, 20), 64, (3, 3), padding=1, activation="relu"))  # several tiles
    return cases


def _smoke() -> list[Case]:
    return [
        _case((1, 6, 5, 6), 4, (3, 1), padding=(1, 0)),
        _case((2, 13, 9, 10), 15, (3, 3), stride=2, padding="same", activation="relu"),
        _case((1, 8, 7, 7), 16, (1, 1), activation=("leaky_relu", 0.1)),
        _case((1, 12, 9, 8), 24, (3, 3), padding=1, groups=12, activation="hardswish"),
        _case((1, 6, 10, 9), 9, (5, 5), dilation=2, padding=(4, 3, 2, 1), groups=3, activation="silu"),
    ]


def _transposed_sweep() -> list[Case]:
    """conv_transpose2d: kernels 1..5 (even ones too) x strides 1..4, output_padding, dilation, groups,
    depthwise with a multiplier, asymmetric pads, "same"/"valid", batch 1 and 3, every activation, odd
    channel counts."""
    cases = []
    for k in (1, 2, 3, 4, 5):
        for stride in (1, 2, 3, 4):
            cases.append(_transposed((1, 5, 6, 7), 7, (k, k), stride=stride, padding=min(k - 1, 1)))
    for stride, output_padding, dilation in ((2, 1, 1), (3, 2, 1), (2, 1, 2), (1, 1, 2), (3, (1, 2), (1, 2))):
        cases.append(_transposed((3, 6, 5, 6), 9, (3, 3), stride=stride, output_padding=output_padding,
                                 dilation=dilation, padding=1))
    for pad in ((0, 1, 2, 3), (3, 0, 1, 2), (4, 4, 0, 0), "same", "valid"):
        cases.append(_transposed((1, 5, 7, 6), 7, (4, 3), stride=(2, 3), padding=pad, dilation=(1, 2)))
    for groups, c, o in ((13, 13, 26), (7, 7, 7), (3, 15, 6), (5, 15, 10)):
        for stride in (1, 2):
            cases.append(_transposed((2, c, 6, 5), o, (4, 4), stride=stride, padding=1, groups=groups))
    for act in ACTIVATIONS:
        cases.append(_transposed((1, 13, 5, 6), 15, (4, 4), stride=2, padding=1, activation=act))
        cases.append(_transposed((1, 16, 4, 4), 8, (2, 2), stride=2, activation=act, bias=False))
    cases.append(_transposed((1, 21, 8, 8), 21, (4, 4), stride=2, padding=1, groups=21, bias=False))  # FCN-style
    cases.append(_transposed((1, 64, 4, 4), 32, (4, 4), stride=2, padding=1, activation="relu"))  # DCGAN-like
    cases.append(_transposed((1, 8, 3, 3), 4, (5, 5), stride=4, padding=(6, 1, 0, 2)))  # pads past the taps
    return cases


def _deform_sweep() -> list[Case]:
    """deform_conv2d: v1 and v2, offsets from none to several pixels (samples far outside the image), offset
    groups 1..4 against weight groups, strides, dilations, asymmetric and "same"/"valid" pads, kernels 1x1 to
    5x5, batches, every activation, depthwise."""
    cases = []
    for mask in (False, True):
        for scale in (0.0, 0.7, 2.5, 6.0):
            cases.append(_deform((1, 5, 6, 7), 6, (3, 3), mask=mask, offset_scale=scale, padding=1))
    for offset_groups, groups in ((1, 2), (2, 1), (2, 3), (3, 2), (4, 1), (4, 4), (3, 6)):
        cases.append(_deform((1, 12, 5, 6), 12, (3, 3), offset_groups=offset_groups, groups=groups, padding=1, seed=1))
    for stride, dilation, padding in ((2, 1, 1), (1, 2, 2), ((2, 1), (1, 2), (0, 1, 2, 3)), (1, 1, "same"),
                                      (2, 2, "same"), (1, 1, "valid"), (3, 1, (3, 0, 1, 2))):
        cases.append(_deform((2, 4, 7, 8), 5, (3, 3), offset_groups=2, stride=stride, dilation=dilation,
                             padding=padding, seed=2))
    for kernel in ((1, 1), (1, 3), (2, 3), (5, 5)):
        cases.append(_deform((1, 6, 7, 6), 4, kernel, offset_groups=3, padding=(kernel[0] // 2, kernel[1] // 2)))
    for act in ACTIVATIONS:
        cases.append(_deform((1, 6, 5, 5), 7, (3, 3), padding=1, activation=act, seed=3))
    cases.append(_deform((3, 8, 5, 4), 8, (3, 3), offset_groups=8, groups=8, padding=1, bias=False))  # depthwise
    cases.append(_deform((2, 16, 6, 6), 8, (3, 3), offset_groups=2, padding=1, activation="relu"))  # batch, more channels
    return cases


SUITES: dict[str, list[Case]] = {"smoke": _smoke(), "opencv": _opencv_sweep(), "wide": _wide(),
                                 "transposed": _transposed_sweep(), "deform": _deform_sweep()}


def _evaluate(case: Case, references: dict, x=None) -> np.ndarray:
    """references[case.op] applied to the case's tensors (x replaced when given)."""
    xc, w, b = case.tensors()
    x = xc if x is None else x
    if case.op == "deform_conv2d":
        offset, mask = case.inputs()
        return references[case.op](x, offset, w, b, mask, **case.kwargs)
    return references[case.op](x, w, b, **case.kwargs)


def reference_output(case: Case) -> np.ndarray:
    """The independent reference's result for the case: cv2.dnn (Winograd off). cv2.dnn has no DeformConv:
    deform_conv2d takes the float64 oracle, which tests check against onnx.reference's DeformConv (too slow,
    seconds a case, to be every run's reference)."""
    from . import reference

    return _evaluate(case, {"conv2d": reference.cv2_conv2d, "conv_transpose2d": reference.cv2_conv_transpose2d,
                            "deform_conv2d": reference.deform_conv2d_float64})


def float64_output(case: Case, x=None) -> np.ndarray:
    """The independent float64 oracle's result for the case (or for another input x)."""
    from . import reference

    return _evaluate(case, {"conv2d": reference.conv2d_float64, "conv_transpose2d": reference.conv_transpose2d_float64,
                            "deform_conv2d": reference.deform_conv2d_float64}, x)


# Each op's layer class; its references are looked up lazily (they import cv2 and onnx).
OPS = {"conv2d": Conv2d, "conv_transpose2d": ConvTranspose2d, "deform_conv2d": DeformConv2d}


def compare(y: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, bool, str]:
    """(max abs error, mean abs error, tolerance, passed, why not). Non-finite values must match in place."""
    tol = tolerance(ref)
    if y.shape != ref.shape:
        return float("inf"), float("inf"), tol, False, f"shape {y.shape} != reference {ref.shape}"
    inf_ref = np.isinf(ref)
    if not (np.array_equal(np.isnan(y), np.isnan(ref)) and np.array_equal(np.isinf(y), inf_ref)
            and np.array_equal(y[inf_ref], ref[inf_ref])):
        return float("inf"), float("inf"), tol, False, "non-finite values differ from the reference"
    finite = np.isfinite(ref)
    err = np.abs(y[finite].astype(np.float64) - ref[finite])
    max_abs, mean_abs = (float(err.max()), float(err.mean())) if err.size else (0.0, 0.0)
    passed = max_abs <= tol
    return max_abs, mean_abs, tol, passed, "" if passed else f"max abs error {max_abs:.3g} > {tol:.3g}"


def check(case: Case, backend: str = "numpy", device=None, ref: np.ndarray | None = None) -> CaseResult:
    """Run the case on one backend and device and compare with its reference (`reference_output`)."""
    x, w, b = case.tensors()
    if ref is None:
        ref = reference_output(case)
    with case.layer(w, b, backend=backend, device=device) as layer:
        y = layer(x, *case.inputs())
        device_name = layer.device.name
    max_abs, mean_abs, tol, passed, detail = compare(np.asarray(y), ref)
    return CaseResult(case, backend, device_name, max_abs, mean_abs, tol, passed, detail)

