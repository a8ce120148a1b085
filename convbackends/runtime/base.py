"""What every backend's runtime implements: probe the driver, list and select devices, recognise its device arrays.

A runtime knows no op: each op's implementation for a backend lives in `backends/<family>/<op>.py` and is
found by `backends.implementation(op, backend)`.
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

# Default device preference: a real GPU first, CPU stand-ins (PoCL, llvmpipe) last.
DEVICE_TYPE_ORDER = ("gpu", "integrated-gpu", "other", "cpu")


class BackendUnavailable(ValueError):
    """The backend's library or driver is missing. A ValueError: asking for it is a bad `backend=` value."""


@dataclass(frozen=True)
class DeviceInfo:
    """One device of one backend. `facts` holds what `convbackends devices` shows (driver, limits, memory)."""

    backend: str
    index: int
    name: str
    type: str  # one of DEVICE_TYPE_ORDER
    facts: dict = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.backend}:{self.index} {self.name} ({self.type})"


class Backend(ABC):
    """A compute API. Subclasses live one per module and import their driver library at module level.

    `family` names the folder of op implementations it runs (`backends/<family>/`): OpenCL and CUDA share
    `kernel`, as they share the kernels/ sources.
    """

    name: str
    family: str

    def __init__(self) -> None:
        self._devices: list[DeviceInfo] | None = None

    def probe(self) -> None:
        """Raise BackendUnavailable when the library imports but no driver or device answers."""
        self.devices()

    def devices(self) -> list[DeviceInfo]:
        if self._devices is None:
            found = self._enumerate()
            if not found:
                raise BackendUnavailable(f"{self.name}: the driver reports no device")
            self._devices = found
        return self._devices

    @abstractmethod
    def _enumerate(self) -> list[DeviceInfo]:
        """List devices; raise BackendUnavailable with the driver's reason on failure."""

    def select(self, device=None) -> DeviceInfo:
        """`device` is None (best by type), an index, or a case-insensitive substring of the name."""
        found = self.devices()
        listing = "; ".join(f"{d.index}: {d.name}" for d in found)
        if device is None:
            return min(found, key=lambda d: (DEVICE_TYPE_ORDER.index(d.type), d.index))
        if isinstance(device, DeviceInfo):
            device = device.index
        if isinstance(device, bool) or not isinstance(device, (numbers.Integral, str)):
            raise TypeError(f"device must be None, an int index or a name substring, got {device!r}")
        if isinstance(device, numbers.Integral):  # numpy integers too
            if not 0 <= device < len(found):
                raise ValueError(f"device {device!r} is out of range for backend {self.name!r} (devices: {listing})")
            return found[int(device)]
        for d in found:
            if device.lower() in d.name.lower():
                return d
        raise ValueError(f"device {device!r} matches no device of backend {self.name!r} (devices: {listing})")

    def owns(self, x) -> bool:
        """Whether x is a device array of this backend, to be returned in the same kind."""
        return False

    def adopt(self, x, device: DeviceInfo):
        """(x as the ops of `device` take it, a function returning results in x's kind), or None when x is
        no array of this backend. Device arrays stay on the device."""
        return (x, _same) if self.owns(x) else None


def _same(y):
    return y
