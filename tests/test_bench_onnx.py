"""`convbackends bench --onnx`: the Conv and ConvTranspose layers of a small model built here with onnx.helper, end
to end; ConvTranspose's padding rules against onnx's own reference evaluator."""
import json
import subprocess
import sys

import numpy as np
import pytest

from convbackends import bench

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FAST = ["--backends", "numpy", "--peers", "none", "--repeats", "1", "--warmup", "0"]


def _model(path) -> None:
    """Six Conv nodes (two of one geometry, one 1-D), a ConvTranspose, a Relu and a MaxPool; only the
    graph's inputs and outputs carry shapes, with a symbolic batch: the rest is shape inference's."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.uniform(-1, 1, shape).astype(np.float32), name)

    inits = [weight("Wa", 8, 3, 3, 3), weight("Ba", 8), weight("Wb", 8, 8, 3, 3), weight("Bb", 8),
             weight("Wc", 8, 8, 3, 3), weight("Bc", 8), weight("Wd", 8, 1, 3, 3), weight("We", 16, 8, 1, 1),
             weight("Wt", 16, 4, 2, 2), weight("W1", 4, 4, 3)]
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"]),
        helper.make_node("Conv", ["a_relu", "Wb", "Bb"], ["b"], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "Wc", "Bc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),  # conv_b's geometry
        # 17x16 at stride 2: 9x8 out, pads 2 and 1 in total; SAME_LOWER puts the odd one at the start
        helper.make_node("Conv", ["c", "Wd"], ["d"], name="conv_d", group=8, strides=[2, 2], auto_pad="SAME_LOWER"),
        helper.make_node("Conv", ["d", "We"], ["e"], name="conv_e"),
        helper.make_node("MaxPool", ["e"], ["pooled"], kernel_shape=[2, 2]),
        helper.make_node("ConvTranspose", ["e", "Wt"], ["t"], name="up", strides=[2, 2]),
        helper.make_node("Conv", ["s", "W1"], ["s_out"], name="conv_1d", pads=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 17, 16]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4, 10])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("pooled", "t", "s_out")],
        initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


# What the model above holds, worked out by hand from the ONNX operator definitions.
EXPECTED_LAYERS = {  # name: (input shape, weight shape, stride, (top, left, bottom, right), groups, nodes)
    "conv_a": ([1, 3, 17, 16], [8, 3, 3, 3], [1, 1], [1, 1, 1, 1], 1, 1),
    "conv_b": ([1, 8, 17, 16], [8, 8, 3, 3], [1, 1], [1, 1, 1, 1], 1, 2),
    "conv_d": ([1, 8, 17, 16], [8, 1, 3, 3], [2, 2], [1, 1, 1, 0], 8, 1),
    "conv_e": ([1, 8, 9, 8], [16, 8, 1, 1], [1, 1], [0, 0, 0, 0], 1, 1),
}
# The ConvTranspose node: e (1, 16, 9, 8) through Wt (16, 4, 2, 2) at stride 2 gives (1, 4, 18, 16).
EXPECTED_TRANSPOSED = {"name": "up", "op": "conv_transpose2d", "input_shape": [1, 16, 9, 8],
                       "output_shape": [1, 4, 18, 16], "kernel": [2, 2], "stride": [2, 2], "pads": [0, 0, 0, 0],
                       "dilation": [1, 1], "groups": 1, "output_padding": [0, 0]}


def test_bench_onnx_end_to_end(tmp_path):
    model, out = tmp_path / "tiny.onnx", tmp_path / "tiny.json"
    _model(model)
    result = subprocess.run([sys.executable, "-m", "convbackends", "bench", "--onnx", str(model), *FAST,
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model tiny.onnx: 6 Conv, 1 ConvTranspose nodes, 5 distinct layers" in result.stdout
    assert "ConvTranspose node up" not in result.stdout
    assert "not benchmarked: Conv node conv_1d: a 1-D convolution (conv2d takes 2-D)" in result.stdout
    assert "conv2d + conv_transpose2d benchmark" in result.stdout

    doc = json.loads(out.read_text())
    assert doc["settings"]["suite"] == "onnx:tiny.onnx"
    layers = {layer["name"]: layer for layer in doc["layers"]}
    assert list(layers) == [*EXPECTED_LAYERS, "up"]
    for name, (x, w, stride, pads, groups, _) in EXPECTED_LAYERS.items():
        layer = layers[name]
        assert layer["op"] == "conv2d"
        assert (layer["input_shape"], [layer["output_shape"][1], layer["input_shape"][1] // groups, *layer["kernel"]],
                layer["stride"], layer["pads"], layer["groups"]) == (x, w, stride, pads, groups), name
    assert layers["conv_d"]["output_shape"] == [1, 8, 9, 8]
    up = layers["up"]
    assert {key: up[key] for key in EXPECTED_TRANSPOSED} == EXPECTED_TRANSPOSED
    assert up["flops"] == 2 * 16 * 9 * 8 * 4 * 2 * 2

    model_doc = doc["model"]
    assert model_doc["nodes"] == {"Conv": 6, "ConvTranspose": 1}
    assert model_doc["counts"] == {**{name: expected[-1] for name, expected in EXPECTED_LAYERS.items()}, "up": 1}
    assert [s["node"] for s in model_doc["skipped"]] == ["conv_1d"]

    # Every layer on every target ran and matched cv2.dnn; the model's time is the counted sum of the medians.
    medians = {}
    for record in doc["results"]:
        assert record["status"] == "ok" and record["passed"] is True, record
        medians[record["target"], record["layer"]] = record["median_s"]
    totals = {row["target"]: row for row in model_doc["totals"]}
    assert set(totals) == {"cv2dnn", "numpy:0"}
    for target, row in totals.items():
        expected = sum(medians[target, name] * count for name, count in model_doc["counts"].items())
        assert row["layers_run"] == 5 and row["total_s"] == pytest.approx(expected, rel=1e-12)
    assert totals["numpy:0"]["ratio_vs_cv2dnn"] == pytest.approx(totals["numpy:0"]["total_s"] / totals["cv2dnn"]["total_s"])


def test_onnx_layers_merge_by_geometry_and_bias(tmp_path):
    model = tmp_path / "m.onnx"
    _model(model)
    layers = bench.onnx_layers(str(model))
    assert [c.name for c in layers.cases] == [*EXPECTED_LAYERS, "up"]
    assert [c.bias for c in layers.cases] == [True, True, False, False, False]
    assert [c.op for c in layers.cases] == ["conv2d"] * 4 + ["conv_transpose2d"]
    # The same layer as the CLI's --layer spec, so each can be rerun on its own.
    for case in layers.cases:
        assert bench.geometry(bench.parse_layer(bench.format_layer(case))) == bench.geometry(case)


@pytest.mark.parametrize("x_shape, w_shape, attrs", [
    ((1, 3, 5, 4), (3, 2, 3, 3), dict(strides=[2, 2], pads=[0, 1, 2, 1], output_padding=[1, 0])),
    ((1, 3, 5, 4), (3, 2, 3, 4), dict(strides=[2, 3], auto_pad="SAME_UPPER")),  # odd totals: 1 and 1
    ((1, 3, 5, 4), (3, 2, 3, 4), dict(strides=[2, 3], auto_pad="SAME_LOWER")),
    ((1, 3, 5, 4), (3, 2, 4, 3), dict(strides=[3, 2], auto_pad="VALID")),
    ((2, 4, 5, 4), (4, 3, 3, 3), dict(strides=[2, 2], output_shape=[10, 8], group=2)),
    ((2, 4, 5, 4), (4, 3, 3, 3), dict(strides=[2, 2], output_shape=[9, 7], auto_pad="SAME_UPPER", dilations=[1, 2])),
])
def test_conv_transpose_nodes_take_onnx_padding_rules(tmp_path, x_shape, w_shape, attrs):
    """The layer built from a ConvTranspose node computes what onnxruntime computes for the node (onnx's
    ReferenceEvaluator has no groups and ignores output_shape without auto_pad)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from convbackends.reference import conv_transpose2d_float64

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, x_shape).astype(np.float32)
    w = rng.uniform(-1, 1, w_shape).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="t", **attrs)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "t.onnx"
    onnx.save(model, str(path))
    (case,) = bench.onnx_layers(str(path)).cases
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    got = conv_transpose2d_float64(x, w, **case.kwargs)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert bench.geometry(bench.parse_layer(bench.format_layer(case))) == bench.geometry(case)


@pytest.mark.parametrize("content, message", [
    (b"not a model", "cannot read the ONNX model"),
])
def test_a_file_that_is_not_a_model_is_one_line(tmp_path, content, message, capsys):
    from convbackends.__main__ import main

    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    assert main(["bench", "--onnx", str(path), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"convbackends bench: error: {message} {str(path)!r}") and err.count("\n") == 1


def test_a_model_without_conv_nodes_is_refused(tmp_path, capsys):
    from convbackends.__main__ import main

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert main(["bench", "--onnx", str(path), *FAST]) == 2
    assert f"error: {path} has no Conv, ConvTranspose or DeformConv node to benchmark" in capsys.readouterr().err


def _deform_model(path) -> None:
    """A conv predicting offsets (two offset groups) and a sigmoid mask for a DCNv2 DeformConv with bias and
    asymmetric pads, then a DCNv1 DeformConv (no mask, no bias) of one offset group: shapes by inference."""
    rng = np.random.default_rng(1)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.uniform(-1, 1, shape).astype(np.float32), name)

    inits = [weight("Wo", 36, 8, 3, 3), weight("Wm", 18, 8, 3, 3), weight("Wd", 8, 4, 3, 3), weight("Bd", 8),
             weight("Wo1", 18, 8, 3, 3), weight("Wv1", 4, 8, 3, 3)]
    nodes = [
        helper.make_node("Conv", ["x", "Wo"], ["offset"], name="offsets", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wm"], ["m"], name="masks", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["m"], ["mask"]),
        helper.make_node("DeformConv", ["x", "Wd", "offset", "Bd", "mask"], ["y"], name="dcn", group=2,
                         offset_group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["y", "Wo1"], ["offset1"], name="offsets1", strides=[2, 2], pads=[1, 0, 1, 0]),
        helper.make_node("DeformConv", ["y", "Wv1", "offset1"], ["z"], name="dcn_v1", strides=[2, 2],
                         pads=[1, 0, 1, 0]),
    ]
    graph = helper.make_graph(nodes, "deform", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 9, 7])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def test_deform_conv_nodes_become_deform_layers(tmp_path):
    model = tmp_path / "deform.onnx"
    _deform_model(model)
    layers = bench.onnx_layers(str(model))
    assert layers.nodes == {"Conv": 3, "DeformConv": 2} and not layers.skipped
    cases = {c.name: c for c in layers.cases}
    dcn, v1 = cases["dcn"], cases["dcn_v1"]
    assert (dcn.op, dcn.offset_groups, dcn.mask, dcn.bias) == ("deform_conv2d", 2, True, True)
    assert dcn.kwargs["groups"] == 2 and bench.geometry(dcn).output_shape == (1, 8, 9, 7)
    assert (v1.offset_groups, v1.mask, v1.bias) == (1, False, False)
    g = bench.geometry(v1)
    assert (g.sh, g.pt, g.pl, g.pb, g.pr) == (2, 1, 0, 1, 0) and g.output_shape == (1, 4, 5, 3)
    for case in (dcn, v1):  # the same layer as the CLI's --layer spec
        again = bench.parse_layer(bench.format_layer(case))
        assert bench.geometry(again) == bench.geometry(case) and again.offset_groups == case.offset_groups
    # End to end: both layers run on numpy and onnxruntime (which has DeformConv) and match the float64 oracle.
    report = bench.run([dcn, v1], bench.targets("numpy", None, "onnxruntime"), suite_name="onnx", repeats=1,
                       warmup=0, isolate=False, model=layers)
    ran = [r for r in report.records if r.target in ("numpy:0", "onnxruntime")]
    assert len(ran) == 4 and all(r.status == "ok" and r.passed for r in ran), ran
