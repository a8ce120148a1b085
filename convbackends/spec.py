"""The conv2d specification, validated and resolved once before any backend sees it.

Everything user-facing (ints or pairs, padding modes, activation names) is normalised here into
plain integers; backends only ever see a `Conv2dSpec` and a per-input `Conv2dGeometry` with
explicit pads. Validation errors are raised here, so their text is the same on every backend.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

# Activation codes shared with kernels/prelude.h and shaders/activation.glsl; a test checks they agree.
ACTIVATION_CODES = {
    "none": 0,
    "relu": 1,
    "relu6": 2,
    "sigmoid": 3,
    "tanh": 4,
    "silu": 5,
    "mish": 6,
    "hardswish": 7,
    "leaky_relu": 8,
    "clip": 9,
}

ACTIVATION_HELP = (
    'None, "relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", '
    '("leaky_relu", alpha) or ("clip", lo, hi)'
)


# Kernels take sizes, strides, dilations and pads as int32 and index within an image in int32 (only
# an image's offset in the batch is 64-bit): larger values are refused here, on every backend alike.
INT32_MAX = 2**31 - 1
# Activation parameters reach the kernels as float32 values: they must be finite there.
FLOAT32_MAX = float(np.finfo(np.float32).max)

# How many parameters each activation takes: leaky_relu's alpha, clip's lo and hi.
_ACTIVATION_PARAM_COUNT = {"leaky_relu": 1, "clip": 2}


@dataclass(frozen=True)
class Activation:
    """A fused activation: `kind` names it, `alpha`/`beta` carry leaky_relu's slope or clip's bounds.

    Validated on construction, so every backend gets a known kind with finite float32 parameters;
    parameters an activation does not take are 0.0.
    """

    kind: str = "none"
    alpha: float | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind.lower() not in ACTIVATION_CODES:
            raise ValueError(f"activation must be one of {ACTIVATION_HELP}, got {self.kind!r}")
        kind = self.kind.lower()
        count = _ACTIVATION_PARAM_COUNT.get(kind, 0)
        given, unused = (self.alpha, self.beta)[:count], (self.alpha, self.beta)[count:]
        form = (kind, *(p for p in (self.alpha, self.beta) if p is not None))  # as the user wrote it
        if not all(p is None or _is_real(p) for p in (self.alpha, self.beta)):
            raise TypeError(f"activation parameters must be real numbers, got {form!r}")
        if any(p is None for p in given):
            raise ValueError(
                f"activation {kind!r} needs parameters: use ('leaky_relu', alpha) or ('clip', lo, hi)")
        if any(p is not None and p != 0 for p in unused):
            raise ValueError(f"activation must be one of {ACTIVATION_HELP}, got {form!r}")
        if not all(abs(p) <= FLOAT32_MAX for p in given):  # NaN fails too; ints compare exactly
            raise ValueError(f"activation parameters must be finite float32 values (|v| <= {FLOAT32_MAX:.8g}), "
                             f"got {(kind, *given)!r}")
        params = tuple(float(p) for p in given)
        if kind == "clip" and not params[0] <= params[1]:
            raise ValueError(f"activation ('clip', lo, hi) needs lo <= hi, got {(kind, *params)!r}")
        params += (0.0,) * (2 - len(params))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "alpha", params[0])
        object.__setattr__(self, "beta", params[1])

    @property
    def code(self) -> int:
        return ACTIVATION_CODES[self.kind]

    @classmethod
    def parse(cls, activation) -> "Activation":
        """None, a name, an Activation, or (name, *parameters) as ACTIVATION_HELP lists them."""
        if activation is None:
            return cls()
        if isinstance(activation, Activation):
            return activation
        if isinstance(activation, str):
            return cls(activation)
        if isinstance(activation, (tuple, list)) and activation and isinstance(activation[0], str):
            name, params = activation[0].lower(), tuple(activation[1:])
            if len(params) == _ACTIVATION_PARAM_COUNT.get(name, 0) > 0:
                return cls(name, *params)
        raise ValueError(f"activation must be one of {ACTIVATION_HELP}, got {activation!r}")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(_is_int(v) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if any(v > INT32_MAX for v in items):
        raise ValueError(f"{name} must be <= {INT32_MAX} (int32), got {value!r}")
    return int(items[0]), int(items[1])


def _padding(value) -> tuple[int, int, int, int] | None:
    """Explicit (top, left, bottom, right) pads, or None for SAME_UPPER (resolved per input size)."""
    if isinstance(value, str):
        mode = value.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            return None
        raise ValueError(f'padding must be an int, (ph, pw), (top, left, bottom, right), "same" or "valid", got {value!r}')
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not all(_is_int(v) for v in items):
        raise TypeError(f"padding must be made of ints, got {value!r}")
    if len(items) not in (1, 2, 4):
        raise ValueError(f"padding must have 1, 2 or 4 values, got {value!r}")
    if any(v < 0 for v in items):
        raise ValueError(f"padding must be >= 0, got {value!r}")
    if any(v > INT32_MAX for v in items):
        raise ValueError(f"padding must be <= {INT32_MAX} (int32), got {value!r}")
    if len(items) == 1:
        return (int(items[0]),) * 4
    if len(items) == 2:
        return (int(items[0]), int(items[1]), int(items[0]), int(items[1]))
    return tuple(int(v) for v in items)


_FLOAT32 = np.dtype(np.float32)


def check_float32(name: str, array) -> None:
    """All tensors are float32: a silent cast would hide a copy and a change of precision."""
    dtype = getattr(array, "dtype", None)
    if dtype is _FLOAT32 and isinstance(array, np.ndarray):  # the common case, without the name lookups below
        return
    if dtype is None or not hasattr(array, "shape"):
        raise TypeError(f"{name} must be an array, got {type(array).__name__}")
    if str(dtype).startswith("torch."):  # torch dtypes are no numpy dtypes
        if str(dtype) != "torch.float32":
            raise TypeError(f"{name} must be float32, got {dtype}; convert it with .float()")
        return
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"{name} must be float32, got {np.dtype(dtype)}; convert it with .astype(numpy.float32)")


def check_bias(b, out_channels: int) -> None:
    """b is None or float32 (out_channels,): every op's bias."""
    if b is not None:
        check_float32("b", b)
        if tuple(b.shape) != (out_channels,):
            raise ValueError(f"b must have shape ({out_channels},), got {tuple(b.shape)}")


def _check_int32_image(what: str, chw: tuple[int, int, int]) -> None:
    """One image's elements, C x H x W, must be indexable with the kernels' int32."""
    elements = math.prod(chw)
    if elements > INT32_MAX:
        raise ValueError(f"{what} has {elements} elements per image ({' x '.join(map(str, chw))}), above the "
                         f"{INT32_MAX} that the kernels' int32 indexing holds")


@dataclass(frozen=True)
class Conv2dGeometry:
    """One resolved convolution: every size a kernel needs, in the order kernels take them."""

    n: int
    c: int
    h: int
    w: int
    o: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pl: int
    pb: int
    pr: int
    groups: int

    @property
    def cg(self) -> int:
        """Input channels per group."""
        return self.c // self.groups

    @property
    def og(self) -> int:
        """Output channels per group."""
        return self.o // self.groups

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.o, self.oh, self.ow)

    @property
    def flops(self) -> int:
        """Multiply-adds counted as two flops, the usual GFLOP/s convention."""
        return 2 * self.n * self.o * self.oh * self.ow * self.cg * self.kh * self.kw

    def as_ints(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Conv2dSpec:
    """A layer: weights' shape and every hyper-parameter, normalised. Input size comes later."""

    out_channels: int
    in_channels: int
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int] | None  # None: SAME_UPPER, resolved in geometry()
    groups: int
    activation: Activation
    has_bias: bool

    @classmethod
    def create(cls, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None) -> "Conv2dSpec":
        check_float32("w", w)
        if len(w.shape) != 4:
            raise ValueError(f"w must be 4-D (out_channels, in_channels/groups, kh, kw), got shape {tuple(w.shape)}")
        o, cg, kh, kw = (int(s) for s in w.shape)
        if min(o, cg, kh, kw) < 1:
            raise ValueError(f"w must have no empty dimension, got shape {tuple(w.shape)}")
        if not _is_int(groups):
            raise TypeError(f"groups must be an int, got {groups!r}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups!r}")
        if o % groups:
            raise ValueError(f"groups={groups} must divide out_channels={o}")
        check_bias(b, o)
        dilation = _pair("dilation", dilation, 1)
        extent = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
        if max(extent) > INT32_MAX:
            raise ValueError(f"the dilated kernel's extent {extent} ((k - 1) * dilation + 1, kernel {(kh, kw)}, "
                             f"dilation {dilation}) must be <= {INT32_MAX} (int32)")
        return cls(
            out_channels=o,
            in_channels=cg * int(groups),
            kh=kh,
            kw=kw,
            stride=_pair("stride", stride, 1),
            dilation=dilation,
            pads=_padding(padding),
            groups=int(groups),
            activation=Activation.parse(activation),
            has_bias=b is not None,
        )

    @property
    def is_depthwise(self) -> bool:
        """One input channel per group (groups == C), any channel multiplier O/C."""
        return self.groups == self.in_channels and self.groups > 1

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the convolution is a plain GEMM ("same" pads nothing here)."""
        return (self.kh, self.kw, self.stride) == (1, 1, (1, 1)) and self.pads in (None, (0, 0, 0, 0))

    @property
    def algorithm(self) -> str:
        """The algorithm family, chosen by shape as OpenCV and ncnn do; one name across all backends."""
        if self.is_depthwise:
            return "depthwise"
        if self.is_pointwise:
            return "gemm_1x1"
        return "implicit_gemm"

    def _same_pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """ONNX SAME_UPPER, dilation-aware: out = ceil(in / stride), the odd pixel goes at the end."""
        pads = []
        for size, k, s, d in ((h, self.kh, self.stride[0], self.dilation[0]), (w, self.kw, self.stride[1], self.dilation[1])):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            pads.append((total // 2, total - total // 2))
        (pt, pb), (pl, pr) = pads
        return (pt, pl, pb, pr)

    def geometry(self, shape) -> Conv2dGeometry:
        """Validate an input shape against the layer and resolve padding and output size."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"x must be 4-D NCHW, got shape {shape}")
        n, c, h, w = shape
        if n < 1:
            raise ValueError(f"x must have a batch of at least 1, got shape {shape}")
        if c % self.groups:
            raise ValueError(f"groups={self.groups} must divide the input channels of x, got C={c}")
        if c != self.in_channels:
            raise ValueError(
                f"x has {c} channels but w expects {self.in_channels} "
                f"(in_channels/groups={self.in_channels // self.groups} x groups={self.groups})"
            )
        pt, pl, pb, pr = self.pads if self.pads is not None else self._same_pads(h, w)
        _check_int32_image(f"x of shape {shape} padded by {(pt, pl, pb, pr)}", (c, h + pt + pb, w + pl + pr))
        sh, sw = self.stride
        dh, dw = self.dilation
        oh = (h + pt + pb - (self.kh - 1) * dh - 1) // sh + 1
        ow = (w + pl + pr - (self.kw - 1) * dw - 1) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(
                f"output size ({oh}, {ow}) is below 1 for x of shape {shape}, kernel ({self.kh}, {self.kw}), "
                f"stride {self.stride}, dilation {self.dilation} and pads {(pt, pl, pb, pr)}"
            )
        _check_int32_image(f"the output of shape {(n, self.out_channels, oh, ow)}", (self.out_channels, oh, ow))
        return Conv2dGeometry(
            n=n, c=c, h=h, w=w, o=self.out_channels, oh=oh, ow=ow, kh=self.kh, kw=self.kw,
            sh=sh, sw=sw, dh=dh, dw=dw, pt=pt, pl=pl, pb=pb, pr=pr, groups=self.groups,
        )
