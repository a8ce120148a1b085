"""conv_transpose2d: its spec (validation, padding, output size), its decomposition into stride phases, the op
object `ConvTranspose2d` and the functional `conv_transpose2d`. Implementations: backends/<family>/conv_transpose2d.py.

Semantics are ONNX ConvTranspose (and torch's conv_transpose2d): w is (C, O/groups, kh, kw) and, per axis,

    out = stride * (in - 1) + output_padding + dilation * (k - 1) + 1 - pad_begin - pad_end.

No zero-stuffing: output row oy = p + stride * j (phase p) is reached only by the taps i with
(p + pad_begin - i * dilation) divisible by the stride, so each of the stride_h * stride_w output phases is a
plain stride-1 correlation of x with those taps (flipped), at dilation dilation / gcd(stride, dilation).
`phases()` resolves that once per layer; every backend runs the phases with its own conv2d (implicit GEMM,
1x1 GEMM, depthwise, Winograd, the fused bias and activation) and interleaves their outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..runtime import get_backend
from ..spec import Activation, Conv2dGeometry, Conv2dSpec, _is_int, _padding, _pair, check_bias, check_float32
from .base import ONE_SHOT, Layer, host_array


@dataclass(frozen=True)
class ConvTranspose2dGeometry(Conv2dGeometry):
    """One resolved transposed convolution: the input, the output and every size of the layer, explicit
    (conv2d's fields, the pads cropping the output, plus the output padding)."""

    oph: int
    opw: int

    @property
    def flops(self) -> int:
        """Useful multiply-adds (each input pixel meets every tap once) counted as two flops."""
        return 2 * self.n * self.c * self.h * self.w * self.og * self.kh * self.kw


@dataclass(frozen=True)
class AxisPhase:
    """One output phase along one axis: output index p + stride * j for j < count, computed as a stride-1
    correlation of the input rows [crop_begin, size - crop_end) zero-padded by (pad_begin, pad_end), with
    the layer's taps `taps` (kernel indices, in correlation order) at dilation `dilation`. No taps (or no
    input left after cropping) means the phase sees only the bias."""

    start: int
    count: int
    taps: tuple[int, ...]
    dilation: int
    pad_begin: int
    pad_end: int
    crop_begin: int
    crop_end: int


def axis_phases(size: int, out: int, k: int, s: int, d: int, pad_begin: int) -> list[AxisPhase]:
    """The stride phases of one axis (only those with at least one output)."""
    step = d // math.gcd(s, d)
    phases = []
    for p in range(min(s, out)):
        count = -(-(out - p) // s)
        residue, q0 = (p + pad_begin) % s, (p + pad_begin) // s
        reached = [i for i in range(k) if (i * d - residue) % s == 0]
        offsets = [(i * d - residue) // s for i in reached]  # input row q0 + j - offset meets tap i
        if not reached:
            phases.append(_bias_only(AxisPhase(p, count, (), 1, 0, 0, 0, 0), size))
            continue
        first = q0 - max(offsets)  # input row of the first tap for j = 0
        last = first + count - 1 + (len(reached) - 1) * step  # input row of the last tap for the last j
        crop_begin, crop_end = max(0, first), max(0, size - 1 - last)
        if crop_begin + crop_end >= size:  # every tap falls outside the input: the bias alone
            phases.append(_bias_only(AxisPhase(p, count, (), 1, 0, 0, 0, 0), size))
            continue
        phases.append(AxisPhase(p, count, tuple(reversed(reached)), step if len(reached) > 1 else 1,
                                max(0, -first), max(0, last - (size - 1)), crop_begin, crop_end))
    return phases


@dataclass(frozen=True)
class Phase:
    """One 2-D output phase: y[:, :, rows.start::sh, cols.start::sw] = conv2d(x cropped, weights(w), spec)."""

    rows: AxisPhase
    cols: AxisPhase
    spec: Conv2dSpec

    @property
    def constant(self) -> bool:
        return not self.rows.taps or not self.cols.taps

    def crop(self, h: int, w: int) -> tuple[slice, slice]:
        """The rows and columns of x this phase reads."""
        r, c = self.rows, self.cols
        return slice(r.crop_begin, h - r.crop_end), slice(c.crop_begin, w - c.crop_end)

    def weights(self, w: np.ndarray, groups: int) -> np.ndarray:
        """This phase's conv2d weights (O, C/groups, taps_h, taps_w) from w (C, O/groups, kh, kw);
        zeros (O, C/groups, 1, 1) for a phase that sees only the bias."""
        c, og = w.shape[0], w.shape[1]
        if self.constant:
            return np.zeros((og * groups, c // groups, 1, 1), np.float32)
        taps = w[:, :, list(self.rows.taps)][:, :, :, list(self.cols.taps)]
        taps = taps.reshape(groups, c // groups, og, *taps.shape[2:]).transpose(0, 2, 1, 3, 4)
        return np.ascontiguousarray(taps.reshape(groups * og, c // groups, *taps.shape[3:]))


@dataclass(frozen=True)
class ConvTranspose2dSpec:
    """A transposed layer, normalised: w's shape, every hyper-parameter, explicit pads (resolved here for
    "same", whose pads do not depend on the input size). Input size and output_size come later."""

    in_channels: int
    out_channels: int
    kh: int
    kw: int
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    output_padding: tuple[int, int]
    groups: int
    activation: Activation
    has_bias: bool
    same: bool = False

    @classmethod
    def create(cls, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
               activation=None) -> "ConvTranspose2dSpec":
        check_float32("w", w)
        if len(w.shape) != 4:
            raise ValueError(
                f"w must be 4-D (in_channels, out_channels/groups, kh, kw), got shape {tuple(w.shape)}")
        c, og, kh, kw = (int(s) for s in w.shape)
        if min(c, og, kh, kw) < 1:
            raise ValueError(f"w must have no empty dimension, got shape {tuple(w.shape)}")
        if not _is_int(groups):
            raise TypeError(f"groups must be an int, got {groups!r}")
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups!r}")
        if c % groups:
            raise ValueError(f"groups={groups} must divide in_channels={c} (w is (in_channels, out_channels/groups, kh, kw))")
        o = og * int(groups)
        check_bias(b, o)
        stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
        output_padding = _pair("output_padding", output_padding, 0)
        for axis, (op, s, d) in enumerate(zip(output_padding, stride, dilation)):
            if op >= max(s, d):
                raise ValueError(
                    f"output_padding must be smaller than stride or dilation, got output_padding={output_padding} "
                    f"with stride={stride} and dilation={dilation}")
        pads = _padding(padding)
        same = pads is None
        if same:
            pads = cls._same_pads((kh, kw), stride, dilation, output_padding)
        spec = cls(in_channels=c, out_channels=o, kh=kh, kw=kw, stride=stride, dilation=dilation, pads=pads,
                   output_padding=output_padding, groups=int(groups), activation=Activation.parse(activation),
                   has_bias=b is not None, same=same)
        return spec

    @staticmethod
    def _same_pads(kernel, stride, dilation, output_padding) -> tuple[int, int, int, int]:
        """ONNX SAME_UPPER for ConvTranspose: output = input * stride, whatever the input size. The total
        padding (k - 1) * d + 1 + output_padding - stride is split with the odd row/column at the end."""
        pads = []
        for k, s, d, op in zip(kernel, stride, dilation, output_padding):
            total = (k - 1) * d + 1 + op - s
            if total < 0:
                raise ValueError(
                    f'padding="same" (output = input * stride) needs (kernel - 1) * dilation + 1 + output_padding '
                    f">= stride, got kernel {tuple(kernel)}, dilation {dilation}, output_padding {output_padding} "
                    f"and stride {stride}")
            pads.append((total // 2, total - total // 2))
        (pt, pb), (pl, pr) = pads
        return (pt, pl, pb, pr)

    @property
    def padding_rule(self) -> str:
        return "same" if self.same else str(self.pads)

    def _output_padding(self, shape, output_size) -> tuple[int, int]:
        if output_size is None:
            return self.output_padding
        if self.same:
            raise ValueError('output_size cannot be combined with padding="same", which fixes output = input * stride')
        size = _pair("output_size", output_size, 1)
        result = []
        for axis, (want, n, k, s, d, pb, pe) in enumerate(zip(
                size, shape[2:], (self.kh, self.kw), self.stride, self.dilation, self.pads[0::2], self.pads[1::2])):
            smallest = s * (n - 1) + d * (k - 1) + 1 - pb - pe
            largest = smallest + max(s, d) - 1
            if not smallest <= want <= largest:
                raise ValueError(
                    f"output_size {size} is unreachable for x of shape {tuple(shape)}: "
                    f"{'height' if axis == 0 else 'width'} can be {smallest}..{largest} with this layer")
            result.append(want - smallest)
        return tuple(result)

    def geometry(self, shape, output_size=None) -> ConvTranspose2dGeometry:
        """Validate an input shape (and output_size) against the layer; resolve the output size."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise ValueError(f"x must be 4-D NCHW, got shape {shape}")
        n, c, h, w = shape
        if n < 1:
            raise ValueError(f"x must have a batch of at least 1, got shape {shape}")
        if h < 1 or w < 1:
            raise ValueError(f"x must have at least one row and one column, got shape {shape}")
        if c != self.in_channels:
            raise ValueError(
                f"x has {c} channels but w expects {self.in_channels} (w is (in_channels, out_channels/groups, kh, kw))")
        oph, opw = self._output_padding(shape, output_size)
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.stride, self.dilation, self.pads
        oh = sh * (h - 1) + oph + dh * (self.kh - 1) + 1 - pt - pb
        ow = sw * (w - 1) + opw + dw * (self.kw - 1) + 1 - pl - pr
        if oh < 1 or ow < 1:
            raise ValueError(
                f"output size ({oh}, {ow}) is below 1 for x of shape {shape}, kernel ({self.kh}, {self.kw}), "
                f"stride {self.stride}, dilation {self.dilation}, output_padding {(oph, opw)} and pads {self.pads}")
        geom = ConvTranspose2dGeometry(n=n, c=c, h=h, w=w, o=self.out_channels, oh=oh, ow=ow, kh=self.kh, kw=self.kw,
                                       sh=sh, sw=sw, dh=dh, dw=dw, pt=pt, pl=pl, pb=pb, pr=pr, oph=oph, opw=opw,
                                       groups=self.groups)
        return geom

    def phases(self, geom: ConvTranspose2dGeometry) -> list[Phase]:
        """The stride phases of one geometry. They depend on the input size only through output_padding
        (the phases' pads and crops are fixed by the layer), so a prepared layer keeps one set per
        output_padding."""
        rows = axis_phases(geom.h, geom.oh, geom.kh, geom.sh, geom.dh, geom.pt)
        cols = axis_phases(geom.w, geom.ow, geom.kw, geom.sw, geom.dw, geom.pl)
        result = []
        for row in rows:
            for col in cols:
                r, c = row, col
                if not r.taps or not c.taps:
                    r, c = _bias_only(r, geom.h), _bias_only(c, geom.w)
                w_shape = (self.out_channels, self.in_channels // self.groups, len(r.taps) or 1, len(c.taps) or 1)
                spec = Conv2dSpec.create(
                    np.empty(w_shape, np.float32), np.empty(self.out_channels, np.float32) if self.has_bias else None,
                    dilation=(r.dilation, c.dilation), groups=self.groups,
                    padding=(r.pad_begin, c.pad_begin, r.pad_end, c.pad_end), activation=self.activation)
                result.append(Phase(r, c, spec))
        return result


def _bias_only(axis: AxisPhase, size: int) -> AxisPhase:
    """The form of a phase that sees only the bias: a 1x1 zero kernel over the first input row, padded out
    to the phase's output count."""
    return AxisPhase(axis.start, axis.count, (), 1, 0, axis.count - 1, 0, size - 1)


class ConvTranspose2d(Layer):
    """A prepared transposed convolution layer (see the module docstring for the semantics), called as
    `layer(x, output_size=None)`; `output_size=(H, W)` picks the output_padding that reaches it."""

    op = "conv_transpose2d"

    def __init__(self, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1, activation=None,
                 backend="numpy", device=None):
        spec = ConvTranspose2dSpec.create(w, b, stride=stride, padding=padding, output_padding=output_padding,
                                          dilation=dilation, groups=groups, activation=activation)
        self._prepared = None
        self._prepare(spec, backend, device, host_array("w", w), None if b is None else host_array("b", b))

    def geometry(self, x, output_size=None) -> ConvTranspose2dGeometry:
        check_float32("x", x)
        return self.spec.geometry(x.shape, output_size)

    def __call__(self, x, output_size=None):
        return self._run(x, self.geometry(x, output_size))

    def profile(self, x, output_size=None):
        return self._profile(x, self.geometry(x, output_size))

    def __repr__(self) -> str:
        s = self.spec
        return (f"ConvTranspose2d({s.in_channels}, {s.out_channels}, kernel=({s.kh}, {s.kw}), stride={s.stride}, "
                f"dilation={s.dilation}, pads={s.padding_rule}, output_padding={s.output_padding}, "
                f"groups={s.groups}, activation={s.activation.kind}, device={self.device})")


def conv_transpose2d(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1, activation=None,
                     output_size=None, backend="numpy", device=None):
    """One-shot transposed convolution; like `conv2d`, the prepared layer is reused while w and b hold the
    same values."""
    check_float32("x", x)
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups,
                  activation=activation)
    spec = ConvTranspose2dSpec.create(w, b, **kwargs)
    geom = spec.geometry(x.shape, output_size)
    chosen = get_backend(backend)
    info = chosen.select(device)
    return ONE_SHOT.run(("conv_transpose2d", chosen.name, info.index, spec), (w, b),
                        lambda w, b: ConvTranspose2d(w, b, **kwargs, backend=chosen.name, device=info.index),
                        lambda layer: layer._run(x, geom))
