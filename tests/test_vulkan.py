"""The Vulkan runtime: embedded SPIR-V freshness, no GLSL compiler at run time, resource reuse and release,
the device limits it splits work for. The GPU (shared-memory) path runs the parity suite as
vulkan:N-gpu-kernels (conftest.py).

Numerics over the whole conv2d surface are in test_parity.py. Shapes stay small: lavapipe is slow.
"""
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_winograd_leaves_non_finite_input, cpu_device, force_gpu_kernels, require
from convbackends import Conv2d, available_backends
from convbackends.backends.vulkan import spirv as vulkan_spirv
from convbackends.parity import Case, compare
from convbackends.reference import conv2d_float64

ROOT = Path(__file__).resolve().parent.parent
SPIRV_MAGIC = 0x07230203


def _build_spirv_module():
    spec = importlib.util.spec_from_file_location("build_spirv", ROOT / "tools" / "build_spirv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_embedded_spirv_matches_the_shader_sources():
    hashes = _build_spirv_module().source_hashes()
    assert hashes == vulkan_spirv.SOURCE_SHA256, "shaders/ changed: run `python tools/build_spirv.py`"
    assert set(vulkan_spirv.SPIRV) == set(hashes)
    for blob in vulkan_spirv.SPIRV.values():
        assert len(blob) % 4 == 0 and int.from_bytes(blob[:4], "little") == SPIRV_MAGIC


def test_source_hash_covers_includes(tmp_path):
    build = _build_spirv_module()
    shaders = tmp_path / "shaders"
    shutil.copytree(ROOT / "shaders", shaders)
    before = build.source_hashes(shaders)
    (shaders / "activation.glsl").write_text((shaders / "activation.glsl").read_text() + "\n// edited\n")
    after = build.source_hashes(shaders)
    including = {name for name in before
                 if any(path.name == "activation.glsl" for path in build._sources(shaders / f"{name}.comp", []))}
    assert including and all(before[name] != after[name] for name in including)
    assert all(before[name] == after[name] for name in before if name not in including)  # the rulebook's


# Everything below needs a Vulkan device.
@pytest.fixture
def vulkan():
    availability = available_backends()["vulkan"]
    if not availability.available:
        require("vulkan", availability.reason)
    from convbackends.runtime import vulkan as vk_runtime

    return vk_runtime, vk_runtime


def _tensors(x_shape, w_shape):
    return Case("vulkan", x_shape, w_shape).tensors()


def _assert_close(y, ref):
    passed, why = compare(y, ref)[3:]
    assert passed, why


def test_runs_from_a_copy_of_the_package_without_a_glsl_compiler(vulkan, tmp_path):
    # Only the package itself (no shaders/, no tools/) and a PATH without glslc or glslangValidator.
    shutil.copytree(ROOT / "convbackends", tmp_path / "convbackends",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any(os.path.exists(os.path.join(d, tool)) for tool in ("glslc", "glslangValidator"))]
    script = textwrap.dedent("""
        import shutil, numpy as np
        assert shutil.which("glslc") is None and shutil.which("glslangValidator") is None
        import convbackends
        assert convbackends.__file__.startswith(%r)
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (2, 3, 7, 6)).astype(np.float32)
        w = rng.uniform(-1, 1, (5, 3, 3, 3)).astype(np.float32)
        y = convbackends.conv2d(x, w, padding=1, activation="relu", backend="vulkan")
        xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        ref = sum(np.einsum("nchw,oc->nohw", xp[:, :, r:r + 7, s:s + 6], w[:, :, r, s].astype(np.float64))
                  for r in range(3) for s in range(3))
        assert np.abs(y - np.maximum(ref, 0)).max() < 1e-4, np.abs(y - np.maximum(ref, 0)).max()
        print("ok")
    """ % str(tmp_path))
    env = {**os.environ, "PATH": os.pathsep.join(path), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_devices_report_their_facts(vulkan):
    backend, _ = vulkan
    for device in backend.BACKEND.devices():
        assert device.type in ("gpu", "integrated-gpu", "cpu", "other")
        for fact in ("driver_version", "api_version", "vendor_id", "max_compute_work_group_count",
                     "max_compute_work_group_size", "max_compute_work_group_invocations",
                     "max_compute_shared_memory_size", "max_storage_buffer_range", "memory_heaps_bytes"):
            assert fact in device.facts


def test_missing_driver_is_reported_unavailable(vulkan, monkeypatch):
    backend, vk_runtime = vulkan
    import vulkan as vk

    def no_driver():
        raise vk.VkErrorInitializationFailed()

    monkeypatch.setattr(vk_runtime, "physical_devices", no_driver)
    with pytest.raises(backend.BackendUnavailable, match="no usable driver"):
        backend.VulkanBackend().probe()


def test_many_calls_with_varying_shapes_reuse_memory_and_handles(vulkan):
    _, vk_runtime = vulkan
    x, w, b = _tensors((1, 4, 9, 9), (6, 4, 3, 3))
    shapes = [(n, 4, h, h + 1) for n in (1, 2) for h in (5, 6, 7, 8)]  # more shapes than plans kept
    inputs = [np.random.default_rng(i).uniform(-1, 1, s).astype(np.float32) for i, s in enumerate(shapes)]
    live_before = dict(vk_runtime.LIVE)
    with Conv2d(w, b, padding=1, activation="silu", backend="vulkan") as layer:
        dev = layer._prepared.dev
        for xi in inputs * 2:  # warm up: every plan built once, buffers in the pool
            layer(xi)
        warm = dict(vk_runtime.LIVE), dev.pool_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(1000):
            y = layer(inputs[i % len(inputs)])
        assert (dict(vk_runtime.LIVE), dev.pool_bytes) == warm[:2]
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - warm[2] < 20_000  # KiB
        _assert_close(y, conv2d_float64(inputs[999 % len(inputs)], w, b, padding=1, activation="silu"))
        in_use = dev.in_use_bytes
    assert dev.in_use_bytes < in_use
    # Pipelines stay cached on the device for the next layer; what a layer records is released.
    per_layer = ("descriptor_set", "command_buffer", "query_pool")
    assert {k: vk_runtime.LIVE[k] for k in per_layer} == {k: live_before.get(k, 0) for k in per_layer}


def test_close_is_idempotent_and_a_closed_layer_refuses_work(vulkan):
    x, w, b = _tensors((1, 3, 5, 5), (4, 3, 1, 1))
    layer = Conv2d(w, b, backend="vulkan")
    prepared = layer._prepared
    layer(x)
    layer.close()
    layer.close()
    prepared.close()
    with pytest.raises(ValueError, match="closed"):
        layer(x)
    with pytest.raises(ValueError, match="closed"):
        prepared.run(x, layer.spec.geometry(x.shape))


def test_shutdown_destroys_every_handle_even_with_layers_open(vulkan):
    # What atexit runs; in a subprocess, since it ends this process's devices.
    script = textwrap.dedent("""
        import numpy as np, convbackends
        from convbackends.runtime import vulkan as _vk
        x = np.ones((1, 3, 8, 8), np.float32)
        layers = [convbackends.Conv2d(np.ones((4, 3, k, k), np.float32), backend="vulkan") for k in (1, 3)]
        for layer in layers:
            layer(x)
        assert _vk.LIVE["device"] == 1 and _vk.LIVE["pipeline"] == 2
        _vk.shutdown()
        assert not any(_vk.LIVE.values()), dict(_vk.LIVE)
        layers[0].close()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_profile_reports_device_time(vulkan):
    x, w, b = _tensors((1, 8, 12, 12), (8, 8, 3, 3))
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        y, seconds = layer.profile(x)
    _assert_close(y, conv2d_float64(x, w, b, padding=1))
    if layer.device.facts["timestamp_period_ns"]:
        assert seconds is not None and 0 < seconds < 10


# The limits struct is the cached device's own copy: tests shrink a limit and restore it.
def test_work_group_counts_above_the_limit_are_split(vulkan):
    backend, vk_runtime = vulkan
    dev = vk_runtime.device(backend.BACKEND.select().index)
    x, w, b = _tensors((3, 6, 19, 17), (8, 6, 3, 3))
    original = list(dev.limits.maxComputeWorkGroupCount)
    try:
        dev.limits.maxComputeWorkGroupCount[0:3] = [2, 1, 2]
        with Conv2d(w, b, padding=(1, 0, 2, 1), stride=2, backend="vulkan") as layer:
            _assert_close(layer(x), conv2d_float64(x, w, b, padding=(1, 0, 2, 1), stride=2))
    finally:
        dev.limits.maxComputeWorkGroupCount[0:3] = original


def test_batches_above_the_buffer_limits_are_split_or_refused(vulkan, monkeypatch):
    backend, vk_runtime = vulkan
    limits = vk_runtime.device(backend.BACKEND.select().index).limits
    x, w, b = _tensors((3, 4, 8, 8), (5, 4, 3, 3))
    monkeypatch.setattr(limits, "maxStorageBufferRange", 4 * 5 * 8 * 8 + 16)  # one output image per buffer
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        _assert_close(layer(x), conv2d_float64(x, w, b, padding=1))
        limits.maxStorageBufferRange = 64
        with pytest.raises(ValueError, match="maxStorageBufferRange"):
            layer(np.zeros((1, 4, 9, 9), np.float32))


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("w_shape, kwargs", [((6, 5, 3, 3), dict(padding=1)), ((6, 5, 1, 1), {})], ids=["3x3", "1x1"])
def test_gpu_kernels_variant_takes_the_staged_path(vulkan, monkeypatch, gpu, w_shape, kwargs):
    # The parity suite's vulkan:N-gpu-kernels target must run the shared-memory shaders a GPU runs.
    cpu_device(monkeypatch, "vulkan", gpu)
    x, w, b = _tensors((2, 5, 9, 7), w_shape)
    with Conv2d(w, b, backend="vulkan", **kwargs) as layer:
        assert layer._prepared.conv.tiles.stage == gpu
        _assert_close(layer(x), conv2d_float64(x, w, b, **kwargs))


WINOGRAD_CASES = [
    dict(x=(1, 128, 28, 24), w=(128, 128, 3, 3), kw=dict(padding=1, activation="relu")),  # OW % 4 == 0: vec4 rows
    dict(x=(2, 128, 13, 18), w=(130, 128, 3, 3), kw=dict(padding=(1, 0, 2, 1), activation="silu")),  # ragged tiles
    dict(x=(3, 130, 11, 13), w=(128, 130, 3, 3), kw=dict(padding="same")),  # 3 images' tiles in one GEMM row
]


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: f"x{c['x']}-w{c['w']}")
def test_winograd_matches_float64(vulkan, monkeypatch, gpu, case):
    backend, vk_runtime = vulkan
    if gpu:
        force_gpu_kernels(monkeypatch, "vulkan", backend.BACKEND.select().index)
    x, w, b = _tensors(case["x"], case["w"])
    with Conv2d(w, b, backend="vulkan", **case["kw"]) as layer:
        assert layer._prepared.uses_winograd(x, layer.geometry(x))
        assert layer._prepared.winograd.gemm.tiles.stage == (gpu or backend.BACKEND.select().type != "cpu")
        _assert_close(layer(x), conv2d_float64(x, w, b, **case["kw"]))


def test_winograd_layer_takes_the_direct_shader_for_non_finite_or_huge_input(vulkan):
    x, w, b = _tensors((1, 128, 24, 24), (128, 128, 3, 3))
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        assert_winograd_leaves_non_finite_input(layer, x, w, b, padding=1)


def test_winograd_batches_above_the_buffer_limits_are_split(vulkan, monkeypatch):
    backend, vk_runtime = vulkan
    limits = vk_runtime.device(backend.BACKEND.select().index).limits
    x, w, b = _tensors((3, 128, 16, 16), (128, 128, 3, 3))
    monkeypatch.setattr(limits, "maxStorageBufferRange", 4 * 36 * 128 * (16 + 8))  # one image's tiles per buffer
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        geom = layer.geometry(x)
        assert layer._prepared.uses_winograd(x, geom)
        _assert_close(layer(x), conv2d_float64(x, w, b, padding=1))
        assert len(layer._prepared._plan(geom, True).chunks) == 3
