"""The numpy runtime: the CPU as one device, its BLAS named. Ops run in backends/numpy/."""
from __future__ import annotations

import os

import numpy as np

from .base import Backend, DeviceInfo


def _blas_name() -> str:
    """The BLAS numpy was built against, from its build config (no printing, no import of extras)."""
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    except (AttributeError, KeyError, TypeError):
        return "unknown BLAS"
    name, version = blas.get("name", "unknown BLAS"), blas.get("version", "")
    return f"{name} {version}".strip()


class NumpyBackend(Backend):
    name = "numpy"
    family = "numpy"

    def _enumerate(self) -> list[DeviceInfo]:
        blas = _blas_name()
        facts = {"cores": os.cpu_count(), "numpy": np.__version__, "blas": blas}
        return [DeviceInfo(self.name, 0, f"CPU (numpy {np.__version__}, {blas})", "cpu", facts)]



BACKEND = NumpyBackend()
