"""The `target` fixture: every device of every backend; the CI rule for backends that must run."""
import os

import pytest

import convbackends

# CI has PoCL and lavapipe: a skip of these there is a defect, so it fails the run instead.
REQUIRED_IN_CI = ("numpy", "opencl", "vulkan")


def _targets():
    for name, availability in convbackends.available_backends().items():
        if availability.available:
            for device in convbackends.devices(name):
                yield pytest.param((name, device.index, ""), id=f"{name}:{device.index}")
        else:
            yield pytest.param((name, None, availability.reason), id=name)


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        metafunc.parametrize("target", list(_targets()), indirect=True)


def require(name: str, reason: str) -> None:
    """Skip for an unavailable backend, except in CI where the required ones must run."""
    if os.environ.get("CI") == "true" and name in REQUIRED_IN_CI:
        pytest.fail(f"backend {name!r} must be available in CI, but: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


@pytest.fixture
def target(request):
    """(backend name, device index) of an available device."""
    name, index, reason = request.param
    if index is None:
        require(name, reason)
    return name, index
