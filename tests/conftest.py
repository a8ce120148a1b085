"""The `target` fixture: every device of every backend; the CI rule for backends that must run.

A CPU device of OpenCL (PoCL) or Vulkan (lavapipe) runs the suite twice: with what a CPU device
gets (`conv2d_cpu_gemm` and float8 depthwise; direct shaders with subgroup shuffles) and, as
`opencl:N-gpu-kernels` / `vulkan:N-gpu-kernels`, with the kernels, tiles and shared-memory staging a
GPU gets. The second run is what proves the GPU code paths without a GPU: CUDA compiles exactly the
OpenCL GPU kernels' sources, and a GPU's Vulkan driver runs the staged shaders.
"""
import dataclasses
import functools
import os
import sys
import threading

import numpy as np
import pytest

import convbackends
from convbackends.runtime import get_backend
from convbackends.parity import check, reference_output
from convbackends.reference import conv2d_float64

# CI has PoCL and lavapipe: a skip of these there is a defect, so it fails the run instead.
REQUIRED_IN_CI = ("numpy", "opencl", "vulkan")
GPU_KERNELS = "gpu-kernels"


def _targets():
    for name, availability in convbackends.available_backends().items():
        if not availability.available:
            yield pytest.param((name, None, availability.reason, ""), id=name)
            continue
        for device in convbackends.devices(name):
            yield pytest.param((name, device.index, "", ""), id=f"{name}:{device.index}")
            if name in ("opencl", "vulkan") and device.type == "cpu":
                yield pytest.param((name, device.index, "", GPU_KERNELS), id=f"{name}:{device.index}-{GPU_KERNELS}")


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", list(_targets()), indirect=True)


def require(name: str, reason: str) -> None:
    """Skip for an unavailable backend, except in CI where the required ones must run."""
    if os.environ.get("CI") == "true" and name in REQUIRED_IN_CI:
        pytest.fail(f"backend {name!r} must be available in CI, but: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


def require_backend(name: str) -> None:
    """`require` the backend `name` unless it is available (a skip, or a failure in CI for the required ones)."""
    availability = convbackends.available_backends()[name]
    if not availability.available:
        require(name, availability.reason)


def require_module(name: str):
    """An optional package the tests need: CI's set-up installs it, so there its absence fails the run."""
    try:
        return __import__(name)
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} must be installed in CI ({exc})")
        pytest.skip(f"{name} is not installed", allow_module_level=True)


def force_gpu_kernels(monkeypatch, backend: str, device: int) -> None:
    """Make a CPU device plan its layers as a GPU would (tiles, shared/local memory, 32-bit indexing)."""
    if backend == "opencl":
        from convbackends.runtime.opencl import BACKEND

        rt = BACKEND.runtime(device)
        monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, type="gpu"))
    else:
        from convbackends.runtime import vulkan as _vk

        monkeypatch.setattr(_vk.device(device), "type", "gpu")


def cpu_device(monkeypatch, backend: str, as_gpu: bool) -> int:
    """The backend's default device, which these checks need to be a CPU device (else the test skips; an
    unavailable backend as `require` has it), planned as a GPU when `as_gpu`; its index."""
    require_backend(backend)
    device = get_backend(backend).select()
    if device.type != "cpu":
        pytest.skip("this device already plans as a GPU")
    if as_gpu:
        force_gpu_kernels(monkeypatch, backend, device.index)
    return device.index


@pytest.fixture
def target(request, monkeypatch):
    """(backend name, device index) of an available device."""
    name, index, reason, variant = request.param
    if index is None:
        require(name, reason)
    if variant == GPU_KERNELS:
        force_gpu_kernels(monkeypatch, name, index)
    return name, index


def run_threads(work, count: int) -> None:
    """work(thread index) on `count` threads started together, with the interpreter switching threads as
    often as it can (races show within a few calls); the first failure of any thread is raised here."""
    errors, start = [], threading.Barrier(count)

    def main(t: int) -> None:
        try:
            start.wait()
            work(t)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=main, args=(t,)) for t in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous)
    if errors:
        raise errors[0]


def parity_tests(cases):
    """(the parity test of an op's suite, its cached reference): every case on every target against the
    suite's reference (`parity.reference_output`: cv2.dnn, or the float64 oracle where cv2.dnn lacks the op),
    computed once per case. An op's test file binds the test to a `test_` name."""
    reference = functools.lru_cache(maxsize=None)(reference_output)

    @pytest.mark.parametrize("case", cases, ids=str)
    def test(target, case):
        backend, device = target
        result = check(case, backend, device, ref=reference(case))
        assert result.passed, f"{case}: {result.detail}"

    return test, reference


def assert_winograd_leaves_non_finite_input(layer, x, w, b, **kwargs):
    """A NaN, an inf or a finite value the transforms would overflow sends the layer to its direct
    kernels, whose outputs keep IEEE semantics: non-finite exactly where the float64 oracle has them."""
    geom = layer.geometry(x)
    assert layer._prepared.uses_winograd(x, geom)
    for value in (np.nan, np.inf, 3e37):
        bad = x.copy()
        bad[0, 5, 7, 9] = value
        assert not layer._prepared.uses_winograd(bad, geom)
        with np.errstate(invalid="ignore", over="ignore"):
            ref = conv2d_float64(bad, w, b, **kwargs)
        y = layer(bad)
        assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.array_equal(np.isinf(y), np.isinf(ref))
        finite = np.isfinite(ref)
        assert np.abs(y[finite] - ref[finite]).max() <= 1e-4 * max(1.0, np.abs(ref[finite]).max())
