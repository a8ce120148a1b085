"""The runtimes, one module per backend, imported on first use: `import convbackends` loads no GPU library."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .base import Backend, BackendUnavailable, DeviceInfo

BACKEND_MODULES = {name: name for name in ("numpy", "opencl", "cuda", "vulkan")}

# `backend="auto"` takes the first of these that has a GPU, else numpy: on CPU-only machines the
# numpy backend is as fast as PoCL and faster than llvmpipe (docs/benchmarks-standard-cpu.md).
AUTO_ORDER = ("cuda", "vulkan", "opencl")

_loaded: dict[str, Backend | BackendUnavailable] = {}


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str  # empty when available

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable (' + self.reason + ')'}"


def _load(name: str) -> Backend | BackendUnavailable:
    if name not in _loaded:
        try:
            module = importlib.import_module(f"{__name__}.{BACKEND_MODULES[name]}")
            backend = module.BACKEND
            backend.probe()
            _loaded[name] = backend
        except BackendUnavailable as exc:
            _loaded[name] = exc
        except Exception as exc:  # noqa: BLE001 - a driver's failure must not crash discovery
            # Mostly a missing Python package or shared library (libOpenCL, libvulkan, libcuda);
            # whatever it is, the backend is unusable and the reason is shown (CI fails on it).
            _loaded[name] = BackendUnavailable(f"{type(exc).__name__}: {exc}")
    return _loaded[name]


def check_name(name) -> str:
    choices = ", ".join(repr(n) for n in (*BACKEND_MODULES, "auto"))
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string ({choices}), got {name!r}")
    if name.lower() not in (*BACKEND_MODULES, "auto"):
        raise ValueError(f"backend must be one of {choices}, got {name!r}")
    return name.lower()


def get_backend(name: str) -> Backend:
    """The loaded backend; ValueError for an unknown name, BackendUnavailable (a ValueError) naming the reason if unavailable."""
    name = check_name(name)
    if name == "auto":
        return _auto()
    loaded = _load(name)
    if isinstance(loaded, BackendUnavailable):
        raise BackendUnavailable(f"backend {name!r} is not available: {loaded}")
    return loaded


def _auto() -> Backend:
    for name in AUTO_ORDER:
        loaded = _load(name)
        if isinstance(loaded, Backend) and any(d.type != "cpu" for d in loaded.devices()):
            return loaded
    return get_backend("numpy")


def available_backends() -> dict[str, Availability]:
    """Every backend with whether it runs here and, when not, why."""
    result = {}
    for name in BACKEND_MODULES:
        loaded = _load(name)
        ok = isinstance(loaded, Backend)
        result[name] = Availability(name, ok, "" if ok else str(loaded))
    return result


def opencl_queue(device=None):
    """The pyopencl queue of the OpenCL runtime of `device`: arrays made on it stay on the device in and
    out of every op (arrays of other contexts go through the host)."""
    return get_backend("opencl").runtime(device).queue


def devices(backend: str = "numpy") -> list[DeviceInfo]:
    """The devices of one backend."""
    return get_backend(backend).devices()


__all__ = [
    "Availability",
    "Backend",
    "BackendUnavailable",
    "DeviceInfo",
    "available_backends",
    "devices",
    "get_backend",
    "opencl_queue",
]
