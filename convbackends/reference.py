"""The truth every backend is checked against, never optimised.

`cv2_conv2d` runs OpenCV's dnn module on a one-node ONNX graph (Conv, then the activation node);
`conv2d_float64` is an independent float64 oracle (a direct sum over kernel taps) for what cv2.dnn
lacks and for property tests. cv2.dnn has no DeformConv: deform_conv2d's truth is onnx.reference's
DeformConv (`onnx_deform_conv2d`, slow) and `deform_conv2d_float64`, checked against each other. Both take explicit pads from the spec: cv2.dnn's own SAME ignores
dilation, so "same" is resolved by `Conv2dSpec.geometry` and checked on its own in the tests.
"""
from __future__ import annotations

import numpy as np

from .spec import Activation, Conv2dGeometry, Conv2dSpec

ONNX_OPSET = 18


def _activation_nodes(helper, numpy_helper, activation: Activation, src: str, dst: str, dtype=np.float32):
    """ONNX nodes (and initializers) applying `activation` from tensor `src` to tensor `dst` (of `dtype`)."""
    kind = activation.kind
    if kind == "relu":
        return [helper.make_node("Relu", [src], [dst])], []
    if kind in ("relu6", "clip"):
        lo, hi = (0.0, 6.0) if kind == "relu6" else (activation.alpha, activation.beta)
        bounds = [numpy_helper.from_array(np.array(v, dtype), name=n) for v, n in ((lo, "clip_lo"), (hi, "clip_hi"))]
        return [helper.make_node("Clip", [src, "clip_lo", "clip_hi"], [dst])], bounds
    if kind == "sigmoid":
        return [helper.make_node("Sigmoid", [src], [dst])], []
    if kind == "tanh":
        return [helper.make_node("Tanh", [src], [dst])], []
    if kind == "silu":
        return [helper.make_node("Sigmoid", [src], ["gate"]), helper.make_node("Mul", [src, "gate"], [dst])], []
    if kind == "mish":
        return [helper.make_node("Mish", [src], [dst])], []
    if kind == "hardswish":
        return [helper.make_node("HardSwish", [src], [dst])], []
    if kind == "leaky_relu":
        return [helper.make_node("LeakyRelu", [src], [dst], alpha=activation.alpha)], []
    raise ValueError(f"no ONNX form for activation {kind!r}")


def onnx_conv_model(geom: Conv2dGeometry, w: np.ndarray, b: np.ndarray | None, activation: Activation) -> bytes:
    """A serialized one-node ONNX graph (Conv + activation) for a fixed input shape, explicit pads."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), name="W")]
    conv_inputs = ["x", "W"]
    if b is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(b, np.float32), name="B"))
        conv_inputs.append("B")
    conv_out = "y" if activation.kind == "none" else "conv"
    # ONNX pads are (begin..., end...): (top, left, bottom, right), the order of the spec.
    pads = [geom.pt, geom.pl, geom.pb, geom.pr]
    nodes = []
    if (geom.kh, geom.kw) == (1, 1) and any(pads):
        # cv2.dnn 5.0 leaves the padded border of a padded 1x1 Conv uninitialised (both engines):
        # the same zero padding as an explicit Pad node is computed correctly.
        inits.append(numpy_helper.from_array(np.array([0, 0, geom.pt, geom.pl, 0, 0, geom.pb, geom.pr], np.int64), name="pads"))
        nodes.append(helper.make_node("Pad", ["x", "pads"], ["x_padded"], mode="constant"))
        conv_inputs[0], pads = "x_padded", [0, 0, 0, 0]
    nodes.append(
        helper.make_node(
            "Conv", conv_inputs, [conv_out],
            kernel_shape=[geom.kh, geom.kw], strides=[geom.sh, geom.sw], dilations=[geom.dh, geom.dw],
            pads=pads, group=geom.groups,
        )
    )
    if activation.kind != "none":
        act_nodes, act_inits = _activation_nodes(helper, numpy_helper, activation, conv_out, "y")
        nodes += act_nodes
        inits += act_inits
    graph = helper.make_graph(
        nodes, "conv2d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(geom.input_shape))],
        # OpenCV 5 asserts that graph outputs carry a shape.
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(geom.output_shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    return model.SerializeToString()


def _resolve(x, w, b, kwargs) -> tuple[Conv2dSpec, Conv2dGeometry]:
    spec = Conv2dSpec.create(w, b, **kwargs)
    return spec, spec.geometry(np.shape(x))


def cv2_net(geom: Conv2dGeometry, w, b, activation: Activation, *, winograd: bool = False):
    """A cv2.dnn net for one layer at one input shape, ready for setInput/forward."""
    import cv2

    net = cv2.dnn.readNetFromONNX(np.frombuffer(onnx_conv_model(geom, w, b, activation), np.uint8))
    net.enableWinograd(winograd)
    return net


def cv2_conv2d(x, w, b=None, *, winograd: bool = False, **conv_kwargs) -> np.ndarray:
    """cv2.dnn's float32 result. Winograd is off by default: it is the tighter reference."""
    spec, geom = _resolve(x, w, b, conv_kwargs)
    net = cv2_net(geom, w, b, spec.activation, winograd=winograd)
    net.setInput(np.ascontiguousarray(x, np.float32))
    return net.forward().reshape(geom.output_shape)


def activation_float64(y: np.ndarray, activation: Activation) -> np.ndarray:
    """Activations in float64 from their textbook definitions."""
    kind, alpha, beta = activation.kind, activation.alpha, activation.beta
    with np.errstate(over="ignore"):
        if kind == "none":
            return y
        if kind == "relu":
            return np.maximum(y, 0.0)  # propagates NaN, as cv2.dnn does
        if kind == "relu6":
            return np.clip(y, 0.0, 6.0)
        if kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-y))
        if kind == "tanh":
            return np.tanh(y)
        if kind == "silu":
            return y / (1.0 + np.exp(-y))
        if kind == "mish":
            return y * np.tanh(np.logaddexp(0.0, y))
        if kind == "hardswish":
            return y * np.clip(y / 6.0 + 0.5, 0.0, 1.0)
        if kind == "leaky_relu":
            return np.where(y >= 0, y, alpha * y)
        if kind == "clip":
            return np.clip(y, alpha, beta)
    raise ValueError(f"unknown activation {kind!r}")


def conv2d_float64(x, w, b=None, **conv_kwargs) -> np.ndarray:
    """Direct convolution in float64: one einsum per (group, tap), no im2col, no BLAS tiling."""
    spec, g = _resolve(x, w, b, conv_kwargs)
    x64 = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))
    w64 = np.asarray(w, np.float64)
    y = np.zeros(g.output_shape, np.float64)
    for grp in range(g.groups):
        xs = x64[:, grp * g.cg:(grp + 1) * g.cg]
        ws = w64[grp * g.og:(grp + 1) * g.og]
        for i in range(g.kh):
            for j in range(g.kw):
                top, left = i * g.dh, j * g.dw
                window = xs[:, :, top:top + g.sh * (g.oh - 1) + 1:g.sh, left:left + g.sw * (g.ow - 1) + 1:g.sw]
                y[:, grp * g.og:(grp + 1) * g.og] += np.einsum("nchw,oc->nohw", window, ws[:, :, i, j])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return activation_float64(y, spec.activation)


def _resolve_transposed(x, w, b, kwargs):
    from .ops.conv_transpose2d import ConvTranspose2dSpec

    kwargs = dict(kwargs)
    output_size = kwargs.pop("output_size", None)
    spec = ConvTranspose2dSpec.create(w, b, **kwargs)
    return spec, spec.geometry(np.shape(x), output_size)


def onnx_conv_transpose_model(geom, w: np.ndarray, b: np.ndarray | None, activation: Activation) -> bytes:
    """A serialized one-node ONNX graph (ConvTranspose + activation) for a fixed input shape, explicit
    pads and output_padding."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), name="W")]
    inputs = ["x", "W"]
    if b is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(b, np.float32), name="B"))
        inputs.append("B")
    conv_out = "y" if activation.kind == "none" else "conv"
    nodes = [helper.make_node(
        "ConvTranspose", inputs, [conv_out], kernel_shape=[geom.kh, geom.kw], strides=[geom.sh, geom.sw],
        dilations=[geom.dh, geom.dw], pads=[geom.pt, geom.pl, geom.pb, geom.pr],
        output_padding=[geom.oph, geom.opw], group=geom.groups)]
    if activation.kind != "none":
        act_nodes, act_inits = _activation_nodes(helper, numpy_helper, activation, conv_out, "y")
        nodes += act_nodes
        inits += act_inits
    graph = helper.make_graph(
        nodes, "conv_transpose2d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(geom.input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(geom.output_shape))],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)]).SerializeToString()


def cv2_conv_transpose2d(x, w, b=None, **kwargs) -> np.ndarray:
    """cv2.dnn's float32 result for ONNX ConvTranspose (+ activation)."""
    import cv2

    spec, geom = _resolve_transposed(x, w, b, kwargs)
    net = cv2.dnn.readNetFromONNX(np.frombuffer(onnx_conv_transpose_model(geom, w, b, spec.activation), np.uint8))
    net.setInput(np.ascontiguousarray(x, np.float32))
    return net.forward().reshape(geom.output_shape)


def conv_transpose2d_float64(x, w, b=None, **kwargs) -> np.ndarray:
    """Transposed convolution in float64 by its definition: every input pixel scatters w's taps into the
    uncropped output (stride apart, dilation between taps), then the pads are cut off. No phases."""
    spec, g = _resolve_transposed(x, w, b, kwargs)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    cg, og = g.c // g.groups, g.o // g.groups
    full = np.zeros((g.n, g.o, g.sh * (g.h - 1) + g.dh * (g.kh - 1) + 1 + g.oph,
                     g.sw * (g.w - 1) + g.dw * (g.kw - 1) + 1 + g.opw))
    for grp in range(g.groups):
        xs = x64[:, grp * cg:(grp + 1) * cg]
        for i in range(g.kh):
            for j in range(g.kw):
                contribution = np.einsum("nchw,co->nohw", xs, w64[grp * cg:(grp + 1) * cg, :, i, j])
                full[:, grp * og:(grp + 1) * og, i * g.dh:i * g.dh + g.sh * (g.h - 1) + 1:g.sh,
                     j * g.dw:j * g.dw + g.sw * (g.w - 1) + 1:g.sw] += contribution
    y = full[:, :, g.pt:g.pt + g.oh, g.pl:g.pl + g.ow]
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return activation_float64(y, spec.activation)


def _resolve_deform(x, offset, w, b, mask, kwargs):
    from .ops.deform_conv2d import DeformConv2dSpec

    # The oracle also takes float64 arrays (for finite differences): the spec only needs the shapes.
    spec = DeformConv2dSpec.create(np.empty(np.shape(w), np.float32),
                                   None if b is None else np.empty(np.shape(b), np.float32), **kwargs)
    return spec, spec.geometry(np.shape(x), np.shape(offset), None if mask is None else np.shape(mask))


def _bilinear_float64(image: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """image (N, C, H, W) sampled at the points (ys, xs) (N, P): (N, C, P). A pixel outside the image counts
    as 0, a point with y <= -1, y >= H, x <= -1 or x >= W reads 0, a NaN coordinate reads NaN."""
    n, c, h, w = image.shape
    flat = image.reshape(n, c, h * w)
    out = np.zeros((n, c, ys.shape[1]))
    with np.errstate(invalid="ignore"):
        inside = (ys > -1) & (ys < h) & (xs > -1) & (xs < w)
    y0, x0 = np.floor(np.where(inside, ys, 0)), np.floor(np.where(inside, xs, 0))
    fy, fx = ys - y0, xs - x0
    for row, row_weight in ((y0, 1 - fy), (y0 + 1, fy)):
        for col, col_weight in ((x0, 1 - fx), (x0 + 1, fx)):
            valid = inside & (row >= 0) & (row < h) & (col >= 0) & (col < w)
            index = np.where(valid, row * w + col, 0).astype(np.int64)
            pixels = np.take_along_axis(flat, index[:, None, :], axis=2)
            out += np.where(valid[:, None, :], row_weight[:, None, :] * col_weight[:, None, :] * pixels, 0.0)
    out[np.broadcast_to((np.isnan(ys) | np.isnan(xs))[:, None, :], out.shape)] = np.nan
    return out


def deform_conv2d_float64(x, offset, w, b=None, mask=None, **kwargs) -> np.ndarray:
    """Deformable convolution in float64 by its definition: for each offset group and tap, the bilinear samples
    of that group's channels at the shifted points, scaled by the mask, then one einsum per weight group."""
    spec, g = _resolve_deform(x, offset, w, b, mask, kwargs)
    x64, off64, w64 = (np.asarray(a, np.float64) for a in (x, offset, w))
    taps, cpg = g.kh * g.kw, g.c // g.offset_groups
    rows = (np.arange(g.oh) * g.sh - g.pt)[:, None] + np.zeros((1, g.ow))
    cols = (np.arange(g.ow) * g.sw - g.pl)[None, :] + np.zeros((g.oh, 1))
    sampled = np.zeros((g.n, g.c, g.kh, g.kw, g.oh, g.ow))
    for grp in range(g.offset_groups):
        for i in range(g.kh):
            for j in range(g.kw):
                k = i * g.kw + j
                dy = off64[:, grp * 2 * taps + 2 * k]
                dx = off64[:, grp * 2 * taps + 2 * k + 1]
                ys = (rows + i * g.dh + dy).reshape(g.n, -1)
                xs = (cols + j * g.dw + dx).reshape(g.n, -1)
                values = _bilinear_float64(x64[:, grp * cpg:(grp + 1) * cpg], ys, xs).reshape(g.n, cpg, g.oh, g.ow)
                if mask is not None:
                    values = values * np.asarray(mask, np.float64)[:, grp * taps + k][:, None]
                sampled[:, grp * cpg:(grp + 1) * cpg, i, j] = values
    y = np.zeros(g.output_shape)
    for grp in range(g.groups):
        y[:, grp * g.og:(grp + 1) * g.og] = np.einsum(
            "ncijhw,ocij->nohw", sampled[:, grp * g.cg:(grp + 1) * g.cg], w64[grp * g.og:(grp + 1) * g.og])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return activation_float64(y, spec.activation)


DEFORM_CONV_OPSET = 19


def onnx_deform_conv_model(geom, w: np.ndarray, b: np.ndarray | None, activation: Activation,
                           dtype=np.float64) -> bytes:
    """A serialized ONNX graph of `dtype` (float64: the reference; float32: onnxruntime, a benchmark peer):
    DeformConv (inputs x, offset and, when geom.has_mask, mask) + the activation, explicit pads."""
    from onnx import helper, numpy_helper

    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(np.asarray(w, dtype), name="W")]
    inputs = ["x", "W", "offset", "B" if b is not None else ""]
    if b is not None:
        inits.append(numpy_helper.from_array(np.asarray(b, dtype), name="B"))
    if geom.has_mask:
        inputs.append("mask")
    conv_out = "y" if activation.kind == "none" else "conv"
    nodes = [helper.make_node(
        "DeformConv", inputs, [conv_out], kernel_shape=[geom.kh, geom.kw], strides=[geom.sh, geom.sw],
        dilations=[geom.dh, geom.dw], pads=[geom.pt, geom.pl, geom.pb, geom.pr], group=geom.groups,
        offset_group=geom.offset_groups)]
    if activation.kind != "none":
        act_nodes, act_inits = _activation_nodes(helper, numpy_helper, activation, conv_out, "y", dtype)
        nodes += act_nodes
        inits += act_inits
    graph_inputs = [helper.make_tensor_value_info("x", element, list(geom.input_shape)),
                    helper.make_tensor_value_info("offset", element, list(geom.offset_shape))]
    if geom.has_mask:
        graph_inputs.append(helper.make_tensor_value_info("mask", element, list(geom.mask_shape)))
    graph = helper.make_graph(
        nodes, "deform_conv2d", graph_inputs,
        [helper.make_tensor_value_info("y", element, list(geom.output_shape))], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFORM_CONV_OPSET)]).SerializeToString()


def onnx_deform_conv2d(x, offset, w, b=None, mask=None, **kwargs) -> np.ndarray:
    """onnx.reference's DeformConv (an independent implementation over GridSample), in float64. Slow: per
    output pixel and channel pair; it needs H and W of at least 2 (it normalises by H - 1 and W - 1)."""
    from onnx.reference import ReferenceEvaluator

    spec, geom = _resolve_deform(x, offset, w, b, mask, kwargs)
    feeds = {"x": np.asarray(x, np.float64), "offset": np.asarray(offset, np.float64)}
    if mask is not None:
        feeds["mask"] = np.asarray(mask, np.float64)
    (y,) = ReferenceEvaluator(onnx_deform_conv_model(geom, w, b, spec.activation)).run(None, feeds)
    return y
