"""The runtimes, one module per backend, imported on first use: `import convbackends` loads no GPU library."""
from __future__ import annotations

import ctypes
import importlib
import re
from dataclasses import dataclass
from importlib import metadata

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
            _loaded[name] = BackendUnavailable(_with_hint(name, str(exc), exc))
        except Exception as exc:  # noqa: BLE001 - a driver's failure must not crash discovery
            # Mostly a missing Python package or shared library (libOpenCL, libvulkan, libcuda);
            # whatever it is, the backend is unusable and the reason is shown (CI fails on it).
            _loaded[name] = BackendUnavailable(_with_hint(name, f"{type(exc).__name__}: {exc}", exc))
    return _loaded[name]


# What a backend needs beyond its Python package, by backend.
DRIVER_HINTS = {
    "opencl": "install an OpenCL driver: the GPU vendor's, or PoCL for the CPU (Debian: apt install pocl-opencl-icd)",
    "vulkan": "install the Vulkan loader and a driver (Debian: apt install libvulkan1 mesa-vulkan-drivers)",
}


def _with_hint(name: str, reason: str, exc: Exception) -> str:
    """The reason a backend is unavailable, followed by what to install, when that is known."""
    if name == "cuda":
        hint = cuda_hint(_cupy_wheels(), cuda_driver_version(), isinstance(exc, ModuleNotFoundError))
    elif isinstance(exc, ModuleNotFoundError):
        hint = f"pip install 'convbackends[{name}]'"
    else:
        hint = DRIVER_HINTS.get(name, "")
    return f"{reason}; {hint}" if hint else reason


def cuda_driver_version() -> tuple[int, int] | None:
    """The newest CUDA version the NVIDIA driver supports, asked of libcuda itself; None without a driver."""
    for library in ("libcuda.so.1", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value:
            return version.value // 1000, version.value % 1000 // 10
    return None


def _cupy_wheels() -> list[str]:
    """The installed distributions that provide the `cupy` package (cupy-cuda12x, cupy-cuda13x, ...)."""
    return sorted(metadata.packages_distributions().get("cupy", []))


def cuda_hint(wheels: list[str], driver: tuple[int, int] | None, cupy_missing: bool) -> str:
    """What to install for the CUDA backend: the CuPy wheel of the driver's CUDA major version, one only."""
    extras = "'convbackends[cuda12]' or 'convbackends[cuda13]'"
    if driver is None:
        if cupy_missing:
            return f"on a machine with an NVIDIA GPU: pip install {extras}, matching the CUDA version nvidia-smi shows"
        return "no NVIDIA driver found (libcuda.so.1): the cuda backend needs an NVIDIA GPU and its driver"
    major, minor = driver
    if major not in (12, 13):
        return f"the NVIDIA driver supports CUDA {major}.{minor}, CuPy wheels here need 12 or 13 ({extras})"
    install = f"pip install 'convbackends[cuda{major}]'"
    if len(wheels) > 1:
        return (f"{' and '.join(wheels)} are both installed and overwrite each other's cupy; the driver supports "
                f"CUDA {major}.{minor}: pip uninstall -y {' '.join(wheels)} && {install}")
    if cupy_missing:
        return install
    # A CuPy built for a newer CUDA than the driver's cannot start; an older one can.
    built_for = re.fullmatch(r"cupy-cuda(\d+)x", wheels[0]) if wheels else None
    if built_for and int(built_for[1]) > major:
        return (f"{wheels[0]} needs a CUDA {built_for[1]} driver, this one supports CUDA {major}.{minor}: "
                f"pip uninstall -y {wheels[0]} && {install}")
    return ""


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
