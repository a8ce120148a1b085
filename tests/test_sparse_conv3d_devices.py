"""sparse_conv3d on the device backends (backends/kernel/sparse_conv3d.py, backends/vulkan/sparse_conv3d.py),
beside tests/test_sparse_conv3d.py: a layer shared between threads, NaN and inf through every activation, device
memory bounded by the active sites on a KITTI-sized grid, rulebooks over several scan blocks and with 64-bit
keys equal to the numpy backend's exactly, buffer limits refused by name, and rulebook memory given back.
Every check runs on every target, `-gpu-kernels` included (the GPU kernels and shaders on the CPU devices)."""
import dataclasses
import gc
import weakref

import numpy as np
import pytest

import convbackends as cb
from convbackends.ops.sparse_conv3d import to_host
from convbackends.parity import ACTIVATIONS, compare_sparse, lidar_sites, tolerance
from convbackends.reference import sparse_conv3d_float64

from conftest import cpu_device, run_threads

RNG = np.random.default_rng(11)


def uniform(*shape) -> np.ndarray:
    return RNG.uniform(-1, 1, shape).astype(np.float32)


def random_tensor(rng, batch, channels, grid, sites) -> cb.SparseTensor:
    """`sites` distinct sites of a (batch, *grid) volume in random order, features U(-1, 1)."""
    keys = rng.choice(batch * int(np.prod(grid)), size=sites, replace=False)
    indices = np.stack(np.unravel_index(keys, (batch, *grid)), axis=1).astype(np.int32).reshape(-1, 4)
    return cb.SparseTensor(rng.uniform(-1, 1, (sites, channels)).astype(np.float32), indices, grid, batch)


def same_rulebook(rulebook, reference) -> bool:
    """pairs() and the output sites bit for bit."""
    got, want = rulebook.pairs(), reference.pairs()
    return (all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, want))
            and np.array_equal(to_host(rulebook.out_indices), to_host(reference.out_indices)))


THREAD_W = {"subm": uniform(6, 5, 3, 3, 3), "down": uniform(7, 5, 3, 3, 3), "up": uniform(4, 7, 3, 3, 3)}
THREAD_B = uniform(6)


def test_threads_share_one_layer(target):
    """Layers called from many threads at once: rulebooks built side by side (each thread's own sites), and
    one rulebook (built before, under the key of the tensor every thread reads) swapped for its inverse by
    several threads at once; each result checked."""
    backend, device = target
    rng = np.random.default_rng(0)
    sites = [random_tensor(rng, 2, 5, (7, 8, 9), 120 + 10 * i) for i in range(4)]
    shared = random_tensor(rng, 2, 5, (7, 8, 9), 150)
    options = dict(backend=backend, device=device)
    with cb.SparseConv3d(THREAD_W["subm"], THREAD_B, subm=True, activation="relu", **options) as subm, \
            cb.SparseConv3d(THREAD_W["down"], stride=2, padding=1, indice_key="down", **options) as down, \
            cb.SparseInverseConv3d(THREAD_W["up"], indice_key="down", **options) as up:
        down(shared)
        built = shared.indice_dict["down"]

        def work(thread: int) -> None:
            for call in range(6):
                own = sites[(thread + call) % len(sites)]
                t = shared if call % 2 else cb.SparseTensor(own.features, own.indices, (7, 8, 9), 2)
                expected, ref = sparse_conv3d_float64(t.indices, t.features, THREAD_W["subm"], THREAD_B,
                                                      batch_size=2, spatial_shape=(7, 8, 9), subm=True,
                                                      activation="relu")
                result = compare_sparse(subm(t), (expected, ref))
                assert result[3], f"thread {thread} call {call}: {result[4]}"
                back = up(down(t))
                assert np.array_equal(back.indices, expected)  # the inverse is back on the sorted input sites
                assert back.features.shape == (t.num_sites, 4) and np.isfinite(to_host(back.features)).all()

        run_threads(work, 8)
    assert shared.indice_dict["down"] is built and built.swapped() is built.swapped()


def non_finite_tensor(c: int) -> cb.SparseTensor:
    """NaN, +inf and -inf at three sites of 300, the rest finite."""
    rng = np.random.default_rng(5)
    t = random_tensor(rng, 1, c, (9, 9, 9), 300)
    features = t.features.copy()
    order = np.lexsort(t.indices.T[::-1])
    for row, value in zip(order[[20, 150, 280]], (np.nan, np.inf, -np.inf)):
        features[row, row % c] = value
    return cb.SparseTensor(features, t.indices, (9, 9, 9), 1)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: a if isinstance(a, str) else str(a and a[0]))
@pytest.mark.parametrize("subm", [True, False], ids=["subm", "regular"])
def test_nan_and_inf_through_every_activation(target, activation, subm):
    """NaN and +-inf exactly where the float64 oracle has them (the outputs whose pairs read them), the rest
    within the tolerance: no output reads a tap it has no pair for."""
    backend, device = target
    t, w, b = non_finite_tensor(6), uniform(8, 6, 3, 3, 3), uniform(8)
    geometry = dict(subm=True) if subm else dict(stride=2, padding=1)
    with np.errstate(invalid="ignore", over="ignore"):
        sites, ref = sparse_conv3d_float64(t.indices, t.features, w, b, batch_size=1, spatial_shape=(9, 9, 9),
                                           activation=activation, **geometry)
    if activation is None:
        assert np.isnan(ref).any() and np.isposinf(ref).any() and np.isneginf(ref).any()
    with cb.SparseConv3d(w, b, activation=activation, backend=backend, device=device, **geometry) as layer, \
            np.errstate(invalid="ignore", over="ignore"):  # the numpy backend's BLAS meets inf - inf too
        y = layer(t)
    assert np.array_equal(y.indices, sites)
    features = to_host(y.features)
    for kind in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(kind(features), kind(ref)), f"{kind.__name__} positions differ"
    finite = np.isfinite(ref)
    assert np.abs(features[finite] - ref[finite]).max() <= tolerance(ref)


def test_rulebooks_over_many_scan_blocks_equal_numpys(target):
    """40k LiDAR-like sites in two batch elements: scans of several blocks and levels, radix passes over many
    work-items; the pairs and sites bit for bit the numpy backend's, the features within the tolerance."""
    backend, device = target
    grid = (41, 400, 352)
    indices = lidar_sites(40_000, grid, batch_size=2, seed=3)
    t = cb.SparseTensor(uniform(len(indices), 4), indices, grid, 2)
    w = uniform(5, 4, 3, 3, 3)
    for geometry in (dict(subm=True), dict(stride=2, padding=1), dict(stride=(1, 2, 2), padding=(0, 1, 1),
                                                                      dilation=(1, 2, 1))):
        with cb.SparseConv3d(w, backend="numpy", **geometry) as ref_layer, \
                cb.SparseConv3d(w, backend=backend, device=device, **geometry) as layer:
            reference, rulebook = ref_layer.rulebook(t), layer.rulebook(t)
            assert same_rulebook(rulebook, reference), geometry
            assert same_rulebook(rulebook.swapped(), reference.swapped()) if not geometry.get("subm") else True
            want, got = ref_layer(t), layer(t)
        assert np.array_equal(got.indices, want.indices)
        features, ref = to_host(got.features), to_host(want.features)
        assert np.abs(features - ref).max() <= tolerance(ref), geometry


def test_grids_past_31_bits_take_64_bit_keys(target):
    """batch * D * H * W = 2**35: keys of 64 bits (a pair of words in the shaders); the rulebook still the
    numpy backend's exactly."""
    backend, device = target
    grid = (2048, 4096, 2048)
    indices = lidar_sites(3000, grid, batch_size=2, seed=4)
    t = cb.SparseTensor(uniform(len(indices), 3), indices, grid, 2)
    w = uniform(4, 3, 3, 3, 3)
    for geometry in (dict(subm=True), dict(stride=2, padding=1)):
        with cb.SparseConv3d(w, backend="numpy", **geometry) as ref_layer, \
                cb.SparseConv3d(w, backend=backend, device=device, **geometry) as layer:
            assert same_rulebook(layer.rulebook(t), ref_layer.rulebook(t)), geometry
            want, got = ref_layer(t), layer(t)
        assert np.abs(to_host(got.features) - want.features).max() <= tolerance(want.features)


class Allocations:
    """The largest single allocation and the most bytes held at once by a device backend's allocator."""

    def __init__(self):
        self.largest = self.held = self.peak = 0

    def take(self, nbytes: int) -> None:
        self.largest = max(self.largest, nbytes)
        self.held += nbytes
        self.peak = max(self.peak, self.held)


def watch_allocations(monkeypatch, backend: str, device: int) -> Allocations:
    """Count what the backend allocates on the device (OpenCL: its pool and uploads; Vulkan: acquire)."""
    seen = Allocations()
    if backend == "opencl":
        from convbackends.runtime.opencl import BACKEND

        rt = BACKEND.runtime(device)
        for name in ("empty", "empty_array"):
            make = getattr(rt, name)

            def counted(shape, dtype=np.float32, make=make):
                seen.take(np.dtype(dtype).itemsize * int(np.prod(shape)))
                return make(shape, dtype)
            monkeypatch.setattr(rt, name, counted)
        upload = rt.upload
        monkeypatch.setattr(rt, "upload", lambda array: seen.take(array.nbytes) or upload(array))
    elif backend == "vulkan":
        from convbackends.runtime import vulkan as _vk

        dev = _vk.device(device)
        acquire = dev.acquire
        monkeypatch.setattr(dev, "acquire", lambda nbytes, host: seen.take(nbytes) or acquire(nbytes, host))
    return seen


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
@pytest.mark.parametrize("backend", ["opencl", "vulkan"])
def test_device_memory_follows_the_active_sites_not_the_grid(monkeypatch, backend, as_gpu):
    """A KITTI-sized grid (41 x 1600 x 1408 = 92M positions) with 120k LiDAR-like sites: the SubM and strided
    layers' rulebooks and compute allocate nothing near the grid's size on the device (every buffer below
    64 MiB, all of a layer's together below 256 MiB). The numpy backend's host memory: tests/test_sparse_conv3d.py
    test_cost_follows_the_active_sites_not_the_grid."""
    device = cpu_device(monkeypatch, backend, as_gpu)
    grid = (41, 1600, 1408)
    indices = lidar_sites(120_000, grid, seed=1)
    t = cb.SparseTensor(uniform(len(indices), 16), indices, grid, 1)
    for geometry in (dict(subm=True), dict(stride=2, padding=1)):
        with cb.SparseConv3d(uniform(16, 16, 3, 3, 3), backend=backend, device=device, **geometry) as layer:
            with pytest.MonkeyPatch.context() as watching:
                seen = watch_allocations(watching, backend, device)
                y = layer(t)
        assert y.num_sites >= len(indices)
        assert seen.largest < 64 << 20 and seen.peak < 256 << 20, (
            f"{geometry}: largest buffer {seen.largest / 2**20:.0f} MiB, all {seen.peak / 2**20:.0f} MiB")


def test_buffers_past_the_device_limit_are_refused_by_name(monkeypatch):
    """OpenCL's largest buffer (CL_DEVICE_MAX_MEM_ALLOC_SIZE), made small: the neighbour map and the features
    that pass it are named in the error, before anything runs."""
    from convbackends.runtime.opencl import BACKEND

    device = cpu_device(monkeypatch, "opencl", False)
    rt = BACKEND.runtime(device)
    t = random_tensor(np.random.default_rng(2), 1, 8, (20, 20, 20), 2000)
    wide, pointwise = (cb.SparseConv3d(uniform(8, 8, k, k, k), subm=True, backend="opencl", device=device)
                       for k in (3, 1))
    monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=2000 * 27 * 4 - 1))
    with pytest.raises(ValueError, match=r"opencl: the rulebook's neighbour map needs 216000 bytes, more than the "
                                         r"device's largest buffer \(CL_DEVICE_MAX_MEM_ALLOC_SIZE: 215999 bytes\)"):
        wide(t)
    monkeypatch.setattr(rt, "limits", dataclasses.replace(rt.limits, max_alloc=2000 * 8 * 4 - 1))
    with pytest.raises(ValueError, match=r"opencl: the input features need 64000 bytes, more than the device's "
                                         r"largest buffer \(CL_DEVICE_MAX_MEM_ALLOC_SIZE: 63999 bytes\)"):
        pointwise(t)


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
def test_vulkan_rulebooks_give_their_buffers_back(monkeypatch, as_gpu):
    """Vulkan buffers are pooled by hand: a rulebook, its inverse and their forms (neighbour maps, pair lists)
    go back to the device's pool when the tensors holding them are collected, and a closed layer's weights."""
    from convbackends.runtime import vulkan as _vk

    device = cpu_device(monkeypatch, "vulkan", as_gpu)
    dev = _vk.device(device)
    rng = np.random.default_rng(3)

    def network() -> None:
        t = random_tensor(rng, 2, 4, (9, 10, 11), 200)
        with cb.SparseConv3d(uniform(5, 4, 3, 3, 3), subm=True, indice_key="s", backend="vulkan",
                             device=device) as subm, \
                cb.SparseConv3d(uniform(6, 5, 3, 3, 3), stride=2, indice_key="d", backend="vulkan",
                                device=device) as down, \
                cb.SparseInverseConv3d(uniform(4, 6, 3, 3, 3), indice_key="d", backend="vulkan",
                                       device=device) as up:
            y = up(down(subm(t)))
            y.indice_dict["d"].swapped().pairs()  # the inverse's pair lists too
            assert y.num_sites == t.num_sites

    network()  # the device's rulebook builder and pipelines, made once
    gc.collect()
    before = dev.in_use_bytes
    for _ in range(3):
        network()
    gc.collect()
    assert dev.in_use_bytes == before


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
@pytest.mark.parametrize("backend", ["opencl", "vulkan"])
def test_unclosed_layers_and_their_rulebooks_are_released_when_collected(monkeypatch, backend, as_gpu):
    """Layers never closed, some only reachable through a cycle, and the tensors holding their rulebooks: once
    collected, nothing of theirs is left (Vulkan: the pool's bytes in use and the pipelines' users are back
    where they were)."""
    device = cpu_device(monkeypatch, backend, as_gpu)
    rng = np.random.default_rng(8)

    def unclosed_network(i: int) -> list:
        t = random_tensor(rng, 2, 4, (9, 10, 11), 200)
        options = dict(backend=backend, device=device)
        layers = (cb.SparseConv3d(uniform(5, 4, 3, 3, 3), subm=True, indice_key="s", activation="relu", **options),
                  cb.SparseConv3d(uniform(6, 5, 3, 3, 3), stride=2, indice_key="d", **options),
                  cb.SparseInverseConv3d(uniform(4, 6, 3, 3, 3), indice_key="d", **options))
        y = layers[2](layers[1](layers[0](t)))
        assert y.num_sites == t.num_sites
        if i % 2:
            layers[0].cycle = layers  # only the cyclic collector frees these
        rulebooks = y.indice_dict
        return [weakref.ref(layer._prepared) for layer in layers] + [
            weakref.ref(rulebooks[key].forms) for key in ("s", "d")] + [weakref.ref(rulebooks["d"].swapped().forms)]

    def held():
        if backend != "vulkan":
            return None
        from convbackends.runtime import vulkan as _vk

        dev = _vk.device(device)
        return dev.in_use_bytes, sum(p.users for p in dev._pipelines.values())

    unclosed_network(0)  # the device's rulebook builder and kernels, made once
    gc.collect()
    before = held()
    collected = [ref for i in range(4) for ref in unclosed_network(i)]
    gc.collect()
    assert not any(ref() for ref in collected)
    assert held() == before


@pytest.mark.parametrize("as_gpu", [False, True], ids=["device-kernels", "gpu-kernels"])
def test_opencl_rulebooks_read_back_only_counts_and_offsets(monkeypatch, as_gpu):
    """Device features through SubM, strided and inverse layers: every rulebook is built on the device, and all
    that comes back to the host on the way is scalars (candidate and site counts) and the pair lists' K + 1
    offsets, never sites, keys or pairs."""
    import pyopencl.array as cla

    from convbackends.runtime.opencl import BACKEND

    device = cpu_device(monkeypatch, "opencl", as_gpu)
    queue = BACKEND.runtime(device).queue
    host = random_tensor(np.random.default_rng(12), 2, 4, (9, 10, 11), 300)
    t = cb.SparseTensor(cla.to_device(queue, host.features), host.indices, host.spatial_shape, 2)
    options = dict(backend="opencl", device=device)
    w_subm, w_down, w_up = uniform(5, 4, 3, 3, 3), uniform(6, 5, 3, 3, 3), uniform(4, 6, 3, 3, 3)
    read_back = []
    get = cla.Array.get
    with pytest.MonkeyPatch.context() as watching:
        watching.setattr(cla.Array, "get", lambda self, *a, **k: read_back.append(self.size) or get(self, *a, **k))
        with cb.SparseConv3d(w_subm, subm=True, **options) as subm, \
                cb.SparseConv3d(w_down, stride=2, padding=1, indice_key="d", **options) as down, \
                cb.SparseInverseConv3d(w_up, indice_key="d", **options) as up:
            mid = down(subm(t))
            y = up(mid)
    assert read_back and max(read_back) <= 27 + 1, read_back
    sites, first = sparse_conv3d_float64(host.indices, host.features, w_subm, batch_size=2,
                                         spatial_shape=(9, 10, 11), subm=True)
    mid_sites, second = sparse_conv3d_float64(sites, first, w_down, batch_size=2, spatial_shape=(9, 10, 11),
                                              stride=2, padding=1)
    assert compare_sparse(mid, (mid_sites, second))[3]
    assert np.array_equal(y.indices, sites) and isinstance(y.features, cla.Array)
