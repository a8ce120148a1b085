"""Conv2d: a layer's spec and weights prepared once for one backend and device, then run many times."""
from __future__ import annotations

import numpy as np

from .backends import get_backend
from .spec import Conv2dGeometry, Conv2dSpec, check_float32


class Conv2d:
    """A prepared convolution layer.

    Validation and padding resolution happen in the spec, before the backend sees anything; the
    backend repacks and uploads the weights here, once. Use it as a context manager, or call
    `close()`, to release device memory early.
    """

    def __init__(self, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None,
                 backend="numpy", device=None):
        self.spec = Conv2dSpec.create(
            w, b, stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation
        )
        self.backend = get_backend(backend)
        self.device = self.backend.select(device)
        unsupported = self.backend.supports(self.spec)
        if unsupported:
            raise ValueError(f"backend {self.backend.name!r} cannot run this layer: {unsupported}")
        self._prepared = self.backend.prepare(
            self.spec,
            np.ascontiguousarray(_host("w", w)),
            None if b is None else np.ascontiguousarray(_host("b", b)),
            self.device,
        )

    def geometry(self, x) -> Conv2dGeometry:
        """Validate x for this layer and resolve its padding and output size."""
        check_float32("x", x)
        return self.spec.geometry(x.shape)

    def _bind(self, x):
        """Validate x and resolve its geometry; the array handed to the backend, and the geometry."""
        if self._prepared is None:
            raise ValueError("this Conv2d is closed")
        geom = self.geometry(x)
        if isinstance(x, np.ndarray):
            return np.ascontiguousarray(x), geom
        if self.backend.owns(x):
            return x, geom
        raise TypeError(
            f"x must be a numpy.ndarray or a device array of backend {self.backend.name!r}, got {type(x).__name__}"
        )

    def __call__(self, x):
        x, geom = self._bind(x)
        return self._prepared.run(x, geom)

    def profile(self, x):
        """Run once; returns (y, device seconds or None where the API gives no device timer)."""
        x, geom = self._bind(x)
        return self._prepared.profile(x, geom)

    def close(self) -> None:
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None

    def __enter__(self) -> "Conv2d":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Conv2d({s.out_channels}, {s.in_channels}, kernel=({s.kh}, {s.kw}), stride={s.stride}, "
            f"dilation={s.dilation}, pads={s.pads or 'same'}, groups={s.groups}, "
            f"activation={s.activation.kind}, device={self.device})"
        )


def _host(name: str, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__name__}")
    return array


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None,
           backend="numpy", device=None):
    """One-shot convolution; prepares the weights each call, so keep a `Conv2d` for repeated use."""
    check_float32("x", x)
    # x against w first: a mismatch fails before a backend builds anything (pipelines can take seconds).
    Conv2dSpec.create(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                      activation=activation).geometry(x.shape)
    with Conv2d(w, b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                activation=activation, backend=backend, device=device) as layer:
        return layer(x)
