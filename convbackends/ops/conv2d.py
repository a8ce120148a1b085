"""conv2d: the op object `Conv2d` (weights prepared once for one backend and device, run many times) and
the functional `conv2d`. The spec (validation, padding, output size) is `spec.Conv2dSpec`, resolved here
before any backend sees it; the implementations are `backends/<family>/conv2d.py`.
"""
from __future__ import annotations

from ..runtime import get_backend
from ..spec import Conv2dGeometry, Conv2dSpec, check_float32
from .base import ONE_SHOT, Layer, host_array


class Conv2d(Layer):
    """A prepared convolution layer.

    Validation and padding resolution happen in the spec, before the backend sees anything; the
    backend repacks and uploads the weights here, once. Use it as a context manager, or call
    `close()`, to release device memory early (it is released when the layer is collected anyway).
    """

    op = "conv2d"

    def __init__(self, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None,
                 backend="numpy", device=None):
        spec = Conv2dSpec.create(
            w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation
        )
        self._prepared = None
        self._prepare(spec, backend, device, host_array("w", w), None if b is None else host_array("b", b))

    def geometry(self, x) -> Conv2dGeometry:
        """Validate x for this layer and resolve its padding and output size."""
        check_float32("x", x)
        return self.spec.geometry(x.shape)

    def __call__(self, x):
        return self._run(x, self.geometry(x))

    def profile(self, x):
        """Run once; returns (y, device seconds or None where the API gives no device timer)."""
        return self._profile(x, self.geometry(x))

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Conv2d({s.out_channels}, {s.in_channels}, kernel=({s.kh}, {s.kw}), stride={s.stride}, "
            f"dilation={s.dilation}, pads={s.pads or 'same'}, groups={s.groups}, "
            f"activation={s.activation.kind}, device={self.device})"
        )


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None,
           backend="numpy", device=None):
    """One-shot convolution. The prepared layer is kept (`ops.base.OneShotCache`) and reused while the
    same w and b arrays hold the same values, so calling this in a loop prepares once."""
    check_float32("x", x)
    spec = Conv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             activation=activation)
    geom = spec.geometry(x.shape)  # a bad x fails before anything is prepared
    chosen = get_backend(backend)
    info = chosen.select(device)
    return ONE_SHOT.run(
        ("conv2d", chosen.name, info.index, spec), (w, b),
        lambda w, b: Conv2d(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                            activation=activation, backend=chosen.name, device=info.index),
        lambda layer: layer._run(x, geom),
    )
