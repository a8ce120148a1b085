"""Op implementations, one module per (op, backend family): `backends/<family>/<op>.py`.

Each module has `prepare(runtime_backend, spec, *weights, device) -> Prepared`. The registry finds a
module by its file name, as ncnn finds a layer's Vulkan twin, so adding an op to a backend is adding one
file. OpenCL and CUDA share the family `kernel` (one C dialect in kernels/).
"""
from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod

from ..runtime import Backend, DeviceInfo


class Prepared(ABC):
    """An op's weights repacked and uploaded for one device. `run` only binds and dispatches."""

    device: DeviceInfo

    @abstractmethod
    def run(self, x, geom):
        """x is a C-contiguous float32 numpy array or a device array this backend owns; same kind out.
        `geom` is the op's resolved geometry for this input."""

    def profile(self, x, geom) -> tuple[object, float | None]:
        """Run once and return the device-side time in seconds where the API measures it, else None."""
        return self.run(x, geom), None

    def close(self) -> None:
        """Release device memory and objects held for this layer; idempotent."""


@functools.cache
def _module(family: str, op: str):
    try:
        return importlib.import_module(f"{__name__}.{family}.{op}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{family}.{op}":
            raise
        return None


def implementation(op: str, backend: Backend):
    """The module implementing `op` on `backend`; ValueError where the backend has none."""
    module = _module(backend.family, op)
    if module is None:
        raise ValueError(f"backend {backend.name!r} has no implementation of {op}")
    return module


def unsupported(op: str, backend: Backend, spec, device: DeviceInfo) -> str | None:
    """None when `backend` runs this layer of `op` on `device`, else the reason it cannot. A module may
    define `unsupported(spec, device)`; without it, every valid spec runs."""
    module = _module(backend.family, op)
    if module is None:
        return f"backend {backend.name!r} has no implementation of {op}"
    check = getattr(module, "unsupported", None)
    return check(spec, device) if check else None


__all__ = ["Prepared", "implementation", "unsupported"]
