"""The command line: devices, bench and parity on the numpy backend with small suites."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convbackends import Conv2d, bench, cli, peers
from convbackends import runtime as backends
from convbackends.__main__ import main
from convbackends.bench import LayerSpecError, format_layer, geometry, parse_layer

FAST = ["--backends", "numpy", "--repeats", "1", "--warmup", "0"]


def _python_m(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convbackends", *args], capture_output=True, text=True, timeout=120)


def test_devices_lists_every_backend(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "numpy:0" in out
    for name in ("opencl", "cuda", "vulkan"):
        assert name in out


def test_devices_json():
    result = _python_m("devices", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["schema_version"] == 1
    backends = {b["name"]: b for b in listing["backends"]}
    assert set(backends) == {"numpy", "opencl", "cuda", "vulkan"}
    for entry in backends.values():
        assert isinstance(entry["available"], bool) and isinstance(entry["reason"], str)
        assert entry["available"] == (entry["reason"] == "") == bool(entry["devices"])
        for d in entry["devices"]:
            assert isinstance(d["index"], int) and isinstance(d["name"], str) and isinstance(d["facts"], dict)
    assert backends["numpy"]["available"] and backends["numpy"]["devices"][0]["type"] == "cpu"


OPTIONAL_FLOAT = (float, type(None))
RECORD_TYPES = {
    "layer": str, "target": str, "status": str, "reason": str, "cold_s": OPTIONAL_FLOAT, "median_s": OPTIONAL_FLOAT,
    "min_s": OPTIONAL_FLOAT, "device_s": OPTIONAL_FLOAT, "rulebook_s": OPTIONAL_FLOAT, "compute_s": OPTIONAL_FLOAT,
    "gflops": OPTIONAL_FLOAT, "device_gflops": OPTIONAL_FLOAT,
    "ratio_vs_cv2dnn": OPTIONAL_FLOAT, "max_abs_err": OPTIONAL_FLOAT, "mean_abs_err": OPTIONAL_FLOAT,
    "tol": OPTIONAL_FLOAT, "passed": (bool, type(None)),
}


def _check_schema(doc: dict) -> None:
    """The documented schema_version 1 layout (docs/cli.md), key by key and type by type."""
    assert doc["schema_version"] == 1
    assert set(doc) == {"schema_version", "tool", "date", "machine", "settings", "targets", "layers", "results",
                        "summary", "model"}
    assert isinstance(doc["date"], str) and isinstance(doc["tool"], str)
    assert {"platform", "cpu", "cpu_count", "memory_gib", "load_average", "python", "packages"} <= set(doc["machine"])
    load = doc["machine"]["load_average"]
    assert load is None or (len(load) == 3 and all(isinstance(v, (int, float)) and v >= 0 for v in load))
    assert isinstance(doc["machine"]["packages"], dict)
    settings = doc["settings"]
    assert isinstance(settings["suite"], str) and settings["baseline"] == "cv2dnn"
    assert isinstance(settings["warmup"], int) and isinstance(settings["repeats"], int)
    assert isinstance(settings["isolated"], bool) and isinstance(settings["checked"], bool)
    for key in ("backends", "devices", "peers"):
        assert isinstance(settings[key], (str, type(None))), key
    for t in doc["targets"]:
        assert set(t) == {"id", "kind", "device", "available", "reason"}
        assert t["kind"] in ("backend", "peer") and isinstance(t["available"], bool)
    for layer in doc["layers"]:
        assert isinstance(layer["name"], str) and isinstance(layer["spec"], str) and isinstance(layer["flops"], int)
        if layer["op"] == "sparse_conv3d":
            assert len(layer["input_shape"]) == 5 and isinstance(layer["subm"], bool)
            assert all(isinstance(layer[key], int) for key in ("sites", "output_sites", "pairs"))
            assert all(len(layer[key]) == 3 for key in ("kernel", "stride", "padding", "dilation"))
            continue
        for key, size in (("input_shape", 4), ("output_shape", 4), ("kernel", 2), ("stride", 2), ("pads", 4),
                          ("dilation", 2)):
            assert len(layer[key]) == size and all(isinstance(v, int) for v in layer[key])
    for record in doc["results"]:
        assert set(record) == set(RECORD_TYPES)
        for key, kind in RECORD_TYPES.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["status"] in ("ok", "unsupported", "error")
    for row in doc["summary"]:
        assert {"target", "geomean_ratio_vs_cv2dnn", "geomean_gflops", "layers_ok", "checks_passed",
                "checks_failed"} == set(row)
    model = doc["model"]
    if model is not None:
        assert set(model) == {"path", "nodes", "counts", "skipped", "totals"}
        assert set(model["counts"]) <= {layer["name"] for layer in doc["layers"]}
        for row in model["totals"]:
            assert set(row) == {"target", "total_s", "layers_run", "ratio_vs_cv2dnn"}


def test_bench_smoke_writes_json_csv_and_plot(tmp_path, capsys):
    paths = {ext: tmp_path / f"smoke.{ext}" for ext in ("json", "csv", "png")}
    code = main(["bench", "--suite", "smoke", "--peers", "none", *FAST, "--json", str(paths["json"]),
                 "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    assert code == 0
    out = capsys.readouterr().out
    assert "smoke-3x3" in out and "geometric mean" in out

    doc = json.loads(paths["json"].read_text())
    _check_schema(doc)
    settings = doc["settings"]
    assert (settings["backends"], settings["devices"], settings["peers"]) == ("numpy", None, "none")
    assert settings["checked"] is True and doc["model"] is None
    layers = [c.name for c in bench.suite("smoke")]
    assert [layer["name"] for layer in doc["layers"]] == layers
    assert {(r["layer"], r["target"]) for r in doc["results"]} == {(n, t) for n in layers for t in ("cv2dnn", "numpy:0")}
    for record in doc["results"]:
        assert record["status"] == "ok" and record["passed"] is True
        assert record["max_abs_err"] <= record["tol"]
        assert record["median_s"] > 0 and record["gflops"] > 0 and record["cold_s"] > 0
    assert all(r["ratio_vs_cv2dnn"] == 1.0 for r in doc["results"] if r["target"] == "cv2dnn")

    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["results"])
    assert {"layer", "target", "median_s", "gflops", "passed", "spec", "flops"} <= set(rows[0])

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_sparse_suite_times_rulebook_and_compute_apart(tmp_path, capsys):
    """Issue 12's four layers on numpy: checked in float64, the rulebook and the compute timed apart; cv2.dnn,
    which has no sparse convolution, is not run (and spconv, when installed, runs and is checked too)."""
    path = tmp_path / "sparse.json"
    code = main(["bench", "--suite", "sparse", "--peers", "spconv", *FAST, "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "rulebook ms" in out and "compute ms" in out and "subm3-32-32-60k" in out
    doc = json.loads(path.read_text())
    _check_schema(doc)
    cases = bench.suite("sparse")
    assert [layer["name"] for layer in doc["layers"]] == [c.name for c in cases]
    assert [layer["sites"] for layer in doc["layers"]] == [20_000, 60_000, 20_000, 8_000]
    assert all(layer["op"] == "sparse_conv3d" and layer["flops"] > 0 for layer in doc["layers"])
    targets = {t["id"]: t for t in doc["targets"]}
    assert not targets["cv2dnn"]["available"] and "has no sparse_conv3d" in targets["cv2dnn"]["reason"]
    ours = [r for r in doc["results"] if r["target"] == "numpy:0"]
    assert len(ours) == len(cases)
    for record in ours:
        assert record["status"] == "ok" and record["passed"] is True and record["max_abs_err"] <= record["tol"]
        assert record["rulebook_s"] > 0 and record["compute_s"] > 0 and record["median_s"] > 0
    theirs = [r for r in doc["results"] if r["target"] == "spconv"]
    assert len(theirs) == (len(cases) if targets["spconv"]["available"] else 0)
    assert all(r["status"] == "ok" and r["rulebook_s"] is None for r in theirs)


# conv2d and transposed layers with asymmetric pads (torch pads or crops them), output_padding, dilation and groups
# (ncnn's *DepthWise layers), so every peer's translation of the layer is checked.
PEER_LAYERS = ("name=tiny,c=8,hw=9x7,o=12,k=3,s=2,p=0x1x1x0",
               "name=tinyT,op=conv_transpose2d,c=6,hw=5x4,o=9,k=3,s=2,p=0x1x1x0,opad=1,d=1x2",
               "name=tinyTg,op=conv_transpose2d,n=2,c=6,hw=5,o=6,k=4,s=2,p=1,g=3")


def test_bench_with_every_peer_through_python_m(tmp_path):
    """Every peer either runs and matches cv2.dnn, or says why it cannot run here."""
    out = tmp_path / "peers.json"
    result = _python_m("bench", *(f"--layer={layer}" for layer in PEER_LAYERS), *FAST, "--json", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    _check_schema(doc)
    assert [layer["op"] for layer in doc["layers"]] == ["conv2d", "conv_transpose2d", "conv_transpose2d"]
    peers = {t["id"]: t for t in doc["targets"] if t["kind"] == "peer"}
    assert set(peers) == {"cv2dnn", "cv2dnn-opencl", "torch", "torch-cuda", "torchvision", "onnxruntime", "ncnn",
                          "ncnn-vulkan", "spconv"}
    assert peers["cv2dnn"]["available"]
    for name, target in peers.items():
        records = [r for r in doc["results"] if r["target"] == name]
        if target["available"]:
            assert len(records) == len(PEER_LAYERS) and all(r["passed"] is True for r in records), records
        else:
            assert target["reason"] and not records


def test_a_missing_peer_package_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is not installed
    peer = peers.OnnxRuntime()
    assert peer.unavailable() == "onnxruntime is not installed: pip install 'convbackends[peers]'"
    report = bench.run(bench.suite("smoke")[:1], [peers.Cv2Dnn(), peer], suite_name="smoke", repeats=1, isolate=False)
    assert [r.target for r in report.records] == ["cv2dnn"]
    assert bench.skipped_lines(report) == [f"onnxruntime: {peer.unavailable()}"]


class _DiesOnSecondLayer(peers.Cv2Dnn):
    """A peer whose library takes its process down, as a driver crash would."""

    name = "dies"

    def prepare(self, case, w, b):
        if case.name == "smoke-1x1":
            os._exit(3)
        return super().prepare(case, w, b)


def test_a_crashing_target_costs_only_its_own_records():
    report = bench.run(bench.suite("smoke"), [peers.Cv2Dnn(), _DiesOnSecondLayer()], suite_name="smoke", repeats=1)
    mine = [r for r in report.records if r.target == "dies"]
    assert [r.status for r in mine] == ["ok", "error", "error", "error"]
    assert all(r.reason == "the benchmark process died on layer smoke-1x1 (exit code 3)" for r in mine[1:])
    assert all(r.status == "ok" for r in report.records if r.target == "cv2dnn")


class _ReportsThreads(peers.Cv2Dnn):
    """A peer that fails unless every CPU library and driver of its process was set to one thread."""

    name = "one-thread"

    def prepare(self, case, w, b):
        import cv2
        import threadpoolctl

        import convbackends

        runner = super().prepare(case, w, b)
        blas = {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}
        seen = (convbackends.get_num_threads(), cv2.getNumThreads(), blas,
                *(os.environ.get(name) for name in bench.DRIVER_THREAD_VARIABLES))
        if seen != (1, 1, {1}, "1", "1"):
            raise RuntimeError(f"threads seen: {seen}")
        return runner


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: one thread is the default")
@pytest.mark.parametrize("isolate", [True, False])
def test_threads_set_every_cpu_target_and_are_restored(isolate):
    import convbackends

    cases = bench.suite("smoke")[:1]
    before = convbackends.get_num_threads()
    pinned = bench.run(cases, [_ReportsThreads()], suite_name="smoke", repeats=1, isolate=isolate, threads=1)
    assert [r.status for r in pinned.records] == ["ok"], pinned.records
    assert pinned.to_json()["settings"]["threads"] == 1
    assert convbackends.get_num_threads() == before
    assert not any(name in os.environ for name in bench.DRIVER_THREAD_VARIABLES)
    default = bench.run(cases, [_ReportsThreads()], suite_name="smoke", repeats=1, isolate=isolate)
    assert [r.status for r in default.records] == ["error"] and "threads seen" in default.records[0].reason


def test_bench_threads_option(tmp_path):
    out = tmp_path / "threads.json"
    assert main(["bench", "--suite", "smoke", "--peers", "none", *FAST, "--threads", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["threads"] == 1


def test_bench_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    profile = Conv2d.profile
    monkeypatch.setattr(Conv2d, "profile", lambda self, x: (profile(self, x)[0] + 1.0, None))
    assert main(["bench", "--layer", "c=4,hw=6,o=4,k=3", "--peers", "none", "--in-process", *FAST]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_parity_passes_on_numpy(capsys):
    assert main(["parity", "--suite", "smoke", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "numpy:0" in out and "0 failed" in out


def test_parity_fails_on_a_wrong_result(monkeypatch, capsys):
    call = Conv2d.__call__
    monkeypatch.setattr(Conv2d, "__call__", lambda self, x: call(self, x) + np.float32(1e-2))
    assert main(["parity", "--suite", "smoke", "--backends", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0 passed" in out


@pytest.mark.parametrize("text, shape, kernel, stride, pads, dilation, groups", [
    ("c=64,hw=56,o=64,k=3,p=1", (1, 64, 56, 56), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("n=8,c=16,h=20,w=30,o=32,k=7x1,s=2x1,p=3x0,d=1x2,g=4", (8, 16, 20, 30), (7, 1), (2, 1), (3, 0, 3, 0), (1, 2), 4),
    ("name=x, c=3, hw=24x17, o=6, k=5, p=0x1x2x3, g=3", (1, 3, 24, 17), (5, 5), (1, 1), (0, 1, 2, 3), (1, 1), 3),
])
def test_layer_spec(text, shape, kernel, stride, pads, dilation, groups):
    g = geometry(parse_layer(text))
    assert g.input_shape == shape and (g.kh, g.kw) == kernel and (g.sh, g.sw) == stride
    assert (g.pt, g.pl, g.pb, g.pr) == pads and (g.dh, g.dw) == dilation and g.groups == groups
    again = parse_layer(format_layer(parse_layer(text)))
    assert geometry(again) == g


def test_layer_spec_of_a_transposed_layer():
    case = parse_layer("op=conv_transpose2d,n=2,c=8,hw=5x6,o=12,k=3,s=2,p=1,opad=1x0,g=4")
    assert case.op == "conv_transpose2d" and case.w_shape == (8, 3, 3, 3)
    g = geometry(case)
    assert g.output_shape == (2, 12, 10, 11) and (g.oph, g.opw) == (1, 0) and g.groups == 4
    assert g.flops == 2 * 2 * 8 * 5 * 6 * 3 * 9
    again = parse_layer(format_layer(case))
    assert again.op == case.op and geometry(again) == g


def test_layer_spec_of_a_deformable_layer():
    case = parse_layer("op=deform_conv2d,n=2,c=8,hw=6x7,o=4,k=3,s=2,p=1,g=2,og=4,mask=0,off=1.5,bwd=1")
    assert (case.op, case.offset_groups, case.mask, case.offset_scale, case.backward) == ("deform_conv2d", 4, False,
                                                                                           1.5, True)
    g = geometry(case)
    assert g.offset_shape == (2, 2 * 4 * 9, 3, 4) and not g.has_mask and g.output_shape == (2, 4, 3, 4)
    assert bench.flops(case) == 2 * g.flops  # backward: two GEMMs of the forward's size
    grad_y, x, offset, mask = bench.arguments(case)
    assert grad_y.shape == g.output_shape and x.shape == g.input_shape and offset.shape == g.offset_shape
    assert mask is None and np.abs(offset).max() <= 1.5
    assert parse_layer(format_layer(case)) == case
    forward = parse_layer("op=deform_conv2d,c=8,hw=6,o=4,k=3,p=1")
    assert (forward.offset_groups, forward.mask, forward.offset_scale, forward.backward) == (1, True, 2.0, False)
    assert len(bench.arguments(forward)) == 3


def test_bench_deform_suite_on_numpy(tmp_path):
    """`bench --suite deform`: every layer forward (checked against the float64 oracle) and backward (timed), on
    numpy beside onnxruntime, whose forward matches too and which has no backward."""
    out = tmp_path / "deform.json"
    assert main(["bench", "--suite", "deform", "--peers", "onnxruntime", "--in-process", *FAST, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    _check_schema(doc)
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert len(layers) == 10 and all(layer["op"] == "deform_conv2d" and layer["mask"] for layer in layers.values())
    assert layers["dcnv2-n4-64x56"]["input_shape"] == [4, 64, 56, 56]
    assert layers["dcnv2-256x14-backward"]["flops"] == 2 * layers["dcnv2-256x14"]["flops"]
    for record in doc["results"]:
        backward = layers[record["layer"]]["backward"]
        if record["target"] == "cv2dnn" or (record["target"] == "onnxruntime" and backward):
            assert record["status"] == "unsupported", record
        elif backward:
            assert record["status"] == "ok" and record["passed"] is None and record["median_s"] > 0, record
        else:
            assert record["status"] == "ok" and record["passed"] is True, record


def test_torchvision_peer_forward_and_backward(monkeypatch):
    """The torchvision peer's plumbing (padding, mask, the five gradients), with torchvision.ops.deform_conv2d
    stood in for by convbackends.torch's function of the same argument order (torchvision is not in CI)."""
    import types

    pytest.importorskip("torch")
    import convbackends.torch as cbt
    from convbackends.ops.deform_conv2d import DeformConv2d
    from convbackends.parity import compare, float64_output

    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = cbt.deform_conv2d
    package = types.ModuleType("torchvision")
    package.ops, package.__version__ = ops, "stand-in"
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    peer = peers.TorchVision()
    assert peer.unavailable() is None
    spec = "op=deform_conv2d,c=4,hw=6x5,o=6,k=3,p=0x1x2x1,og=2"
    forward, backward = parse_layer(spec), parse_layer(spec + ",bwd=1")
    assert peer.supports(backward) is None and peer.supports(parse_layer("c=4,hw=5,o=4,k=3")) is not None
    _, w, b = forward.tensors()
    y, _ = peer.prepare(forward, w, b).profile(*bench.arguments(forward))
    assert compare(y, float64_output(forward))[3]
    grads, _ = peer.prepare(backward, w, b).profile(*bench.arguments(backward))
    with DeformConv2d(w, b, **backward.kwargs) as layer:
        expected = layer.backward(*bench.arguments(backward))
    assert len(grads) == 5
    for got, want in zip(grads, expected):
        assert compare(got, want.astype(np.float64))[3]


@pytest.mark.parametrize("text, message", [
    ("c=64,hw=x,o=64,k=3", "hw must be N or NxN"),
    ("c=64,hw=56,o=64", "missing k="),
    ("c=64,o=64,k=3", "missing hw="),
    ("c=64,hw=56,o=64,k=3,q=1", "unknown key 'q'"),
    ("c=64,hw=56,o=64,k=3,k=5", "given twice"),
    ("c=64,hw=56,o=64,k=3,g=5", "g=5 must be >= 1 and divide c=64"),
    ("c=64,hw=56,o=64,k=3,s=0", "stride must be >= 1"),
    ("c=64,hw=2,o=64,k=5", "output size"),
    ("c64", "is not key=value"),
    ("op=deconv,c=4,hw=5,o=4,k=3", "op must be one of conv2d, conv_transpose2d, deform_conv2d, got 'deconv'"),
    ("c=4,hw=5,o=4,k=3,og=2,bwd=1", "og=, bwd= for op=deform_conv2d only"),
    ("op=deform_conv2d,c=4,hw=5,o=4,k=3,mask=2", "mask must be 0 or 1, got '2'"),
    ("op=deform_conv2d,c=4,hw=5,o=4,k=3,off=-1", "off must be a finite number >= 0, got '-1'"),
    ("op=deform_conv2d,c=4,hw=5,o=4,k=3,og=3", "x has C=4 channels, not divisible by the 3 offset groups"),
    ("c=4,hw=5,o=4,k=3,opad=1", "opad= .output_padding. is for op=conv_transpose2d only"),
    ("op=conv_transpose2d,c=4,hw=5,o=6,k=3,g=4", "g=4 must divide o=6"),
    ("op=conv_transpose2d,c=4,hw=5,o=4,k=3,s=2,opad=2", "output_padding must be smaller than stride or dilation"),
])
def test_layer_spec_errors(text, message):
    with pytest.raises(LayerSpecError, match=message) as info:
        parse_layer(text)
    assert repr(text) in str(info.value)


def test_bad_layer_on_the_command_line_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--layer", "c=64,hw=56x,o=64,k=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --layer: invalid layer 'c=64,hw=56x,o=64,k=3'" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["bench", "--devices", "numpy:7"], "out of range"),
    (["bench", "--devices", "numpy"], "must be BACKEND:INDEX"),
    (["bench", "--backends", "metal"], "backend must be one of"),
    (["bench", "--peers", "tensorflow"], "unknown peer 'tensorflow'"),
    (["parity", "--backends", "numpy,nope"], "backend must be one of"),
])
def test_bad_targets_exit_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["bench", "--repeats", "0"], "convbackends bench: error: argument --repeats: must be an integer >= 1, got '0'"),
    (["bench", "--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
    (["bench", "--json", "/no/such/dir/x.json"], "argument --json: directory '/no/such/dir' of"),
    (["bench", "--onnx", "/no/such/model.onnx"], "argument --onnx: no file '/no/such/model.onnx'"),
    (["parity", "--suite", "x"], "argument --suite: invalid choice: 'x'"),
    (["bench", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ([], "convbackends: error: the following arguments are required: COMMAND"),
])
def test_bad_options_exit_2_in_one_line(args, message, capsys):
    """docs/cli.md: bad input ends in one line on stderr, not argparse's usage block."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_suites():
    standard = {c.name: geometry(c) for c in bench.suite("standard")}
    assert len(standard) == 11
    stem = standard["resnet50-stem-7x7s2"]
    assert (stem.c, stem.h, stem.o, stem.kh, stem.sh, stem.pt) == (3, 224, 64, 7, 2, 3)
    assert standard["resnext-3x3-g32-56-256"].groups == 32 and standard["deeplab-3x3d2-28-256"].dh == 2
    assert standard["batch8-3x3-56-64"].n == 8 and standard["mbv2-dw3x3s2-112-96"].groups == 96
    for name in bench.SUITE_BUILDERS:
        names = [c.name for c in bench.suite(name)]
        assert len(names) == len(set(names)), name
    assert len(bench.suite("vgg16")) == 9
    assert sum(geometry(c).flops for c in bench.suite("smoke")) < 1e8
    transposed = {c.name: (c, geometry(c)) for c in bench.suite("conv_transpose2d")}
    assert all(case.op == "conv_transpose2d" for case, _ in transposed.values())
    case, dcgan = transposed["dcgan-4x4s2-8-512-256"]
    assert case.w_shape == (512, 256, 4, 4) and dcgan.output_shape == (1, 256, 16, 16)
    case, fcn = transposed["fcn-dw4x4s2-64-21"]
    assert case.w_shape == (21, 1, 4, 4) and fcn.groups == 21 and fcn.output_shape == (1, 21, 128, 128)
    assert transposed["unet-2x2s2-64-256-128"][1].output_shape == (1, 128, 128, 128)
    assert transposed["3x3s2-opad1-32-128-64"][1].output_shape == (1, 64, 64, 64)


def test_help_documents_the_layer_spec():
    result = _python_m("bench", "--help")
    assert result.returncode == 0
    assert "name=my3x3,c=64,hw=56,o=64,k=3,p=1" in result.stdout and "TOPxLEFTxBOTTOMxRIGHT" in result.stdout


def _without(monkeypatch, *modules: str) -> None:
    """Make `import MODULE` fail as it does where the package is not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_bench_without_cv2_times_and_says_the_checks_were_skipped(monkeypatch, tmp_path, capsys):
    _without(monkeypatch, "cv2")
    out = tmp_path / "unchecked.json"
    assert main(["bench", "--suite", "smoke", "--peers", "none", "--in-process", *FAST, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    hint = "cv2 is not installed: pip install 'convbackends[reference]'"
    assert f"checks skipped, outputs not compared with cv2.dnn: {hint}" in text and "not checked" in text
    assert f"not run: cv2dnn: {hint}" in text
    doc = json.loads(out.read_text())
    _check_schema(doc)
    assert doc["settings"]["checked"] is False
    records = doc["results"]
    assert {r["target"] for r in records} == {"numpy:0"} and len(records) == len(bench.suite("smoke"))
    for record in records:
        assert record["status"] == "ok" and record["median_s"] > 0 and record["gflops"] > 0
        assert record["passed"] is None and record["max_abs_err"] is None and record["reason"] == f"not checked: {hint}"


def test_parity_without_cv2_says_what_to_install(monkeypatch, capsys):
    _without(monkeypatch, "cv2")
    assert main(["parity", "--suite", "smoke", "--backends", "numpy"]) == 2
    err = capsys.readouterr().err
    assert err == ("convbackends parity: error: parity compares with cv2.dnn, but cv2 is not installed: "
                   "pip install 'convbackends[reference]'\n")


def test_commands_without_rich_say_what_to_install(monkeypatch, capsys):
    _without(monkeypatch, "rich")
    for args in (["devices"], ["bench", "--suite", "smoke"], ["parity"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"convbackends {args[0]}: error: tables need rich: pip install 'convbackends[cli]'")
        assert err.count("\n") == 1
    assert main(["devices", "--json"]) == 0


@pytest.mark.parametrize("backend, package, hint", [
    ("opencl", "pyopencl", "pip install 'convbackends[opencl]'"),
    ("vulkan", "vulkan", "pip install 'convbackends[vulkan]'"),
    ("cuda", "cupy", "'convbackends[cuda"),
])
def test_a_backend_without_its_package_names_what_to_install(backend, package, hint, monkeypatch):
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.delitem(sys.modules, f"convbackends.runtime.{backends.BACKEND_MODULES[backend]}", raising=False)
    _without(monkeypatch, package)
    reason = backends.available_backends()[backend].reason
    assert reason.startswith(f"ModuleNotFoundError: import of {package} halted") and hint in reason


@pytest.mark.parametrize("wheels, driver, cupy_missing, hint", [
    # the README's own sample: CuPy for CUDA 13 on a CUDA 12 driver
    (["cupy-cuda13x"], (12, 4), False,
     "cupy-cuda13x needs a CUDA 13 driver, this one supports CUDA 12.4: pip uninstall -y cupy-cuda13x && "
     "pip install 'convbackends[cuda12]'"),
    (["cupy-cuda12x"], (13, 0), False, ""),  # CUDA drivers run older runtimes: no hint, the driver's reason stands
    (["cupy-cuda13x"], (13, 1), False, ""),
    (["cupy-cuda12x", "cupy-cuda13x"], (13, 0), False,
     "cupy-cuda12x and cupy-cuda13x are both installed and overwrite each other's cupy; the driver supports "
     "CUDA 13.0: pip uninstall -y cupy-cuda12x cupy-cuda13x && pip install 'convbackends[cuda13]'"),
    ([], (12, 8), True, "pip install 'convbackends[cuda12]'"),
    ([], None, True, "on a machine with an NVIDIA GPU: pip install 'convbackends[cuda12]' or 'convbackends[cuda13]', "
                     "matching the CUDA version nvidia-smi shows"),
    (["cupy-cuda13x"], None, False, "no NVIDIA driver found (libcuda.so.1): the cuda backend needs an NVIDIA GPU and "
                                    "its driver"),
    ([], (11, 8), True, "the NVIDIA driver supports CUDA 11.8, CuPy wheels here need 12 or 13 "
                        "('convbackends[cuda12]' or 'convbackends[cuda13]')"),
])
def test_cuda_hint_matches_cupy_to_the_driver(wheels, driver, cupy_missing, hint):
    assert backends.cuda_hint(wheels, driver, cupy_missing) == hint


def test_two_opencv_distributions_are_warned_about(monkeypatch, capsys):
    installed = {"opencv-python": "4.11", "opencv-python-headless": "5.0"}

    def version(dist):
        if dist not in installed:
            raise cli.metadata.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(cli.metadata, "version", version)
    assert main(["devices", "--json"]) == 0
    err = capsys.readouterr().err
    assert err == ("convbackends: warning: opencv-python-headless and opencv-python are installed together and "
                   "overwrite each other's cv2: pip uninstall -y opencv-python-headless opencv-python, then pip "
                   "install the one to keep\n")


def test_fastest_rows_pick_the_lowest_passing_median_of_each_kind():
    report = bench.run(bench.suite("smoke")[:2], [*bench.targets("numpy", None, "none"), peers.Cv2Dnn()],
                       suite_name="smoke", repeats=1, warmup=0, isolate=False)
    report.records[0].passed = False  # a failed check never counts as fastest
    rows = bench.fastest_rows(report)
    assert [row[0] for row in rows] == [layer["name"] for layer in report.layers]
    for row in rows:
        mine = [r for r in report.records if r.layer == row[0] and r.passed is not False]
        for kind, target, ms in (("backend", row[1], row[2]), ("peer", row[4], row[5])):
            candidates = [r for r in mine if (r.target == "cv2dnn") == (kind == "peer")]
            if not candidates:
                assert (target, ms) == ("-", "-")
                continue
            best = min(candidates, key=lambda r: r.median_s)
            assert (target, ms) == (best.target, f"{best.median_s * 1e3:.3f}")
