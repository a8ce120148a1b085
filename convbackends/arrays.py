"""The arrays users have, in and out, decided once for every op and backend.

In: numpy arrays; a backend's own device arrays (pyopencl `Array` on opencl, CuPy `ndarray` on cuda); torch
tensors (CPU ones zero-copy through DLPack on every backend, CUDA ones zero-copy as CuPy arrays on cuda); any
other object with `__dlpack__` on the CPU. Out: the kind that came in (torch in, torch out; other DLPack
producers get numpy back). Weights (w, b) may be any of these too: they are copied to the host once, when the
layer is prepared.

A pyopencl array of another context (not the runtime's own) is read through the host and its result written
back with the array's own queue, a round trip per call; to avoid it, create arrays on the runtime's queue
(`convbackends.opencl_queue(device)`).
"""
from __future__ import annotations

import numpy as np

_DLPACK_CPU = 1  # kDLCPU in DLPack's device-type enum
_DLPACK_CUDA = 2


def _is_torch(a) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _dlpack_device(a) -> int | None:
    try:
        return int(a.__dlpack_device__()[0])
    except (AttributeError, TypeError, ValueError):
        return None


def host_array(name: str, a) -> np.ndarray:
    """A weight-like argument as a C-contiguous numpy array: a view where it already is one, else one copy."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a)
    if _is_torch(a):
        a = a.detach()
        return np.ascontiguousarray(a.numpy() if a.device.type == "cpu" else a.cpu().numpy())
    if hasattr(a, "__dlpack__") and _dlpack_device(a) == _DLPACK_CPU:
        return np.ascontiguousarray(np.from_dlpack(a))
    if hasattr(a, "get") and hasattr(a, "dtype") and hasattr(a, "shape"):  # CuPy, pyopencl: a device copy
        return np.ascontiguousarray(a.get())
    raise TypeError(f"{name} must be a numpy array, a torch tensor, a device array or a DLPack producer, "
                    f"got {type(a).__name__}")


def _same(y):
    return y


def to_backend(name: str, a, backend, device) -> tuple[object, object]:
    """(the array the backend takes, a function turning its result back into the caller's kind)."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a), _same
    adopted = backend.adopt(a, device)
    if adopted is not None:
        return adopted
    if _is_torch(a):
        return _torch_to_backend(name, a, backend, device)
    if hasattr(a, "__dlpack__"):
        kind = _dlpack_device(a)
        if kind == _DLPACK_CPU:
            return np.ascontiguousarray(np.from_dlpack(a)), _same
        if kind == _DLPACK_CUDA and backend.name == "cuda":
            import cupy

            return backend.adopt(cupy.from_dlpack(a), device)
        raise TypeError(f"{name} lives on a device backend {backend.name!r} cannot read (DLPack device type {kind}); "
                        f"use backend='cuda' for CUDA arrays, or copy it to the host")
    raise TypeError(f"{name} must be a numpy array, a torch tensor, a device array of backend {backend.name!r} or a "
                    f"DLPack producer, got {type(a).__name__}")


def _torch_to_backend(name: str, a, backend, device):
    import torch

    a = a.detach()  # convbackends computes no autograd graph (convbackends.torch wraps ops that have one)
    if a.device.type == "cpu":
        return np.ascontiguousarray(np.from_dlpack(a)), torch.from_numpy
    if a.device.type == "cuda" and backend.name == "cuda":
        import cupy

        array, _ = backend.adopt(cupy.from_dlpack(a), device)
        return array, torch.from_dlpack
    raise TypeError(f"{name} is a torch tensor on {a.device}, which backend {backend.name!r} cannot read: "
                    f"use backend='cuda' for CUDA tensors, or move it with .cpu()")
