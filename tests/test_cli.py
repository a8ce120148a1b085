"""The command line: devices, bench and parity on the numpy backend with small suites."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convbackends import Conv2d, bench, peers
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
    "min_s": OPTIONAL_FLOAT, "device_s": OPTIONAL_FLOAT, "gflops": OPTIONAL_FLOAT, "device_gflops": OPTIONAL_FLOAT,
    "ratio_vs_cv2dnn": OPTIONAL_FLOAT, "max_abs_err": OPTIONAL_FLOAT, "mean_abs_err": OPTIONAL_FLOAT,
    "tol": OPTIONAL_FLOAT, "passed": (bool, type(None)),
}


def _check_schema(doc: dict) -> None:
    """The documented schema_version 1 layout (docs/cli.md), key by key and type by type."""
    assert doc["schema_version"] == 1
    assert set(doc) == {"schema_version", "tool", "date", "machine", "settings", "targets", "layers", "results",
                        "summary"}
    assert isinstance(doc["date"], str) and isinstance(doc["tool"], str)
    assert {"platform", "cpu", "cpu_count", "memory_gib", "python", "packages"} <= set(doc["machine"])
    assert isinstance(doc["machine"]["packages"], dict)
    settings = doc["settings"]
    assert isinstance(settings["suite"], str) and settings["baseline"] == "cv2dnn"
    assert isinstance(settings["warmup"], int) and isinstance(settings["repeats"], int)
    assert isinstance(settings["isolated"], bool)
    for t in doc["targets"]:
        assert set(t) == {"id", "kind", "device", "available", "reason"}
        assert t["kind"] in ("backend", "peer") and isinstance(t["available"], bool)
    for layer in doc["layers"]:
        assert isinstance(layer["name"], str) and isinstance(layer["spec"], str) and isinstance(layer["flops"], int)
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


def test_bench_smoke_writes_json_csv_and_plot(tmp_path, capsys):
    paths = {ext: tmp_path / f"smoke.{ext}" for ext in ("json", "csv", "png")}
    code = main(["bench", "--suite", "smoke", "--peers", "none", *FAST, "--json", str(paths["json"]),
                 "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    assert code == 0
    out = capsys.readouterr().out
    assert "smoke-3x3" in out and "geometric mean" in out

    doc = json.loads(paths["json"].read_text())
    _check_schema(doc)
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


def test_bench_with_every_peer_through_python_m(tmp_path):
    """Every peer either runs and matches cv2.dnn, or says why it cannot run here."""
    out = tmp_path / "peers.json"
    result = _python_m("bench", "--layer", "name=tiny,c=8,hw=9x7,o=12,k=3,s=2,p=0x1x1x0", *FAST, "--json", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    _check_schema(doc)
    peers = {t["id"]: t for t in doc["targets"] if t["kind"] == "peer"}
    assert set(peers) == {"cv2dnn", "cv2dnn-opencl", "torch", "torch-cuda", "onnxruntime", "ncnn", "ncnn-vulkan"}
    assert peers["cv2dnn"]["available"]
    records = {r["target"]: r for r in doc["results"]}
    for name, target in peers.items():
        if target["available"]:
            assert records[name]["passed"] is True, records[name]
        else:
            assert target["reason"] and name not in records


def test_a_missing_peer_package_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is not installed
    peer = peers.OnnxRuntime()
    assert "onnxruntime" in peer.unavailable()
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
    assert "argument --layer: invalid layer 'c=64,hw=56x,o=64,k=3'" in err and "Traceback" not in err


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


def test_bad_options_exit_2():
    for args in (["bench", "--repeats", "0"], ["bench", "--json", "/no/such/dir/x.json"], ["parity", "--suite", "x"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2


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


def test_help_documents_the_layer_spec():
    result = _python_m("bench", "--help")
    assert result.returncode == 0
    assert "name=my3x3,c=64,hw=56,o=64,k=3,p=1" in result.stdout and "TOPxLEFTxBOTTOMxRIGHT" in result.stdout
