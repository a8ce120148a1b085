"""The Vulkan runtime: embedded SPIR-V freshness, no GLSL compiler at run time, resource reuse and release,
the device limits it splits work for. The GPU (shared-memory) path runs the parity suite as
vulkan:N-gpu-kernels (conftest.py).

Numerics over the whole conv2d surface are in test_parity.py. Shapes stay small: lavapipe is slow.
"""
import gc
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_winograd_leaves_non_finite_input, cpu_device, force_gpu_kernels, require_backend
from convbackends import Conv2d, conv2d
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
    for include in ("activation.glsl", "deform_conv2d_sampling.glsl"):
        before = build.source_hashes(shaders)
        (shaders / include).write_text((shaders / include).read_text() + "\n// edited\n")
        after = build.source_hashes(shaders)
        including = {name for name in before
                     if any(path.name == include for path in build._sources(shaders / f"{name}.comp", []))}
        assert including and all(before[name] != after[name] for name in including)
        assert all(before[name] == after[name] for name in before if name not in including)


# Everything below needs a Vulkan device.
@pytest.fixture
def vulkan():
    require_backend("vulkan")
    from convbackends.runtime import vulkan as vk_runtime

    return vk_runtime, vk_runtime


def _tensors(x_shape, w_shape):
    return Case("vulkan", x_shape, w_shape).tensors()


def _assert_close(y, ref):
    passed, why = compare(y, ref)[3:]
    assert passed, why


def _vk_device(vk_runtime):
    from convbackends.runtime import get_backend

    return vk_runtime.device(get_backend("vulkan").select().index)


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


# NaN and inf through every activation: each output whose receptive field holds one of the three
# non-finite inputs sees it through exactly one non-zero weight, so the oracle and numpy give the
# IEEE limit (or inf * 0 = NaN) there. GPU max/min/clamp would drop NaN.
ACTIVATIONS = [None, "relu", "relu6", "sigmoid", "tanh", "silu", "mish", "hardswish", ("leaky_relu", 0.1),
               ("clip", -0.25, 0.5)]


def _non_finite_input(shape):
    x = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    x[:, 0, 1, 1], x[:, 0, 4, 6], x[:, 0, 7, 11] = np.nan, np.inf, -np.inf  # no 3x3 s2 field holds two
    return x


def _non_zero_weights(shape):
    rng = np.random.default_rng(2)
    return (rng.uniform(0.25, 1, shape) * rng.choice([-1, 1], shape)).astype(np.float32)


@pytest.mark.parametrize("gpu", [False, True], ids=["direct", "gpu-kernels"])
@pytest.mark.parametrize("w_shape, kwargs", [((3, 2, 3, 3), dict(stride=2, padding=1)),
                                             ((4, 1, 3, 3), dict(stride=2, padding=1, groups=2))],
                         ids=["implicit_gemm", "depthwise"])
def test_every_activation_keeps_nan_and_inf_as_numpy_does(vulkan, monkeypatch, gpu, w_shape, kwargs):
    cpu_device(monkeypatch, "vulkan", gpu)
    x, w = _non_finite_input((1, 2, 9, 13)), _non_zero_weights(w_shape)
    b = np.linspace(-0.5, 0.5, w_shape[0], dtype=np.float32)
    for activation in ACTIVATIONS:
        with np.errstate(invalid="ignore", over="ignore"):
            ref = conv2d_float64(x, w, b, activation=activation, **kwargs)
            on_numpy = conv2d(x, w, b, activation=activation, backend="numpy", **kwargs)
        assert np.isnan(ref).any() and np.isinf(ref).any() or activation in ("sigmoid", "tanh", "relu6", ACTIVATIONS[-1])
        y = conv2d(x, w, b, activation=activation, backend="vulkan", **kwargs)
        for expected in (ref, on_numpy):
            passed, why = compare(y, expected)[3:]
            assert passed, f"{activation}: {why}"


def test_the_1x1_direct_path_keeps_inf_where_channels_are_padded(vulkan, monkeypatch):
    # C = 3 is padded to a block of 8 channels with zero weights; their inputs must be zeros, not the last
    # channel's inf (0 * inf = NaN would reach every output of the pixel).
    cpu_device(monkeypatch, "vulkan", False)
    x = np.ascontiguousarray(_non_finite_input((2, 3, 9, 13))[:, ::-1])  # non-finite values in channel 2
    w = _non_zero_weights((5, 3, 1, 1))
    with np.errstate(invalid="ignore"):
        ref = conv2d_float64(x, w)
    with Conv2d(w, backend="vulkan") as layer:
        assert layer._prepared.conv.tiles.cb == 8
        _assert_close(layer(x), ref)


def test_winograd_output_transform_keeps_nan(vulkan):
    # A NaN weight makes its output channel NaN everywhere; the input stays finite, so Winograd runs.
    # Wide clip bounds: Winograd's error scales with the values before the activation.
    x, w, b = _tensors((1, 128, 24, 24), (128, 128, 3, 3))
    w[5, 7, 1, 2] = np.nan
    for activation in ("relu", ("clip", -20.0, 20.0)):
        with Conv2d(w, b, padding=1, activation=activation, backend="vulkan") as layer:
            assert layer._prepared.uses_winograd(x, layer.geometry(x))
            y = layer(x)
        with np.errstate(invalid="ignore"):
            ref = conv2d_float64(x, w, b, padding=1, activation=activation)
        assert np.isnan(ref[:, 5]).all() and not np.isnan(np.delete(ref, 5, axis=1)).any()
        _assert_close(y, ref)


def _rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc/self/status (Linux) for the resident set size")
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:")) / 1024


def test_layers_differing_only_in_activation_parameters_share_one_pipeline(vulkan):
    _, vk_runtime = vulkan
    x, w, b = _tensors((1, 16, 32, 32), (16, 16, 3, 3))
    with Conv2d(w, b, padding=1, activation=("leaky_relu", 0.5), backend="vulkan") as layer:
        layer(x)
    pipelines, rss = vk_runtime.LIVE["pipeline"], _rss_mb()
    for i in range(100):  # each had a pipeline of its own, about 6 MB on llvmpipe, never freed
        activation = ("leaky_relu", i / 100) if i % 2 else ("clip", -i / 100, i / 50)
        with Conv2d(w, b, padding=1, activation=activation, backend="vulkan") as layer:
            y = layer(x)
        if i in (37, 38):  # the parameters reach the shader
            _assert_close(y, conv2d_float64(x, w, b, padding=1, activation=activation))
    assert vk_runtime.LIVE["pipeline"] <= pipelines + 1  # the clip layers' one
    assert _rss_mb() - rss < 100


def test_pipeline_cache_is_bounded_and_keeps_the_pipelines_of_live_layers(vulkan, monkeypatch):
    _, vk_runtime = vulkan
    monkeypatch.setattr(vk_runtime, "PIPELINES_KEPT", 2)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 2, 9, 8)).astype(np.float32)
    kernels = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3)]  # a depthwise pipeline each: cheap to build
    weights = {k: np.random.default_rng(4).uniform(-1, 1, (2, 1, *k)).astype(np.float32) for k in kernels}
    live = Conv2d(np.ones((2, 1, 2, 2), np.float32), groups=2, backend="vulkan")
    for kernel in kernels:  # the first two may stay cached from an earlier test
        conv2d(x, weights[kernel], groups=2, backend="vulkan")
    kept = vk_runtime.LIVE["pipeline"]
    for kernel in kernels:  # built once more and released: the cache stays at live + 2 unused
        assert conv2d(x, weights[kernel], groups=2, backend="vulkan").shape
        assert vk_runtime.LIVE["pipeline"] <= kept
    dev, pipeline = live._prepared.dev, live._prepared.conv.pipeline
    assert len([p for p in dev._pipelines.values() if p.users == 0]) == 2 and pipeline.users == 1
    _assert_close(live(x), conv2d_float64(x, np.ones((2, 1, 2, 2), np.float32), groups=2))
    live.close()
    assert pipeline.users == 0 and len([p for p in dev._pipelines.values() if p.users == 0]) == 2


def _live_per_layer(vk_runtime) -> dict:
    return {k: vk_runtime.LIVE[k] for k in ("descriptor_set", "command_buffer", "query_pool")}


def test_unclosed_layers_release_their_device_memory_when_collected(vulkan):
    _, vk_runtime = vulkan
    x = np.random.default_rng(5).uniform(-1, 1, (1, 256, 8, 8)).astype(np.float32)
    w = np.random.default_rng(6).uniform(-1, 1, (256, 256, 3, 3)).astype(np.float32)

    def unclosed_layer(i: int):
        layer = Conv2d(w, padding=1, backend="vulkan")  # direct and Winograd weights: 12 MB
        layer(x)
        if i % 2:
            layer.cycle = layer  # only the cyclic collector frees this one
        return weakref.ref(layer._prepared)

    gc.collect()
    dev = _vk_device(vk_runtime)
    in_use, handles = dev.in_use_bytes, _live_per_layer(vk_runtime)
    unclosed_layer(0)
    gc.collect()
    rss = _rss_mb()
    collected = [unclosed_layer(i) for i in range(12)]  # kept 144 MB more before layers had finalizers
    gc.collect()
    assert not any(ref() for ref in collected)
    assert (dev.in_use_bytes, _live_per_layer(vk_runtime)) == (in_use, handles)
    assert _rss_mb() - rss < 100


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_buffers_taken_zeroed_from_the_pool_hold_none_of_their_last_users_data(vulkan, host):
    """Plans take their buffers zeroed: a pooled buffer's old bits in a part a plan reads but never writes (the
    deform GEMM's columns past the last point) once ran llvmpipe's GEMM 30x slower (denormals)."""
    _, vk_runtime = vulkan
    dev = vk_runtime.device(0)
    size = 3 << 16
    staging = dev.acquire(size, True)
    poison = np.full(size // 4, np.nan, np.float32)
    poison[::2] = np.float32(1e-40)  # a denormal
    buf = dev.acquire(size, host)
    if host:
        buf.write(poison)
    else:
        staging.write(poison)
        vk_runtime.Recording.once(dev, copies_in=[(staging, buf)])
    dev.release(buf)
    again = dev.acquire(size, host, zeroed=True)
    assert again is buf  # the pooled buffer itself
    if not host:
        vk_runtime.Recording.once(dev, copies_out=[(staging, again)])
    held = (again if host else staging).read(size // 4)
    dev.release(again)
    dev.release(staging)
    assert not held.view(np.uint32).any()


def test_a_layer_collected_inside_the_device_lock_is_released_at_the_next_submission(vulkan):
    _, vk_runtime = vulkan
    x, w, b = _tensors((1, 4, 8, 8), (4, 4, 3, 3))
    other = Conv2d(w, b, padding=1, backend="vulkan")
    other(x)
    dev = other._prepared.dev
    in_use = dev.in_use_bytes
    layer = Conv2d(w, b, padding=1, backend="vulkan")
    layer(x)
    with dev.lock:  # as if the collector ran the finalizer halfway through a pool update
        del layer
        assert dev.in_use_bytes > in_use
    _assert_close(other(x), conv2d_float64(x, w, b, padding=1))
    assert dev.in_use_bytes == in_use
    other.close()


def test_extreme_strides_and_kernels_build_in_seconds(vulkan):
    # Unrolled, these took 23 s (3x3 at stride 3000) to more than 90 s (31x31) to build on llvmpipe. In a
    # process of its own with Mesa's shader cache off, so that the build is really measured.
    script = textwrap.dedent("""
        import json, time, numpy as np, convbackends
        from convbackends.runtime import get_backend
        from convbackends.runtime import vulkan as _vk
        from convbackends.reference import conv2d_float64
        dev = _vk.device(get_backend("vulkan").select().index)
        rng = np.random.default_rng(0)
        results = []
        for kind in (dev.type, "gpu"):
            dev.type = kind  # the second round plans as a GPU (conftest.force_gpu_kernels)
            for x_shape, w_shape, kwargs in [((1, 3, 16, 16), (4, 3, 3, 3), dict(stride=10000, padding=1)),
                                             ((1, 3, 32, 32), (4, 3, 31, 31), {}),
                                             ((1, 3, 32, 32), (3, 1, 31, 31), dict(padding=15, groups=3))]:
                x = rng.uniform(-1, 1, x_shape).astype(np.float32)
                w = rng.uniform(-1, 1, w_shape).astype(np.float32)
                start = time.perf_counter()
                y = convbackends.conv2d(x, w, backend="vulkan", **kwargs)
                seconds = time.perf_counter() - start
                ref = conv2d_float64(x, w, **kwargs)
                results.append([kind, w_shape, kwargs.get("stride", 1), seconds,
                                float(np.abs(y - ref).max()), float(np.abs(ref).max())])
        print(json.dumps(results))
    """)
    env = {**os.environ, "MESA_SHADER_CACHE_DISABLE": "true"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for kind, w_shape, stride, seconds, err, ref_max in json.loads(done.stdout):
        assert seconds < 5, f"{kind}: w {w_shape} stride {stride} took {seconds:.1f} s"
        assert err <= 1e-4 * max(1.0, ref_max), f"{kind}: w {w_shape} stride {stride}: max abs error {err:.3g}"


def test_winograd_falls_back_to_the_direct_path_where_its_buffers_pass_the_limits(vulkan, monkeypatch):
    backend, vk_runtime = vulkan
    cpu_device(monkeypatch, "vulkan", False)
    limits = _vk_device(vk_runtime).limits
    x, w, b = _tensors((1, 128, 24, 24), (128, 128, 3, 3))
    ref = conv2d_float64(x, w, b, padding=1)
    # One image's V is 36 x 128 x (36 tiles + 8) floats (811 kB); x and y are below 400 kB.
    monkeypatch.setattr(limits, "maxStorageBufferRange", 400_000)
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        assert layer._prepared.winograd is not None
        assert not layer._prepared.uses_winograd(x, layer.geometry(x))
        _assert_close(layer(x), ref)
        limits.maxStorageBufferRange = 200_000  # below y's 307 kB too: refused, naming y and the limit
        with pytest.raises(ValueError, match=r"one image of the output \(307200 bytes\) exceeds the device's "
                                             r"maxStorageBufferRange \(200000 bytes\)"):
            layer(np.zeros((1, 128, 24, 25), np.float32))
    monkeypatch.undo()
    cpu_device(monkeypatch, "vulkan", False)
    # The 36 GEMMs' weights (590k floats) pass the texel limit, the direct weights (148k) do not; no
    # buffer made here is above the limit, so no texel view is cut short.
    monkeypatch.setattr(limits, "maxTexelBufferElements", 300_000)
    with Conv2d(w, b, padding=1, backend="vulkan") as layer:
        assert layer._prepared.winograd is None
        _assert_close(layer(x), ref)


def test_one_shot_conv2d_checks_x_before_the_backend_prepares(vulkan, monkeypatch):
    from convbackends.backends.vulkan import conv2d as implementation

    def prepare(*args):
        raise AssertionError("prepared before x was checked")

    monkeypatch.setattr(implementation, "prepare", prepare)
    w = np.ones((4, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"output size \(0, 0\) is below 1"):
        conv2d(np.ones((1, 3, 4, 4), np.float32), w, backend="vulkan")
    with pytest.raises(ValueError, match="x has 2 channels but w expects 3"):
        conv2d(np.ones((1, 2, 8, 8), np.float32), w, backend="vulkan")
