"""deform_conv2d: deformable convolution (DCNv1 without a mask, DCNv2 with one). Its spec (validation of the
layer and of offset/mask), its geometry, the op object `DeformConv2d` with `backward`, and the functional forms
`deform_conv2d` and `deform_conv2d_backward`. Implementations: backends/<family>/deform_conv2d.py.

Semantics are torchvision's deform_conv2d and ONNX DeformConv (opset 19). x is (N, C, H, W), w (O, C/groups,
kh, kw) as in conv2d; offset is (N, 2*G*kh*kw, Ho, Wo) for G offset groups (inferred from its shape, each
covering C/G consecutive input channels): channel g*2*kh*kw + 2k is the y offset and + 2k + 1 the x offset of
tap k = i*kw + j; mask is (N, G*kh*kw, Ho, Wo), channel g*kh*kw + k. Tap (i, j) of output (oy, ox) samples

    y = oy*sh - pad_top + i*dh + offset_y,   x = ox*sw - pad_left + j*dw + offset_x

bilinearly from the four pixels of the cell (floor(y), floor(x)) .. (floor(y)+1, floor(x)+1); pixels outside
the image count as 0, and a point with y <= -1, y >= H, x <= -1 or x >= W reads 0. A NaN coordinate reads NaN.
The sample is scaled by the mask (1 without one), then contracted with w as conv2d does, plus bias, then the
activation.

Gradients (`backward`, the linear op only) are the derivative of that forward. The sampling is piecewise
bilinear in (y, x) with kinks at integer coordinates; there the gradient with respect to the offsets is the
one-sided derivative of the cell floor() picks (the right-sided one), consistently, including at y = -1 or
x = -1 exactly: the value is 0 there but its right derivative is not. That is torchvision's rule and differs
from mmcv/the original DCNv2 code, which returns 0 at -1 (torchvision issue 6885). Zero offsets with
padding 1 sample exactly -1 and H, so the choice matters at the usual initialisation; the right-sided rule is
the only one that agrees with the derivative at every other integer coordinate.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, fields

from ..backends import Prepared
from ..runtime import get_backend
from ..spec import Activation, Conv2dGeometry, Conv2dSpec, check_float32
from .base import ONE_SHOT, Layer, host_array


@dataclass(frozen=True)
class DeformConv2dGeometry(Conv2dGeometry):
    """One resolved deformable convolution: conv2d's sizes plus the offset groups and whether a mask comes (its flops
    are conv2d's: the bilinear sampling is not counted)."""

    offset_groups: int
    has_mask: bool

    @property
    def c_per_offset_group(self) -> int:
        return self.c // self.offset_groups

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def offset_shape(self) -> tuple[int, int, int, int]:
        return (self.n, 2 * self.offset_groups * self.taps, self.oh, self.ow)

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.offset_groups * self.taps, self.oh, self.ow)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.o, self.cg, self.kh, self.kw)

    @property
    def conv(self) -> Conv2dGeometry:
        """The plain convolution of the same sizes (what zero offsets and a mask of ones compute)."""
        return Conv2dGeometry(**{f.name: getattr(self, f.name) for f in fields(Conv2dGeometry)})

    def as_ints(self) -> tuple[int, ...]:
        """Every field in declaration order (conv2d's, then offset_groups), has_mask as 0/1: the order kernels
        take them."""
        return tuple(int(getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class DeformConv2dSpec:
    """A deformable layer: its convolution (w's shape and the hyper-parameters, validated as conv2d's).
    The offset groups and the mask come with each input and are resolved by `geometry`."""

    conv: Conv2dSpec

    @classmethod
    def create(cls, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None) -> "DeformConv2dSpec":
        return cls(Conv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                     activation=activation))

    out_channels = property(lambda self: self.conv.out_channels)
    in_channels = property(lambda self: self.conv.in_channels)
    kh = property(lambda self: self.conv.kh)
    kw = property(lambda self: self.conv.kw)
    stride = property(lambda self: self.conv.stride)
    dilation = property(lambda self: self.conv.dilation)
    pads = property(lambda self: self.conv.pads)
    groups = property(lambda self: self.conv.groups)
    has_bias = property(lambda self: self.conv.has_bias)

    @property
    def activation(self) -> Activation:
        return self.conv.activation

    def geometry(self, x_shape, offset_shape, mask_shape=None) -> DeformConv2dGeometry:
        """Validate the shapes of x, offset and mask (None: no mask) and resolve the layer for them."""
        g = self.conv.geometry(x_shape)
        taps = g.kh * g.kw
        offset_shape = tuple(int(s) for s in offset_shape)
        expected = f"(N, 2*offset_groups*kh*kw, Ho, Wo) = ({g.n}, 2*offset_groups*{taps}, {g.oh}, {g.ow})"
        if len(offset_shape) != 4:
            raise ValueError(f"offset must be 4-D {expected}, got shape {offset_shape}")
        channels = offset_shape[1]
        if channels < 2 * taps or channels % (2 * taps):
            raise ValueError(
                f"offset has {channels} channels, which is not a positive multiple of 2*kh*kw = {2 * taps} "
                f"(a y and an x offset per tap of a {g.kh}x{g.kw} kernel per offset group); offset must be {expected}")
        offset_groups = channels // (2 * taps)
        if (offset_shape[0], offset_shape[2], offset_shape[3]) != (g.n, g.oh, g.ow):
            raise ValueError(f"offset must be {expected}, got shape {offset_shape}")
        if g.c % offset_groups:
            raise ValueError(
                f"x has C={g.c} channels, not divisible by the {offset_groups} offset groups of offset "
                f"(its {channels} channels = 2*{offset_groups}*{taps})")
        if mask_shape is not None:
            mask_shape = tuple(int(s) for s in mask_shape)
            want = (g.n, offset_groups * taps, g.oh, g.ow)
            if mask_shape != want:
                raise ValueError(
                    f"mask must have shape (N, offset_groups*kh*kw, Ho, Wo) = {want} for offset of shape "
                    f"{offset_shape}, got {mask_shape}")
        return DeformConv2dGeometry(**{f.name: getattr(g, f.name) for f in fields(Conv2dGeometry)},
                                    offset_groups=offset_groups, has_mask=mask_shape is not None)

    def check_backward(self) -> None:
        """Backward is defined for the linear op: a fused activation's derivative would need its input."""
        if self.activation.kind != "none":
            raise ValueError(
                f"backward is for the linear deform_conv2d (activation None), this layer fuses activation "
                f"{self.activation.kind!r}: apply the activation outside the layer to train it")

    @staticmethod
    def check_grad_output(geom: DeformConv2dGeometry, grad_y) -> None:
        check_float32("grad_y", grad_y)
        if tuple(grad_y.shape) != geom.output_shape:
            raise ValueError(f"grad_y must have the output's shape {geom.output_shape}, got {tuple(grad_y.shape)}")


class DeformConv2dPrepared(Prepared):
    """What backends/<family>/deform_conv2d.py `prepare(backend, spec, w, b, device)` returns.

    Every array argument is a C-contiguous float32 numpy array, or a device array of the backend (all of one
    call of the same kind), already validated against `geom`; `mask` is None without a mask (geom.has_mask).
    Results are of the inputs' kind. CPU backends are deterministic (no atomics, fixed summation order).
    """

    @abstractmethod
    def run(self, x, offset, mask, geom: DeformConv2dGeometry):
        """y (N, O, Ho, Wo): the forward with the prepared bias and activation."""

    def profile(self, x, offset, mask, geom: DeformConv2dGeometry):
        """(y, device seconds or None)."""
        return self.run(x, offset, mask, geom), None

    @abstractmethod
    def backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        """(grad_x, grad_offset, grad_mask or None without a mask, grad_w (O, C/groups, kh, kw), grad_b (O,))
        of the linear op (the spec has no activation) at (x, offset, mask, the prepared w); grad_b is the
        bias gradient whether or not the layer has a bias."""

    def profile_backward(self, grad_y, x, offset, mask, geom: DeformConv2dGeometry):
        """(the five gradients, device seconds or None)."""
        return self.backward(grad_y, x, offset, mask, geom), None


class DeformConv2d(Layer):
    """A prepared deformable convolution, called as `layer(x, offset, mask=None)`; `layer.backward(grad_y, x,
    offset, mask=None)` returns (grad_x, grad_offset, grad_mask, grad_w, grad_b). See the module docstring."""

    op = "deform_conv2d"

    def __init__(self, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None,
                 backend="numpy", device=None):
        spec = DeformConv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                       activation=activation)
        self._prepared = None
        self._prepare(spec, backend, device, host_array("w", w), None if b is None else host_array("b", b))

    def geometry(self, x, offset, mask=None) -> DeformConv2dGeometry:
        """Validate x, offset and mask (dtype and shapes) for this layer and resolve its sizes."""
        check_float32("x", x)
        check_float32("offset", offset)
        if mask is not None:
            check_float32("mask", mask)
        return self.spec.geometry(x.shape, offset.shape, None if mask is None else mask.shape)

    def _inputs(self, **arrays) -> tuple[list, list]:
        """(the arrays as the backend takes them: all C-contiguous numpy, or all device arrays it owns; per
        array the function returning a result in its kind, see arrays.py). None stays None."""
        pairs = [(None, None) if a is None else self._input(name, a) for name, a in arrays.items()]
        converted = [array for array, _ in pairs]
        kinds = {type(a) for a in converted if a is not None}
        if len(kinds) > 1:
            names = ", ".join(f"{name}: {type(a).__name__}" for name, a in arrays.items() if a is not None)
            raise TypeError(f"the arrays of one call must all be numpy arrays or all device arrays, got {names}")
        return converted, [restore for _, restore in pairs]

    def _forward_inputs(self, x, offset, mask):
        """(the backend's arrays, the function giving y in x's kind, the geometry)."""
        geom = self.geometry(x, offset, mask)
        arrays, (restore, *_) = self._inputs(x=x, offset=offset, mask=mask)
        return arrays, restore, geom

    def __call__(self, x, offset, mask=None):
        arrays, restore, geom = self._forward_inputs(x, offset, mask)
        return restore(self._prepared.run(*arrays, geom))

    def profile(self, x, offset, mask=None):
        """Run once; returns (y in x's kind, device seconds or None where the API gives no device timer)."""
        arrays, restore, geom = self._forward_inputs(x, offset, mask)
        y, seconds = self._prepared.profile(*arrays, geom)
        return restore(y), seconds

    def _backward_inputs(self, grad_y, x, offset, mask):
        """(the backend's arrays, the function giving the five gradients in their kinds, the geometry):
        grad_x, grad_offset and grad_mask take the kind of x, offset and mask, grad_w and grad_b grad_y's."""
        self.spec.check_backward()
        geom = self.geometry(x, offset, mask)
        self.spec.check_grad_output(geom, grad_y)
        arrays, (grad_y_kind, *kinds) = self._inputs(grad_y=grad_y, x=x, offset=offset, mask=mask)
        kinds += [grad_y_kind, grad_y_kind]
        return arrays, lambda grads: tuple(None if g is None else k(g) for g, k in zip(grads, kinds)), geom

    def backward(self, grad_y, x, offset, mask=None):
        """(grad_x, grad_offset, grad_mask (None without a mask), grad_w, grad_b) of sum(grad_y * layer(x, ...)),
        each in the kind of its input (grad_w and grad_b in grad_y's)."""
        arrays, restore, geom = self._backward_inputs(grad_y, x, offset, mask)
        return restore(self._prepared.backward(*arrays, geom))

    def profile_backward(self, grad_y, x, offset, mask=None):
        """backward once; returns (the five gradients, device seconds or None)."""
        arrays, restore, geom = self._backward_inputs(grad_y, x, offset, mask)
        grads, seconds = self._prepared.profile_backward(*arrays, geom)
        return restore(grads), seconds

    def __repr__(self) -> str:
        s = self.spec
        return (f"DeformConv2d({s.out_channels}, {s.in_channels}, kernel=({s.kh}, {s.kw}), stride={s.stride}, "
                f"dilation={s.dilation}, pads={s.pads or 'same'}, groups={s.groups}, "
                f"activation={s.activation.kind}, device={self.device})")


def _one_shot(w, b, kwargs, backend, device, call):
    """call(layer) on the one-shot cache's DeformConv2d for these weights and keywords."""
    spec = DeformConv2dSpec.create(w, b, **kwargs)
    chosen = get_backend(backend)
    info = chosen.select(device)
    return ONE_SHOT.run(("deform_conv2d", chosen.name, info.index, spec), (w, b),
                        lambda w, b: DeformConv2d(w, b, **kwargs, backend=chosen.name, device=info.index), call)


def deform_conv2d(x, offset, w, b=None, *, mask=None, stride=1, padding=0, dilation=1, groups=1, activation=None,
                  backend="numpy", device=None):
    """One-shot deformable convolution; like `conv2d`, the prepared layer is reused while w and b hold the same
    values."""
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation)
    DeformConv2dSpec.create(w, b, **kwargs).geometry(  # bad shapes fail before anything is prepared
        _shape("x", x), _shape("offset", offset), None if mask is None else _shape("mask", mask))
    return _one_shot(w, b, kwargs, backend, device, lambda layer: layer(x, offset, mask))


def deform_conv2d_backward(grad_y, x, offset, w, mask=None, *, stride=1, padding=0, dilation=1, groups=1,
                           backend="numpy", device=None):
    """(grad_x, grad_offset, grad_mask (None without a mask), grad_w, grad_b) of the linear deform_conv2d at
    (x, offset, w, mask) for the output gradient grad_y."""
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    DeformConv2dSpec.create(w, None, **kwargs).geometry(
        _shape("x", x), _shape("offset", offset), None if mask is None else _shape("mask", mask))
    return _one_shot(w, None, kwargs, backend, device, lambda layer: layer.backward(grad_y, x, offset, mask))


def _shape(name: str, array) -> tuple:
    check_float32(name, array)
    return tuple(array.shape)
