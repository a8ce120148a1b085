"""The sparse suite of `convbackends bench` (and of benchmarks/bench_sparse_conv3d.py): issue 12's four LiDAR
layers, their tensors, their check, and how a sparse layer is timed.

Sites come from `parity.lidar_sites` (a seeded ground plane, boxes and poles, thinning out with range), never from
uniform noise. A layer is timed three ways, the calls taking turns (`side_by_side`): "rulebook" builds its
rulebook from the sites and waits for the device; "compute" runs the layer on a tensor that holds its rulebook
(gather -> GEMM -> scatter only); "layer" is a whole call on a fresh tensor (rulebook included, what spconv's
forward does). The check: float64 over the numpy backend's rulebook (tests/test_sparse_conv3d.py checks that
rulebook against the dense definition); the grids are too large for cv2.dnn's dense conv3d.
"""
from __future__ import annotations

import functools
import statistics
import time

import numpy as np

from .ops.sparse_conv3d import SparseConv3d, SparseConv3dSpec, SparseTensor
from .parity import Case, compare_sparse, lidar_sites
from .reference import activation_float64
from .runtime import get_backend
from .spec import Activation



def _layer(name: str, sites: int, grid, c: int, o: int, **kwargs) -> Case:
    return Case(name, (1, c, *grid), (o, c, 3, 3, 3), True, kwargs, 0, "sparse_conv3d", sites=sites)


def suite() -> list[Case]:
    """Issue 12's benchmark layers: SECOND/CenterPoint-sized SubM and strided 3x3x3 layers."""
    return [
        _layer("subm3-16-16-20k", 20_000, (41, 400, 352), 16, 16, subm=True),
        _layer("subm3-32-32-60k", 60_000, (41, 800, 704), 32, 32, subm=True),
        _layer("conv3s2-16-32-20k", 20_000, (41, 400, 352), 16, 32, stride=2, padding=1),
        _layer("subm3-64-64-8k", 8_000, (11, 200, 176), 64, 64, subm=True),
    ]


def tensors(case: Case) -> tuple[SparseTensor, np.ndarray, np.ndarray | None]:
    """The case's input (LiDAR-like sites, sorted; features U(-1, 1)), w and b, seeded."""
    rng = np.random.default_rng(case.seed)
    batch, channels, *grid = case.x_shape
    indices = lidar_sites(case.sites, grid, batch_size=batch, seed=case.seed)
    features = rng.uniform(-1, 1, (len(indices), channels)).astype(np.float32)
    w = rng.uniform(-1, 1, case.w_shape).astype(np.float32)
    b = rng.uniform(-1, 1, case.out_channels).astype(np.float32) if case.bias else None
    return SparseTensor(features, indices, grid, batch), w, b


@functools.lru_cache(maxsize=4)
def _numpy_rulebook(case: Case):
    t, w, b = tensors(case)
    with SparseConv3d(w, b, backend="numpy", **case.kwargs) as layer:
        return layer.rulebook(t)


def float64_output(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(output sites, features float64): bias + the sum over taps of x[in_rows] W_t at out_rows, then the
    activation, over the numpy backend's rulebook."""
    t, w, b = tensors(case)
    rulebook = _numpy_rulebook(case)
    offsets, in_rows, out_rows = rulebook.pairs()
    o, c = w.shape[:2]
    taps = w.astype(np.float64).reshape(o, c, -1)
    x = t.features.astype(np.float64)
    y = np.zeros((rulebook.n_out, o)) + (0.0 if b is None else b.astype(np.float64))
    for tap in range(taps.shape[2]):
        lo, hi = offsets[tap], offsets[tap + 1]
        y[out_rows[lo:hi]] += x[in_rows[lo:hi]] @ taps[:, :, tap].T  # each output row once per tap
    activation = Activation.parse(case.kwargs.get("activation"))
    return rulebook.out_indices, activation_float64(y, activation)


def layer_info(case: Case) -> dict:
    """What the report says of a sparse layer; flops: 2 x pairs x C x O, the GEMMs' useful work."""
    rulebook = _numpy_rulebook(case)
    spec = SparseConv3dSpec.create(np.empty(case.w_shape, np.float32), **case.kwargs)
    pairs = int(rulebook.pairs()[0][-1])
    kind = "subm" if spec.subm else f"regular s{'x'.join(map(str, spec.stride))}"
    return {"name": case.name, "op": case.op,
            "spec": f"{kind} {'x'.join(map(str, spec.kernel))} {spec.in_channels}->{spec.out_channels}, "
                    f"{case.sites} sites in {'x'.join(map(str, case.x_shape[2:]))}",
            "input_shape": list(case.x_shape), "sites": case.sites, "output_sites": rulebook.n_out, "pairs": pairs,
            "kernel": list(spec.kernel), "stride": list(spec.stride), "padding": list(spec.padding),
            "dilation": list(spec.dilation), "subm": spec.subm,
            "flops": 2 * pairs * spec.in_channels * spec.out_channels}


def side_by_side(calls: dict, repeats: int, warmup: int = 1) -> dict[str, tuple[list[float], list[float]]]:
    """Each call's wall-clock and CPU seconds (all threads of this process) per repeat, after `warmup` rounds;
    the calls take turns, so that on a shared machine every one meets the same load."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples = {name: ([], []) for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name][0].append(time.perf_counter() - start)
            samples[name][1].append(time.process_time() - start_cpu)
    return samples


def medians(samples: dict) -> dict[str, tuple[float, float]]:
    """(median wall, median CPU seconds) per call of side_by_side's samples."""
    return {name: (statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in samples.items()}


def _finisher(backend: str, index: int):
    """What waits for a backend's queued work: OpenCL and CUDA queue it; numpy and Vulkan return when done."""
    chosen = get_backend(backend)
    return chosen.runtime(index).finish if chosen.family == "kernel" else (lambda: None)


def _fresh(t: SparseTensor) -> SparseTensor:
    """t's sites and features with no rulebook kept (already validated and sorted: nothing to redo)."""
    return SparseTensor._from_layer(t.features, t._indices, t.spatial_shape, t.batch_size, {})


class BackendCalls:
    """A sparse layer on one convbackends device and the calls to time: rulebook, compute, layer."""

    def __init__(self, case: Case, backend: str, index: int, t: SparseTensor, w, b):
        # t keeps the rulebook under a key of this device's, so the devices of one run may share t.
        self.layer = SparseConv3d(w, b, indice_key=f"bench-{backend}:{index}", backend=backend, device=index,
                                  **case.kwargs)
        self.t, self.finish, self.device_seconds = t, _finisher(backend, index), []

    def cold(self) -> SparseTensor:
        """The first call: builds and keeps t's rulebook (compute() reuses it)."""
        return self.layer(self.t)

    def rulebook(self) -> None:
        self.layer.rulebook(_fresh(self.t))
        self.finish()

    def compute(self) -> None:
        _, seconds = self.layer.profile(self.t)
        if seconds is not None:
            self.device_seconds.append(seconds)

    def whole(self) -> None:
        self.layer(_fresh(self.t))

    def calls(self, prefix: str = "") -> dict:
        return {f"{prefix}rulebook": self.rulebook, f"{prefix}compute": self.compute, f"{prefix}layer": self.whole}

    def close(self) -> None:
        self.layer.close()


def measure(case: Case, target, warmup: int, repeats: int) -> dict:
    """One (sparse layer, target) measurement: the fields of bench.Record. Backends: rulebook, compute and
    whole-layer medians (median_s is the whole layer's); peers (spconv): whole calls only, their output put in
    site order (`in_site_order`) for the check, outside the timing."""
    t, w, b = tensors(case)
    ref = float64_output(case)
    start = time.perf_counter()
    if target.kind == "backend":
        runner = BackendCalls(case, target.backend, target.index, t, w, b)
        y = runner.cold()
        calls = runner.calls()
    else:
        runner = target.prepare(case, w, b)
        y = runner.in_site_order(runner.profile(t)[0])
        calls = {"layer": lambda: runner.profile(t)}
    cold = time.perf_counter() - start
    try:
        max_abs, mean_abs, tol, passed, detail = compare_sparse(y, ref)
        times = side_by_side(calls, repeats, warmup)
    finally:
        runner.close()
    wall = times["layer"][0]
    found = {name: statistics.median(samples[0]) for name, samples in times.items()}
    device = getattr(runner, "device_seconds", None)
    return dict(reason=detail, cold_s=cold, median_s=found["layer"], min_s=min(wall),
                device_s=statistics.median(device) if device else None, rulebook_s=found.get("rulebook"),
                compute_s=found.get("compute"), max_abs_err=max_abs, mean_abs_err=mean_abs, tol=tol, passed=passed)

