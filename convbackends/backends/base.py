"""The one protocol every backend implements: probe the driver, list devices, prepare weights once, run many."""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..spec import Conv2dGeometry, Conv2dSpec

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


class Prepared(ABC):
    """A layer's weights repacked and uploaded for one device. `run` only binds and dispatches."""

    device: DeviceInfo

    @abstractmethod
    def run(self, x, geom: Conv2dGeometry):
        """x is a C-contiguous float32 numpy array or a device array this backend owns; same kind out."""

    def profile(self, x, geom: Conv2dGeometry) -> tuple[object, float | None]:
        """Run once and return the device-side time in seconds where the API measures it, else None."""
        return self.run(x, geom), None

    def close(self) -> None:
        """Release device memory and objects held for this layer; idempotent."""


class Backend(ABC):
    """A compute API. Subclasses live one per module and import their driver library at module level."""

    name: str

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

    def supports(self, spec: Conv2dSpec) -> str | None:
        """None when the backend runs this layer, else the reason it cannot."""
        return None

    def owns(self, x) -> bool:
        """Whether x is a device array of this backend, to be returned in the same kind."""
        return False

    @abstractmethod
    def prepare(self, spec: Conv2dSpec, w, b, device: DeviceInfo) -> Prepared:
        """Repack and upload w (O, C/g, kh, kw) and b (O,) or None, both C-contiguous float32 numpy."""
