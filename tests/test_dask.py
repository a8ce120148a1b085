"""convbackends.dask (conv2d and conv_transpose2d over chunked dask arrays) and the fleet benchmark
(convbackends.fleet, `bench --scheduler/--local-cluster`), on embedded clusters bound to 127.0.0.1 or in-process."""
import json
import os
import signal

import numpy as np
import pytest

from conftest import require, require_module

dask = require_module("dask")
distributed = require_module("distributed")

import dask.array as da  # noqa: E402

import convbackends  # noqa: E402
import convbackends.dask as cbd  # noqa: E402
from convbackends import fleet  # noqa: E402
from convbackends.__main__ import main  # noqa: E402
from convbackends.parity import tolerance  # noqa: E402
from convbackends.reference import conv2d_float64, conv_transpose2d_float64, deform_conv2d_float64  # noqa: E402

# (id, x shape, x chunks, w shape, keywords). Chunks are uneven along N, H and W; some cut C, some are
# smaller than the halo or off the stride grid.
CONV2D_CASES = [
    ("k1", (2, 4, 37, 29), ((1, 1), 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 1, 1), {}),
    ("k2s2", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 2, 2), {"stride": 2}),
    ("k3p1", (2, 4, 37, 29), ((1, 1), 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3), {"padding": 1}),
    ("k3s2p1", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3), {"stride": 2, "padding": 1}),
    ("k3s3-asym", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3),
     {"stride": 3, "padding": (0, 1, 2, 0)}),
    ("k4s2-same", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 4, 4), {"stride": 2, "padding": "same"}),
    ("k5d2p4", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 5, 5), {"dilation": 2, "padding": 4}),
    ("k5s3-same", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 5, 5), {"stride": 3, "padding": "same"}),
    ("k6-same", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 6, 6), {"padding": "same"}),
    ("k7s2p3-relu", (1, 3, 37, 29), (1, 3, (10, 1, 14, 12), (7, 13, 9)), (8, 3, 7, 7),
     {"stride": 2, "padding": 3, "activation": "relu"}),
    ("k7-valid-rect", (1, 4, 37, 29), (1, 4, (3, 2, 2, 30), (2, 2, 25)), (6, 4, 7, 5), {"padding": "valid"}),
    ("k3d3s2-same", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3),
     {"stride": 2, "dilation": 3, "padding": "same"}),
    ("g2", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    ("dw-m2-s2", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (8, 1, 3, 3),
     {"groups": 4, "stride": 2, "padding": 1, "activation": ("leaky_relu", 0.1)}),
    ("c-chunked", (2, 6, 37, 29), ((1, 1), (2, 1, 3), (10, 1, 14, 12), (7, 13, 9)), (5, 6, 3, 3), {"padding": (1, 2)}),
]
OPENCL_CASES = ("k1", "k3s2p1", "k4s2-same", "k5d2p4", "k7s2p3-relu", "dw-m2-s2")

CONV_TRANSPOSE2D_CASES = [
    ("k1", (1, 4, 13, 11), (1, 4, (3, 6, 4), (2, 5, 4)), (4, 6, 1, 1), {}),
    ("k3s2p1op1", (2, 4, 13, 11), ((1, 1), 4, (3, 6, 4), (2, 5, 4)), (4, 6, 3, 3),
     {"stride": 2, "padding": 1, "output_padding": 1}),
    ("k4s2p1", (1, 4, 13, 11), (1, 4, (3, 6, 4), (2, 5, 4)), (4, 6, 4, 4), {"stride": 2, "padding": 1}),
    ("k3s3d2-asym", (1, 4, 13, 11), (1, 4, (1, 1, 11), (2, 5, 4)), (4, 6, 3, 3),
     {"stride": 3, "dilation": 2, "padding": (2, 0, 1, 3), "output_padding": 1}),
    ("k5-same-s2", (1, 4, 13, 11), (1, 4, (3, 6, 4), (2, 5, 4)), (4, 6, 5, 5), {"stride": 2, "padding": "same"}),
    ("g2-relu", (1, 4, 13, 11), (1, (1, 3), (3, 6, 4), (2, 5, 4)), (4, 3, 3, 3),
     {"groups": 2, "padding": 1, "activation": "relu"}),
    ("k2s3-output-size", (1, 4, 13, 11), (1, 4, (3, 6, 4), (2, 5, 4)), (4, 6, 2, 2), {"stride": 3, "output_size": (40, 33)}),
]


def _tensors(x_shape, w_shape, seed=0):
    """(the generator, for the bias, whose size depends on the op), x and w, all U(-1, 1)."""
    rng = np.random.default_rng(seed)
    return rng, rng.uniform(-1, 1, x_shape).astype(np.float32), rng.uniform(-1, 1, w_shape).astype(np.float32)


def _require_opencl():
    availability = convbackends.available_backends()["opencl"]
    if not availability.available:
        require("opencl", availability.reason)


@pytest.fixture(scope="module")
def threads_client():
    """Two workers as threads of this process (talking in-process; their HTTP servers on 127.0.0.1)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def process_client():
    """Two worker processes on 127.0.0.1, as `bench --local-cluster 2` starts them."""
    with fleet.connect(local_workers=2) as client:
        yield client


def _conv2d_case(case_id, backend):
    _, x_shape, chunks, w_shape, kwargs = next(c for c in CONV2D_CASES if c[0] == case_id)
    rng, x, w = _tensors(x_shape, w_shape)
    b = rng.uniform(-1, 1, w_shape[0]).astype(np.float32)
    xd = da.from_array(x, chunks=chunks)
    y = cbd.conv2d(xd, w, b, backend=backend, **kwargs)
    ref = conv2d_float64(x, w, b, **kwargs)
    assert y.shape == ref.shape
    out = y.compute()
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= tolerance(ref)
    whole = convbackends.conv2d(x, w, b, backend=backend, **kwargs)  # the same backend on the whole array
    assert np.abs(out - whole).max() <= tolerance(ref)
    return y


@pytest.mark.parametrize("case_id", [c[0] for c in CONV2D_CASES])
def test_conv2d_numpy_equals_the_whole_array(threads_client, case_id):
    y = _conv2d_case(case_id, "numpy")
    assert len(y.chunks[1]) == 1  # C merged, O whole


@pytest.mark.parametrize("case_id", OPENCL_CASES)
def test_conv2d_opencl_equals_the_whole_array(threads_client, case_id):
    _require_opencl()
    _conv2d_case(case_id, "opencl")


@pytest.mark.parametrize("case_id,backend", [(c[0], "numpy") for c in CONV_TRANSPOSE2D_CASES]
                         + [("k3s2p1op1", "opencl"), ("k3s3d2-asym", "opencl")])
def test_conv_transpose2d_equals_the_whole_array(threads_client, case_id, backend):
    if backend == "opencl":
        _require_opencl()
    _, x_shape, chunks, w_shape, kwargs = next(c for c in CONV_TRANSPOSE2D_CASES if c[0] == case_id)
    rng, x, w = _tensors(x_shape, w_shape, seed=1)
    b = rng.uniform(-1, 1, w_shape[1] * kwargs.get("groups", 1)).astype(np.float32)
    y = cbd.conv_transpose2d(da.from_array(x, chunks=chunks), w, b, backend=backend, **kwargs)
    ref = conv_transpose2d_float64(x, w, b, **kwargs)
    assert y.shape == ref.shape
    out = y.compute()
    assert np.abs(out - ref).max() <= tolerance(ref)
    assert np.abs(out - convbackends.conv_transpose2d(x, w, b, backend=backend, **kwargs)).max() <= tolerance(ref)


# (id, x shape, x chunks, w shape, offset groups, max_offset, with a mask, keywords); the offsets are drawn
# U(-max_offset, max_offset) and come chunked otherwise than the output.
DEFORM_CASES = [
    ("k3p1", (2, 4, 37, 29), ((1, 1), 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3), 1, 2.5, False, {"padding": 1}),
    ("k3s2-same-mask-og2", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 3, 3), 2, 1.0, True,
     {"stride": 2, "padding": "same"}),
    ("k3s3d2-asym-g2-mask", (1, 4, 37, 29), (1, (1, 3), (10, 1, 14, 12), (7, 13, 9)), (6, 2, 3, 3), 2, 3.0, True,
     {"stride": 3, "dilation": 2, "padding": (0, 2, 1, 3), "groups": 2}),
    ("k1-zero-offsets", (1, 4, 37, 29), (1, 4, (10, 1, 14, 12), (7, 13, 9)), (6, 4, 1, 1), 1, 0.0, False, {}),
    ("k7s2p3-mask-relu", (1, 3, 37, 29), (1, 3, (10, 1, 14, 12), (7, 13, 9)), (6, 3, 7, 7), 1, 4.7, True,
     {"stride": 2, "padding": 3, "activation": "relu"}),
    ("k5-valid-rect", (1, 4, 37, 29), (1, 4, (3, 2, 2, 30), (2, 2, 25)), (6, 4, 5, 3), 4, 1.5, False,
     {"padding": "valid"}),
]


def _deform_tensors(x_shape, w_shape, offset_groups, max_offset, with_mask, kwargs, seed=2):
    """x, offset, mask (or None), w, b for the case, offsets within +-max_offset."""
    rng, x, w = _tensors(x_shape, w_shape, seed)
    g = convbackends.DeformConv2dSpec.create(w, **kwargs).conv.geometry(x_shape)
    taps = g.kh * g.kw
    offset = rng.uniform(-max_offset, max_offset, (g.n, 2 * offset_groups * taps, g.oh, g.ow)).astype(np.float32)
    mask = rng.uniform(0, 1, (g.n, offset_groups * taps, g.oh, g.ow)).astype(np.float32) if with_mask else None
    return x, offset, mask, w, rng.uniform(-1, 1, w_shape[0]).astype(np.float32)


@pytest.mark.parametrize("case_id,backend", [(c[0], "numpy") for c in DEFORM_CASES]
                         + [("k3s2-same-mask-og2", "opencl"), ("k7s2p3-mask-relu", "opencl")])
def test_deform_conv2d_equals_the_whole_array(threads_client, case_id, backend):
    if backend == "opencl":
        _require_opencl()
    _, x_shape, chunks, w_shape, offset_groups, max_offset, with_mask, kwargs = \
        next(c for c in DEFORM_CASES if c[0] == case_id)
    x, offset, mask, w, b = _deform_tensors(x_shape, w_shape, offset_groups, max_offset, with_mask, kwargs)
    offset_d = da.from_array(offset, chunks=(1, offset.shape[1] // 2, 9, 8))  # chunked otherwise than y
    y = cbd.deform_conv2d(da.from_array(x, chunks=chunks), offset_d, w, b, mask=mask, max_offset=max_offset,
                          backend=backend, **kwargs)
    ref = deform_conv2d_float64(x, offset, w, b, mask=mask, **kwargs)
    assert y.shape == ref.shape
    out = y.compute()
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= tolerance(ref)
    whole = convbackends.deform_conv2d(x, offset, w, b, mask=mask, backend=backend, **kwargs)
    assert np.abs(out - whole).max() <= tolerance(ref)


def _edge_sample_offsets():
    """A 1x1 layer, padding 1, on x (1, 2, 12, 10) whose only samples off a pixel centre land exactly on x's
    edges (y = -1, y = H, x = W), next to non-finite pixels: those read 0 on the whole array (an edge made of
    zero pixels instead would read the inf or NaN beside them with weight 0, giving NaN)."""
    rng, x, w = _tensors((1, 2, 12, 10), (3, 2, 1, 1), seed=4)
    x[0, 1, 0, 5], x[0, 0, 11, 2], x[0, 1, 4, 9] = np.inf, np.nan, -np.inf
    offset = np.zeros((1, 2, 14, 12), np.float32)
    offset[0, 0, 1, 6], offset[0, 0, 12, 3], offset[0, 1, 5, 10] = -1, 1, 1
    return x, (1, 2, (5, 7), (4, 6)), w, offset


def _nonfinite_cases():
    """(x, its chunks, w, offset, keywords): non-finite pixels at x's edges and at chunk edges, integer
    offsets (samples exactly on pixels and on the edges), a NaN offset; then the edge samples above."""
    rng, x, w = _tensors((1, 4, 37, 29), (6, 4, 3, 3), seed=3)
    x[0, 1, 0, 5], x[0, 2, 36, 28], x[0, 0, 20, 0], x[0, 3, 11, 9] = np.inf, np.nan, -np.inf, np.inf
    for offset in (np.zeros((1, 18, 37, 29), np.float32),
                   np.round(rng.uniform(-2, 2, (1, 18, 37, 29))).astype(np.float32)):
        offset[0, 3, 30, 3] = np.nan
        yield x, (1, 4, (10, 1, 14, 12), (7, 13, 9)), w, offset, {"padding": 1, "max_offset": 2}
    x, chunks, w, offset = _edge_sample_offsets()
    yield x, chunks, w, offset, {"padding": 1, "max_offset": 1}


# inf * 0 gives NaN, as it should; numpy says so from the worker threads too, where errstate does not reach.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["numpy", "opencl"])
def test_deform_conv2d_nan_and_inf_land_as_in_the_whole_array(threads_client, backend):
    if backend == "opencl":
        _require_opencl()
    for x, chunks, w, offset, kwargs in _nonfinite_cases():
        out = cbd.deform_conv2d(da.from_array(x, chunks=chunks), offset, w, backend=backend, **kwargs).compute()
        layer_kwargs = {k: v for k, v in kwargs.items() if k != "max_offset"}
        whole = convbackends.deform_conv2d(x, offset, w, backend=backend, **layer_kwargs)
        ref = deform_conv2d_float64(x, offset, w, **layer_kwargs)
        finite = np.isfinite(whole) & np.isfinite(ref)
        assert (~finite).any() and finite.any()
        assert np.array_equal(np.isnan(out), np.isnan(whole)) and np.array_equal(np.isinf(out), np.isinf(whole))
        assert np.array_equal(out[np.isinf(out)], whole[np.isinf(whole)])
        assert np.abs(out[finite] - ref[finite]).max() <= tolerance(ref[finite])


def test_deform_conv2d_refuses_offsets_beyond_max_offset(threads_client):
    _, x, w = _tensors((1, 4, 20, 20), (4, 4, 3, 3))
    offset = np.zeros((1, 18, 20, 20), np.float32)
    offset[0, 5, 13, 4] = -2.25  # in the output block rows 11..19, columns 0..10 (chunk edges 10, 20 are output 11)
    y = cbd.deform_conv2d(da.from_array(x, chunks=(1, 4, 10, 10)), offset, w, padding=1, max_offset=2,
                          backend="numpy")
    with pytest.raises(ValueError, match=r"offset reaches 2.25 in the output block rows 11..19, columns 0..10, "
                                         r"beyond max_offset=2"):
        y.compute()
    assert np.abs(cbd.deform_conv2d(da.from_array(x, chunks=(1, 4, 10, 10)), offset, w, padding=1, max_offset=2.25,
                                    backend="numpy").compute()
                  - deform_conv2d_float64(x, offset, w, padding=1)).max() <= 1e-4 * 12
    xd = da.from_array(x, chunks=10)
    for bad in (-1, float("inf"), float("nan"), "2", None):
        with pytest.raises(ValueError, match="max_offset must be a finite number >= 0"):
            cbd.deform_conv2d(xd, offset, w, padding=1, max_offset=bad)
    with pytest.raises(ValueError, match="offset must be"):
        cbd.deform_conv2d(xd, offset[:, :, :19], w, padding=1, max_offset=2)
    with pytest.raises(TypeError, match="offset must be float32"):
        cbd.deform_conv2d(xd, offset.astype(np.float64), w, padding=1, max_offset=2)


def test_deform_halo_starts_a_whole_number_of_strides_ahead():
    """Each block after the first starts (before + pad) / stride outputs ahead of its own, on the stride grid."""
    plan = cbd.deform_conv2d_axis((10, 1, 14, 12), 37, 19, 3, 2, 1, 1, 3)
    assert (plan.before + 1) % 2 == 0 and plan.before >= 3 and plan.after == 3 + 1 + 1
    edges = np.cumsum(plan.chunks)[:-1]
    assert all((e + 1) % 2 == 0 for e in edges) and min(plan.chunks) >= max(plan.before, plan.after)
    assert sum(plan.chunks) == 37 and sum(plan.out_chunks) == 19


def test_strided_chunks_move_onto_the_stride_grid():
    plan = cbd.conv2d_axis((10, 1, 14, 12), 37, 19, 3, 2, 1, 1, 1)
    edges = np.cumsum(plan.chunks)[:-1]
    assert all((e + 1) % 2 == 0 for e in edges)  # (edge + pad_top) on the stride grid
    assert sum(plan.chunks) == 37 and sum(plan.out_chunks) == 19
    assert min(plan.chunks) >= plan.after == 1
    # Stride 1 keeps the chunks as they are, but one smaller than the halo (2 rows) joins the next.
    assert cbd.conv2d_axis((10, 1, 14, 12), 37, 37, 3, 1, 1, 1, 1).chunks == (10, 15, 12)


def test_refuses_what_it_cannot_cut():
    w = np.zeros((2, 2, 3, 3), np.float32)
    with pytest.raises(TypeError, match="x must be a dask.array.Array"):
        cbd.conv2d(np.zeros((1, 2, 8, 8), np.float32), w)
    with pytest.raises(TypeError, match="x must be float32"):
        cbd.conv2d(da.zeros((1, 2, 8, 8), chunks=4), w)
    with pytest.raises(ValueError, match="x has 3 channels but w expects 2"):
        cbd.conv2d(da.zeros((1, 3, 8, 8), dtype=np.float32, chunks=4), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        cbd.conv2d(da.zeros((1, 2, 8, 8), dtype=np.float32, chunks=4), w, backend="metal")


def test_one_prepared_layer_per_worker_process(process_client):
    """Many tasks, two graphs, equal weights in two arrays: each worker prepares the layer once."""
    rng, x, w = _tensors((1, 4, 48, 40), (4, 4, 3, 3))
    before = process_client.run(cbd.cache_info)
    xd = da.from_array(x, chunks=(1, 4, 8, 10))  # 24 blocks
    for weights in (w, w.copy()):  # the same content, another array: the same token
        y = cbd.conv2d(xd, weights, padding=1, backend="numpy").compute()
        ref = conv2d_float64(x, w, padding=1)
        assert np.abs(y - ref).max() <= tolerance(ref)
    after = process_client.run(cbd.cache_info)
    prepared = {a: after[a]["prepared"] - before[a]["prepared"] for a in after}
    assert all(p <= 1 for p in prepared.values()) and sum(prepared.values()) >= 1, prepared
    # Other weights are another layer.
    cbd.conv2d(xd, w + 1, padding=1, backend="numpy").compute()
    again = process_client.run(cbd.cache_info)
    assert sum(again[a]["prepared"] - after[a]["prepared"] for a in again) >= 1


def _fleet_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_fleet_bench_has_rows_for_every_worker_and_device(process_client, tmp_path, capsys):
    assert all(a.startswith("tcp://127.0.0.1:") for a in [process_client.scheduler.address,
                                                           *process_client.scheduler_info()["workers"]])
    path = tmp_path / "fleet.json"
    code = main(["bench", "--layer", "name=a,c=8,hw=12,o=8,k=3,p=1", "--layer", "name=b,c=8,hw=12,o=16,k=1,s=2",
                 "--scheduler", process_client.scheduler.address, "--backends", "numpy,opencl", "--peers", "none",
                 "--repeats", "2", "--warmup", "1", "--in-process", "--threads", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = _fleet_json(path)
    assert report["settings"]["threads"] == 1  # the fleet report records --threads, as bench does
    hosts = report["machine"]["hosts"]
    assert len(hosts) == 2 and all(h["status"] == "ok" and h["cpu_count"] >= 1 for h in hosts.values())
    assert all(h["thread_caps"] == {} for h in hosts.values())  # the embedded cluster's workers are not capped
    layers = {layer["name"] for layer in report["layers"]}
    for label in hosts:
        for target in ("cv2dnn", "numpy:0", "opencl:0"):
            rows = [r for r in report["results"] if r["target"] == f"{label}/{target}"]
            assert {r["layer"] for r in rows} == layers
            assert all(r["status"] == "ok" and r["passed"] and r["median_s"] > 0 for r in rows), rows
            if target == "cv2dnn":
                assert all(r["ratio_vs_cv2dnn"] == 1.0 for r in rows)
    assert "per worker: machine facts" in out


def test_target_processes_run_without_the_thread_caps_of_dask(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what dask's nanny sets
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # what a user set
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}}), \
            fleet._without_dask_thread_caps() as caps:
        assert "OMP_NUM_THREADS" not in os.environ and caps == {"MKL_NUM_THREADS": "3"}
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["MKL_NUM_THREADS"] == "3"


def test_fleet_bench_marks_a_worker_that_fails(process_client):
    report = fleet.run(process_client, fleet.bench.suite("smoke")[:2], suite_name="smoke", devices="numpy:7",
                       peers="none", repeats=1, warmup=0)
    assert len(report.machine["hosts"]) == 2
    assert all(h["status"] == "failed" and "out of range" in h["reason"] for h in report.machine["hosts"].values())
    assert len(report.records) == 2 * 2 and all(r.status == "error" and "out of range" in r.reason
                                                for r in report.records)
    assert report.backend_failures()


def test_fleet_bench_survives_a_worker_killed_mid_run(process_client):
    """The first worker is killed once its first target's records are in: those rows stay, its others
    fail with the reason, and the other worker's table is complete."""
    pids = process_client.run(os.getpid)
    killed = []

    def progress(run, description):
        if not killed and run.records and not run.finished:
            killed.append(run.label)
            os.kill(pids[run.address], signal.SIGKILL)

    cases = fleet.bench.suite("smoke")[:2]
    report = fleet.run(process_client, cases, suite_name="smoke", backends="numpy", peers="none", repeats=2,
                       warmup=0, progress=progress)
    assert len(killed) == 1, report.machine["hosts"]
    hosts = report.machine["hosts"]
    dead, alive = hosts[killed[0]], next(h for label, h in hosts.items() if label != killed[0])
    assert dead["status"] == "failed" and "left the cluster" in dead["reason"]
    assert alive["status"] == "ok"
    by_target = {}
    for r in report.records:
        by_target.setdefault(r.target, []).append(r)
    survivor = next(label for label in hosts if label != killed[0])
    for target in ("cv2dnn", "numpy:0"):
        rows = by_target[f"{survivor}/{target}"]
        assert len(rows) == len(cases) and all(r.status == "ok" and r.passed for r in rows)
    kept = by_target[f"{killed[0]}/cv2dnn"]  # its first target, sent before the kill
    assert all(r.status == "ok" for r in kept)
    failed = by_target[f"{killed[0]}/numpy:0"]
    assert len(failed) == len(cases) and all(r.status == "error" and "left the cluster" in r.reason for r in failed)
