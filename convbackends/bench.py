"""Layer suites and the benchmark engine behind `convbackends bench` and benchmarks/bench_conv2d.py.

A benchmark case is a `parity.Case` (same tensors, same check), so a benchmarked layer is checked
against cv2.dnn exactly as the tests check it. Every target, a backend's device or a peer, is
prepared once per layer and then timed with the same loop. rich and matplotlib are imported only
where a table or a plot is drawn.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata

import numpy as np

from . import __version__
from .backends import unsupported
from .runtime import available_backends, check_name, get_backend
from .runtime.numpy import num_threads, set_num_threads
from .ops.conv_transpose2d import ConvTranspose2dSpec
from .ops.deform_conv2d import DeformConv2dSpec
from .parity import Case, compare, reference_output
from .spec import Conv2dSpec

SCHEMA_VERSION = 1
BASELINE = "cv2dnn"

LAYER_SPEC_HELP = """\
A layer is comma-separated key=value pairs:
  c=IN o=OUT k=K hw=H[xW] (or h=H,w=W)   required
  n=BATCH s=STRIDE p=PAD d=DILATION g=GROUPS name=TEXT   optional (1, 1, 0, 1, 1)
  op=conv2d|conv_transpose2d|deform_conv2d   the op (conv2d); a transposed layer also takes
      opad=OUTPUT_PADDING (0); a deformable one og=OFFSET_GROUPS (1), mask=1|0 (1: DCNv2), off=SCALE
      (offsets drawn from U(-SCALE, SCALE), 2) and bwd=1 to time its five gradients instead of the forward (0)
k, s, d and opad take N or HxW; p takes N, PHxPW or TOPxLEFTxBOTTOMxRIGHT.
Example: name=my3x3,c=64,hw=56,o=64,k=3,p=1"""

# Each op's spec class: its `create(w, **case.kwargs)` validates a case, its geometry gives shapes and flops.
OP_SPECS = {"conv2d": Conv2dSpec, "conv_transpose2d": ConvTranspose2dSpec, "deform_conv2d": DeformConv2dSpec}
DEFORM_KEYS = ("og", "mask", "off", "bwd")


class LayerSpecError(ValueError):
    """A malformed --layer value; the message names the value and what is wrong with it."""


def _ints(key: str, text: str, counts: tuple[int, ...]) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) not in counts or not all(p.strip().isdigit() for p in parts):
        shapes = " or ".join("x".join(["N"] * c) for c in counts)
        raise LayerSpecError(f"{key} must be {shapes} (non-negative integers), got {text!r}")
    return tuple(int(p) for p in parts)


def _pair(key: str, text: str) -> tuple[int, int]:
    values = _ints(key, text, (1, 2))
    return (values[0], values[0]) if len(values) == 1 else values


def parse_layer(text: str, seed: int = 0) -> Case:
    """Parse the compact layer spec (LAYER_SPEC_HELP) into a benchmark case, validated by Conv2dSpec."""
    try:
        return _parse_layer(text, seed)
    except LayerSpecError as exc:
        raise LayerSpecError(f"invalid layer {text!r}: {exc}") from None


def _parse_layer(text: str, seed: int) -> Case:
    allowed = ("name", "op", "n", "c", "h", "w", "hw", "o", "k", "s", "p", "d", "g", "opad", *DEFORM_KEYS)
    fields_ = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise LayerSpecError(f"{item.strip()!r} is not key=value")
        if key not in allowed:
            raise LayerSpecError(f"unknown key {key!r} (keys: {', '.join(allowed)})")
        if key in fields_:
            raise LayerSpecError(f"key {key!r} is given twice")
        fields_[key] = value
    if "hw" in fields_ and ({"h", "w"} & fields_.keys()):
        raise LayerSpecError("give hw=, or h= and w=, not both")
    if "hw" in fields_:
        h, w = _pair("hw", fields_["hw"])
    else:
        h, w = (_ints(k, fields_[k], (1,))[0] if k in fields_ else None for k in ("h", "w"))
    for key in ("c", "o", "k"):
        if key not in fields_:
            raise LayerSpecError(f"missing {key}=")
    if h is None or w is None:
        raise LayerSpecError("missing hw= (or h= and w=)")
    op = fields_.get("op", "conv2d")
    if op not in OP_SPECS:
        raise LayerSpecError(f"op must be one of {', '.join(OP_SPECS)}, got {op!r}")
    if "opad" in fields_ and op != "conv_transpose2d":
        raise LayerSpecError("opad= (output_padding) is for op=conv_transpose2d only")
    deform = {}
    if op == "deform_conv2d":
        deform = dict(offset_groups=_ints("og", fields_.get("og", "1"), (1,))[0],
                      mask=_flag("mask", fields_.get("mask", "1")), offset_scale=_scale(fields_.get("off", "2")),
                      backward=_flag("bwd", fields_.get("bwd", "0")))
    elif DEFORM_KEYS & fields_.keys():
        raise LayerSpecError(f"{', '.join(k + '=' for k in DEFORM_KEYS if k in fields_)} for op=deform_conv2d only")
    n, c, o, g = (_ints(k, fields_.get(k, "1"), (1,))[0] for k in ("n", "c", "o", "g"))
    kh, kw = _pair("k", fields_["k"])
    stride, dilation = (_pair(k, fields_.get(k, "1")) for k in ("s", "d"))
    pads = _ints("p", fields_.get("p", "0"), (1, 2, 4))
    pads = pads * 4 if len(pads) == 1 else pads * 2 if len(pads) == 2 else pads
    kwargs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": g}
    if g < 1 or c % g:
        raise LayerSpecError(f"g={g} must be >= 1 and divide c={c}")
    if op == "conv_transpose2d":
        if o % g:
            raise LayerSpecError(f"g={g} must divide o={o}")
        kwargs["output_padding"] = _pair("opad", fields_.get("opad", "0"))
        w_shape = (c, o // g, kh, kw)  # ConvTranspose's (in, out/groups, kh, kw)
    else:
        w_shape = (o, c // g, kh, kw)
    # The default name is the spec itself, compacted: "c=64,hw=56,o=64,k=3" -> "c64-hw56-o64-k3".
    name = fields_.pop("name", None) or "-".join(f"{k}{v}" for k, v in fields_.items())
    case = Case(name, (n, c, h, w), w_shape, True, kwargs, seed, op, **deform)
    try:
        geometry(case)
    except (TypeError, ValueError) as exc:
        raise LayerSpecError(str(exc)) from None
    return case


def format_layer(case: Case) -> str:
    """The compact spec of a case: parse_layer(format_layer(case)) gives the same layer."""
    g = geometry(case)
    text = (f"name={case.name},n={g.n},c={g.c},hw={g.h}x{g.w},o={g.o},k={g.kh}x{g.kw},s={g.sh}x{g.sw},"
            f"p={g.pt}x{g.pl}x{g.pb}x{g.pr},d={g.dh}x{g.dw},g={g.groups}")
    if case.op == "conv_transpose2d":
        text += f",op={case.op},opad={g.oph}x{g.opw}"
    if case.op == "deform_conv2d":
        text += (f",op={case.op},og={case.offset_groups},mask={int(case.mask)},off={case.offset_scale:g},"
                 f"bwd={int(case.backward)}")
    return text


def _flag(key: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise LayerSpecError(f"{key} must be 0 or 1, got {text!r}")
    return text == "1"


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise LayerSpecError(f"off must be a finite number >= 0, got {text!r}")
    return value


def spec(case: Case):
    """The layer's spec (Conv2dSpec, ConvTranspose2dSpec, DeformConv2dSpec: the case's op), without drawing its
    tensors."""
    return OP_SPECS[case.op].create(np.empty(case.w_shape, np.float32), **case.kwargs)


def geometry(case: Case):
    """The layer's resolved geometry: shapes, pads, flops (a deformable layer's with its offsets and mask)."""
    if case.op == "deform_conv2d":
        offset, mask = case.inputs()
        return spec(case).geometry(case.x_shape, offset.shape, None if mask is None else mask.shape)
    return spec(case).geometry(case.x_shape)


def flops(case: Case) -> int:
    """What the case computes: its geometry's flops; a backward case's two GEMMs (dcol = W^T grad_y and
    grad_w = grad_y col^T) each as many as the forward's."""
    return geometry(case).flops * (2 if case.backward else 1)


def arguments(case: Case) -> tuple:
    """The timed call's arguments: (x, *case.inputs()), or for a backward case (grad_y, x, offset, mask)."""
    x, _, _ = case.tensors()
    if not case.backward:
        return (x, *case.inputs())
    grad_y = np.random.default_rng([case.seed, 2]).uniform(-1, 1, geometry(case).output_shape).astype(np.float32)
    return (grad_y, x, *case.inputs())


def _suite(*specs: str) -> list[Case]:
    return [parse_layer(spec, seed) for seed, spec in enumerate(specs)]


def _vgg16() -> list[Case]:
    """Every distinct 3x3 layer of VGG-16 at 224x224."""
    return _suite(*(f"name=vgg16-{hw}-{c}-{o},c={c},hw={hw},o={o},k=3,p=1" for c, o, hw in (
        (3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
        (256, 512, 28), (512, 512, 28), (512, 512, 14))))


def _resnet50() -> list[Case]:
    """Every distinct convolution of ResNet-50 v1.5 (stride on the 3x3) at 224x224."""
    specs = ["name=resnet50-stem,c=3,hw=224,o=64,k=7,s=2,p=3"]
    for width, hw, first_in in ((64, 56, 64), (128, 28, 256), (256, 14, 512), (512, 7, 1024)):
        out, stride = 4 * width, 1 if width == 64 else 2
        in_hw = hw * stride
        # The first block of a stage takes the previous stage's output (and strides); the others repeat.
        specs += [
            f"name=resnet50-{width}-reduce-first,c={first_in},hw={in_hw},o={width},k=1",
            f"name=resnet50-{width}-3x3-first,c={width},hw={in_hw},o={width},k=3,s={stride},p=1",
            f"name=resnet50-{width}-expand,c={width},hw={hw},o={out},k=1",
            f"name=resnet50-{width}-reduce,c={out},hw={hw},o={width},k=1",
        ]
        if stride == 2:
            specs += [
                f"name=resnet50-{width}-shortcut,c={first_in},hw={in_hw},o={out},k=1,s=2",
                f"name=resnet50-{width}-3x3,c={width},hw={hw},o={width},k=3,p=1",
            ]
    return _suite(*specs)


def _mobilenetv2() -> list[Case]:
    """Every distinct convolution of MobileNetV2 (width 1.0) at 224x224: expand, depthwise, project."""
    specs = ["name=mbv2-stem,c=3,hw=224,o=32,k=3,s=2,p=1"]
    c, hw = 32, 112
    for t, out, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(repeats):
            s = stride if i == 0 else 1
            mid = c * t
            if t != 1:
                specs.append(f"name=mbv2-expand-{c}-{mid}-{hw},c={c},hw={hw},o={mid},k=1")
            specs.append(f"name=mbv2-dw-{mid}-{hw}-s{s},c={mid},hw={hw},o={mid},k=3,s={s},p=1,g={mid}")
            hw //= s
            specs.append(f"name=mbv2-project-{mid}-{out}-{hw},c={mid},hw={hw},o={out},k=1")
            c = out
    specs.append("name=mbv2-head,c=320,hw=7,o=1280,k=1")
    return _suite(*dict.fromkeys(specs))


def _standard() -> list[Case]:
    """The foundation issue's suite: one layer of each kind a user meets."""
    return _suite(
        "name=vgg16-3x3-224-64,c=64,hw=224,o=64,k=3,p=1",
        "name=vgg16-3x3-56-256,c=256,hw=56,o=256,k=3,p=1",
        "name=vgg16-3x3-14-512,c=512,hw=14,o=512,k=3,p=1",
        "name=resnet50-stem-7x7s2,c=3,hw=224,o=64,k=7,s=2,p=3",
        "name=resnet50-1x1-56-64-256,c=64,hw=56,o=256,k=1",
        "name=resnet50-3x3s2-56-128,c=128,hw=56,o=128,k=3,s=2,p=1",
        "name=mbv2-dw3x3-56-144,c=144,hw=56,o=144,k=3,p=1,g=144",
        "name=mbv2-dw3x3s2-112-96,c=96,hw=112,o=96,k=3,s=2,p=1,g=96",
        "name=resnext-3x3-g32-56-256,c=256,hw=56,o=256,k=3,p=1,g=32",
        "name=deeplab-3x3d2-28-256,c=256,hw=28,o=256,k=3,p=2,d=2",
        "name=batch8-3x3-56-64,n=8,c=64,hw=56,o=64,k=3,p=1",
    )


def _smoke() -> list[Case]:
    """Small layers of each algorithm family: the whole suite runs in seconds."""
    return _suite(
        "name=smoke-3x3,c=16,hw=24,o=32,k=3,p=1",
        "name=smoke-1x1,c=32,hw=24,o=64,k=1",
        "name=smoke-dw3x3s2,c=32,hw=24,o=32,k=3,s=2,p=1,g=32",
        "name=smoke-g4-d2,n=2,c=16,hw=20x18,o=16,k=3,p=2,d=2,g=4",
    )


def _conv_transpose2d() -> list[Case]:
    """Issue 10's transposed layers: DCGAN generator, U-Net up-convolution, FCN depthwise upsampling, a 3x3 s2
    with output_padding."""
    t = "op=conv_transpose2d"
    return _suite(
        f"name=dcgan-4x4s2-8-512-256,{t},c=512,hw=8,o=256,k=4,s=2,p=1",
        f"name=dcgan-4x4s2-16-256-128-n4,{t},n=4,c=256,hw=16,o=128,k=4,s=2,p=1",
        f"name=unet-2x2s2-64-256-128,{t},c=256,hw=64,o=128,k=2,s=2",
        f"name=fcn-dw4x4s2-64-21,{t},c=21,hw=64,o=21,k=4,s=2,p=1,g=21",
        f"name=3x3s2-opad1-32-128-64,{t},c=128,hw=32,o=64,k=3,s=2,p=1,opad=1",
    )


def _deform() -> list[Case]:
    """Issue 11's DCNv2 layers (3x3, pad 1, one offset group, a mask, offsets U(-2, 2)): ResNet-50 stage
    layers 128 at 28x28, 256 at 14x14, 512 at 7x7, an FPN level 256 at 56x56 and batch 4 of 64 at 56x56; each
    forward, then backward (its five gradients)."""
    layers = [(f"{c}x{hw}" if n == 1 else f"n{n}-{c}x{hw}", n, c, hw)
              for n, c, hw in ((1, 128, 28), (1, 256, 14), (1, 512, 7), (1, 256, 56), (4, 64, 56))]
    return _suite(*(f"name=dcnv2-{name}{'-backward' if bwd else ''},op=deform_conv2d,n={n},c={c},hw={hw},o={c},"
                    f"k=3,p=1,og=1,mask=1,off=2,bwd={bwd}" for bwd in (0, 1) for name, n, c, hw in layers))


SUITE_BUILDERS = {"smoke": _smoke, "standard": _standard, "vgg16": _vgg16, "resnet50": _resnet50,
                  "mobilenetv2": _mobilenetv2, "conv_transpose2d": _conv_transpose2d, "deform": _deform}


def suite(name: str) -> list[Case]:
    if name not in SUITE_BUILDERS:
        raise ValueError(f"unknown suite {name!r} (suites: {', '.join(SUITE_BUILDERS)})")
    return SUITE_BUILDERS[name]()


# --- the layers of an ONNX model ------------------------------------------------------------------

class UnsupportedNode(ValueError):
    """A node of a layer-building op type that cannot become a benchmark layer; the message says why."""


@dataclass
class ModelLayers:
    """The distinct layers of an ONNX model, each with how many of its nodes it stands for."""

    path: str
    cases: list[Case]
    counts: dict[str, int]  # layer name -> nodes
    nodes: dict[str, int]  # op type -> nodes read
    skipped: list[dict]  # {"node", "op_type", "reason"}: nodes not benchmarked

    def to_json(self) -> dict:
        return {"path": self.path, "nodes": self.nodes, "counts": self.counts, "skipped": self.skipped}


def _onnx_attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _input_shapes(node, shapes: dict[str, list], op: str) -> tuple[list, list]:
    """The fixed shapes of a convolution node's input and weight; a symbolic batch size is taken as 1."""
    x, w = (shapes.get(node.input[i]) for i in (0, 1))
    if x is None or w is None:
        raise UnsupportedNode("shape inference gave no shape for its input or weight")
    if len(x) != 4:
        raise UnsupportedNode(f"a {len(x) - 2}-D convolution ({op} takes 2-D)")
    x = [x[0] or 1, *x[1:]]
    if None in x or None in w:
        raise UnsupportedNode(f"input {x} or weight {w} has a size that is not fixed")
    return x, w


def _checked(case: Case, attrs: dict, w: list) -> None:
    try:
        g = geometry(case)
    except (TypeError, ValueError) as exc:
        raise UnsupportedNode(str(exc)) from None
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != (g.kh, g.kw):
        raise UnsupportedNode(f"kernel_shape {attrs['kernel_shape']} differs from the weight's {w}")


def _conv_case(node, shapes: dict[str, list], name: str, seed: int) -> Case:
    """An ONNX Conv node as a conv2d layer; a symbolic batch size is taken as 1."""
    x, w = _input_shapes(node, shapes, "conv2d")
    attrs = _onnx_attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
    kwargs = {"stride": tuple(attrs.get("strides", (1, 1))), "dilation": tuple(attrs.get("dilations", (1, 1))),
              "groups": attrs.get("group", 1)}
    padding = {"NOTSET": tuple(attrs.get("pads", (0, 0, 0, 0))), "VALID": "valid", "SAME_UPPER": "same",
               "SAME_LOWER": "same"}.get(auto_pad)
    if padding is None:
        raise UnsupportedNode(f"auto_pad {auto_pad!r}")
    case = Case(name, tuple(x), tuple(w), _has_bias(node), {**kwargs, "padding": padding}, seed)
    _checked(case, attrs, w)
    if auto_pad == "SAME_LOWER":  # the SAME_UPPER pads with the odd one at the start instead of the end
        g = geometry(case)
        case = Case(name, case.x_shape, case.w_shape, case.bias, {**kwargs, "padding": (g.pb, g.pr, g.pt, g.pl)}, seed)
    return case


def _has_bias(node) -> bool:
    return len(node.input) > 2 and node.input[2] != ""


def _conv_transpose_case(node, shapes: dict[str, list], name: str, seed: int) -> Case:
    """An ONNX ConvTranspose node as a conv_transpose2d layer, pads made explicit as the operator defines
    them: `pads` (none for VALID), unless `output_shape` or SAME_UPPER/SAME_LOWER (output = input * stride)
    ask for an output size, whose padding goes with the odd row/column at the end for SAME_UPPER, at the
    start otherwise."""
    x, w = _input_shapes(node, shapes, "conv_transpose2d")
    attrs = _onnx_attributes(node)
    strides, dilations = list(attrs.get("strides", (1, 1))), list(attrs.get("dilations", (1, 1)))
    output_padding = list(attrs.get("output_padding", (0, 0)))
    auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedNode(f"auto_pad {auto_pad!r}")
    out = attrs.get("output_shape")
    if out is not None:
        out = list(out)[-2:]
    full = [s * (n - 1) + op + d * (k - 1) + 1
            for s, n, op, d, k in zip(strides, x[2:], output_padding, dilations, w[2:])]
    if out is None and auto_pad in ("NOTSET", "VALID"):
        pads = list(attrs.get("pads", (0, 0, 0, 0))) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    else:
        totals = [f - want for f, want in zip(full, out or [n * s for n, s in zip(x[2:], strides)])]
        if min(totals) < 0:
            raise UnsupportedNode(f"output size {out or 'input * stride'} is larger than the layer reaches unpadded")
        odd_at_end = auto_pad == "SAME_UPPER"
        begin = [t // 2 if odd_at_end else t - t // 2 for t in totals]
        pads = begin + [t - b for t, b in zip(totals, begin)]
    kwargs = {"stride": tuple(strides), "dilation": tuple(dilations), "groups": attrs.get("group", 1),
              "padding": tuple(pads), "output_padding": tuple(output_padding)}
    case = Case(name, tuple(x), tuple(w), _has_bias(node), kwargs, seed, "conv_transpose2d")
    _checked(case, attrs, w)
    return case


def _deform_conv_case(node, shapes: dict[str, list], name: str, seed: int) -> Case:
    """An ONNX DeformConv node (opset 19) as a deform_conv2d layer: its offset groups from the offset input's
    channels, a mask where input 4 is given; offsets and mask are drawn like any case's (the suite's U(-2, 2))."""
    x, w = _input_shapes(node, shapes, "deform_conv2d")
    attrs = _onnx_attributes(node)
    taps = w[2] * w[3]
    offset = shapes.get(node.input[2])
    if offset is None or len(offset) != 4 or offset[1] is None:
        raise UnsupportedNode("shape inference gave no fixed channel count for its offset input")
    if offset[1] % (2 * taps):
        raise UnsupportedNode(f"offset has {offset[1]} channels, not a multiple of 2*kh*kw = {2 * taps}")
    kwargs = {"stride": tuple(attrs.get("strides", (1, 1))), "dilation": tuple(attrs.get("dilations", (1, 1))),
              "groups": attrs.get("group", 1), "padding": tuple(attrs.get("pads", (0, 0, 0, 0)))}
    has_bias, has_mask = (len(node.input) > i and node.input[i] != "" for i in (3, 4))  # B is input 3 here
    case = Case(name, tuple(x), tuple(w), has_bias, kwargs, seed, "deform_conv2d", offset[1] // (2 * taps),
                has_mask, 2.0)
    _checked(case, attrs, w)
    return case


# ONNX op type -> layer builder.
ONNX_LAYER_BUILDERS = {"Conv": _conv_case, "ConvTranspose": _conv_transpose_case, "DeformConv": _deform_conv_case}


def _onnx_shapes(graph) -> dict[str, list]:
    """Every tensor's shape that the graph declares or shape inference found; None for a size not fixed."""
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    return shapes


def onnx_layers(path: str) -> ModelLayers:
    """Every layer-building node of the model's main graph, shapes from onnx.shape_inference, merged into
    distinct layers (the same geometry and bias). The tensors are drawn like any case's, not the model's."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise ValueError("--onnx needs onnx: pip install 'convbackends[reference]'") from None
    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
    except Exception as exc:  # a file that is not a model: onnx raises DecodeError, ValidationError, ...
        raise ValueError(f"cannot read the ONNX model {path!r}: {type(exc).__name__}: {exc}") from None
    shapes = _onnx_shapes(model.graph)
    cases, counts, nodes, skipped, by_layer = [], {}, {}, [], {}
    for index, node in enumerate(model.graph.node):
        builder = ONNX_LAYER_BUILDERS.get(node.op_type)
        if builder is None:
            continue
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
        label = node.name or f"{node.op_type}_{index}"
        try:
            case = builder(node, shapes, label, len(cases))
        except UnsupportedNode as exc:
            skipped.append({"node": label, "op_type": node.op_type, "reason": str(exc)})
            continue
        key = (node.op_type, geometry(case), case.bias)
        if key not in by_layer:
            while case.name in counts:  # node names need not be unique
                case = replace(case, name=case.name + "'")
            by_layer[key] = case.name
            cases.append(case)
        counts[by_layer[key]] = counts.get(by_layer[key], 0) + 1
    return ModelLayers(path, cases, counts, nodes, skipped)


# --- targets -------------------------------------------------------------------------------------

@dataclass
class BackendTarget:
    """One device of one convbackends backend (the prepared layer is the case's op object), or a backend that is
    unavailable here (index None) with the reason."""

    backend: str
    index: int | None
    device: str
    reason: str = ""
    kind: str = "backend"

    @property
    def id(self) -> str:
        return self.backend if self.index is None else f"{self.backend}:{self.index}"

    def unavailable(self) -> str | None:
        return self.reason or None

    def supports(self, case: Case) -> str | None:
        backend = get_backend(self.backend)
        return unsupported(case.op, backend, spec(case), backend.select(self.index))

    def prepare(self, case: Case, w, b):
        layer = case.layer(w, b, backend=self.backend, device=self.index)
        return _Gradients(layer) if case.backward else layer


class _Gradients:
    """A layer timed by its backward: profile(grad_y, x, offset, mask) -> (the five gradients, seconds)."""

    def __init__(self, layer):
        self.layer = layer

    def profile(self, *arguments):
        return self.layer.profile_backward(*arguments)

    def close(self) -> None:
        self.layer.close()


def _split(value: str | None) -> list[str]:
    return [] if value is None else [v.strip() for v in value.split(",") if v.strip()]


def backend_targets(backends: str | None = None, devices: str | None = None) -> list[BackendTarget]:
    """The devices to run.

    With neither argument: every device of every available backend, plus the unavailable backends
    with their reasons. `backends` ("numpy,opencl" or "none") takes all devices of each; `devices`
    ("opencl:0,vulkan:llvmpipe") one device each, by index or name substring. A backend asked for
    by name but unavailable is an error (BackendUnavailable, a ValueError, with the reason).
    """
    if backends is None and devices is None:
        targets = []
        for name, availability in available_backends().items():
            if availability.available:
                targets += [BackendTarget(name, d.index, d.name) for d in get_backend(name).devices()]
            else:
                targets.append(BackendTarget(name, None, "", availability.reason))
        return targets
    chosen: list[tuple[str, object]] = []
    for name in ([] if backends is None or backends.strip().lower() == "none" else _split(backends)):
        chosen.append((check_name(name), None))
    for item in _split(devices):
        name, sep, selector = item.partition(":")
        if not sep or not selector:
            raise ValueError(f"device {item!r} must be BACKEND:INDEX or BACKEND:NAME, e.g. opencl:0 or vulkan:llvmpipe")
        chosen.append((check_name(name), int(selector) if selector.isdigit() else selector))
    targets: dict[str, BackendTarget] = {}
    for name, selector in chosen:
        backend = get_backend(name)
        for d in backend.devices() if selector is None else [backend.select(selector)]:
            targets.setdefault(f"{backend.name}:{d.index}", BackendTarget(backend.name, d.index, d.name))
    return list(targets.values())


def targets(backends: str | None = None, devices: str | None = None, peers: str | None = None) -> list:
    """Everything a run measures: the cv2dnn baseline first, then backend devices, then the other peers."""
    from .peers import select  # peers builds on this module

    chosen = select(peers)
    return chosen[:1] + backend_targets(backends, devices) + chosen[1:]


# --- the run -------------------------------------------------------------------------------------

@dataclass
class Record:
    """One (layer, target) measurement; times in seconds, None where not measured."""

    layer: str
    target: str
    status: str  # "ok", "unsupported" or "error"
    reason: str = ""
    cold_s: float | None = None
    median_s: float | None = None
    min_s: float | None = None
    device_s: float | None = None
    gflops: float | None = None
    device_gflops: float | None = None
    ratio_vs_cv2dnn: float | None = None
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    tol: float | None = None
    passed: bool | None = None


@dataclass
class Report:
    suite: str
    warmup: int
    repeats: int
    isolated: bool
    date: str
    machine: dict
    targets: list[dict]
    layers: list[dict]
    records: list[Record] = field(default_factory=list)
    requested: dict = field(default_factory=dict)  # the --backends, --devices, --peers given; None: the default
    unchecked: str = ""  # why outputs were not checked against cv2.dnn; "" when they were
    model: ModelLayers | None = None  # the ONNX model the layers came from
    threads: int | None = None  # the CPU targets' threads (--threads); None: the cores

    def summary(self) -> list[dict]:
        """Per target: geometric means over its measured layers, and how many passed the check."""
        rows = []
        for t in self.targets:
            if not t["available"]:
                continue
            mine = [r for r in self.records if r.target == t["id"]]
            ratios = [r.ratio_vs_cv2dnn for r in mine if r.ratio_vs_cv2dnn]
            rates = [r.gflops for r in mine if r.gflops]
            rows.append({
                "target": t["id"],
                "geomean_ratio_vs_cv2dnn": _geomean(ratios),
                "geomean_gflops": _geomean(rates),
                "layers_ok": sum(r.status == "ok" for r in mine),
                "checks_passed": sum(bool(r.passed) for r in mine),
                "checks_failed": sum(r.passed is False for r in mine),
            })
        return rows

    def model_totals(self) -> list[dict]:
        """Per target: the model's time, each distinct layer's median times the nodes it stands for
        (None unless every layer ran), and its ratio to cv2dnn's."""
        if self.model is None:
            return []
        rows = []
        for t in self.targets:
            if not t["available"]:
                continue
            medians = {r.layer: r.median_s for r in self.records if r.target == t["id"] and r.median_s}
            ran = [name for name in self.model.counts if name in medians]
            total = (sum(medians[name] * count for name, count in self.model.counts.items())
                     if len(ran) == len(self.model.counts) else None)
            rows.append({"target": t["id"], "total_s": total, "layers_run": len(ran)})
        base = next((row["total_s"] for row in rows if row["target"] == BASELINE), None)
        for row in rows:
            row["ratio_vs_cv2dnn"] = row["total_s"] / base if base and row["total_s"] else None
        return rows

    def backend_failures(self) -> list[Record]:
        """Records of convbackends' own devices that missed the tolerance or raised (peers' do not count)."""
        backends = {t["id"] for t in self.targets if t["kind"] == "backend"}
        return [r for r in self.records if r.target in backends and (r.passed is False or r.status == "error")]

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": f"convbackends {__version__}",
            "date": self.date,
            "machine": self.machine,
            "settings": {"suite": self.suite, "warmup": self.warmup, "repeats": self.repeats, "isolated": self.isolated,
                         "baseline": BASELINE, "tolerance": "1e-4 * max(1, max|reference|)",
                         "checked": not self.unchecked, "threads": self.threads,
                         **{key: self.requested.get(key) for key in ("backends", "devices", "peers")}},
            "targets": self.targets,
            "layers": self.layers,
            "results": [asdict(r) for r in self.records],
            "summary": self.summary(),
            "model": None if self.model is None else {**self.model.to_json(), "totals": self.model_totals()},
        }


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# The distributions that install OpenCV's cv2 package: two of them overwrite each other's files.
OPENCV_DISTRIBUTIONS = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                        "opencv-contrib-python")


def cpu_name() -> str:
    """The CPU's model name (py-cpuinfo, from the `cli` extra), else what the platform module knows."""
    try:
        import cpuinfo
    except ImportError:
        return platform.processor() or platform.machine()
    return cpuinfo.get_cpu_info().get("brand_raw") or platform.machine()


def machine_info() -> dict:
    """What a reader of a saved result needs to compare it: CPU, OS, Python and library versions."""
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    packages = {}
    for dist in ("numpy", *OPENCV_DISTRIBUTIONS, "onnx", "onnxruntime", "torch", "ncnn", "pyopencl", "vulkan",
                 "cupy-cuda12x", "cupy-cuda13x"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:  # what else the machine was running: on a shared machine it moves every timing
        load = [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "memory_gib": memory_gib,
            "load_average": load, "python": platform.python_version(), "packages": packages}


def layer_info(case: Case) -> dict:
    g = geometry(case)
    info = {"name": case.name, "op": case.op, "spec": format_layer(case), "input_shape": list(g.input_shape),
            "output_shape": list(g.output_shape), "kernel": [g.kh, g.kw], "stride": [g.sh, g.sw],
            "pads": [g.pt, g.pl, g.pb, g.pr], "dilation": [g.dh, g.dw], "groups": g.groups, "flops": flops(case)}
    if case.op == "conv_transpose2d":
        info["output_padding"] = [g.oph, g.opw]
    if case.op == "deform_conv2d":
        info.update(offset_groups=g.offset_groups, mask=g.has_mask, offset_scale=case.offset_scale,
                    backward=case.backward)
    return info


def ops_title(report: "Report") -> str:
    """The ops a report's layers run, for its titles: "conv2d", "conv2d + conv_transpose2d"."""
    return " + ".join(dict.fromkeys(layer["op"] for layer in report.layers)) or "conv2d"


def target_info(target) -> dict:
    reason = target.unavailable()
    return {"id": target.id, "kind": target.kind, "device": target.device, "available": reason is None,
            "reason": reason or ""}


def measure(runner, args: tuple, warmup: int, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock seconds of each timed call `runner.profile(*args)` (numpy in, numpy out) and the device
    seconds the API gave."""
    for _ in range(warmup):
        runner.profile(*args)
    wall, device = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        _, seconds = runner.profile(*args)
        wall.append(time.perf_counter() - start)
        if seconds is not None:
            device.append(seconds)
    return wall, device


def reference_unavailable() -> str | None:
    """None when cv2.dnn can check outputs here, else why not and what to install."""
    try:
        import cv2  # noqa: F401
        import onnx  # noqa: F401  (the reference graph is built with it)
    except ModuleNotFoundError as exc:
        return f"{exc.name} is not installed: pip install 'convbackends[reference]'"
    except ImportError as exc:
        return f"the reference does not import ({exc})"
    return None


def _run_one(case: Case, target, warmup: int, repeats: int) -> Record:
    reason = target.supports(case)
    if reason:
        return Record(case.name, target.id, "unsupported", reason)
    unchecked = reference_unavailable()
    runner = None
    if case.backward:
        unchecked = "gradients are checked by the tests (finite differences of the float64 oracle)"
    try:
        _, w, b = case.tensors()
        args = arguments(case)
        ref = None if unchecked else reference_output(case)
        start = time.perf_counter()
        runner = target.prepare(case, w, b)
        y, _ = runner.profile(*args)
        cold = time.perf_counter() - start
        if ref is None:  # timed all the same; the record says why it was not checked
            max_abs = mean_abs = tol = passed = None
            detail = f"not checked: {unchecked}"
        else:
            max_abs, mean_abs, tol, passed, detail = compare(np.asarray(y), ref)
        wall, device = measure(runner, args, warmup, repeats)
    except Exception as exc:  # a peer library or a half-done backend: report it, keep benchmarking the rest
        return Record(case.name, target.id, "error", f"{type(exc).__name__}: {exc}")
    finally:
        if runner is not None:
            runner.close()
    work = flops(case)
    median = statistics.median(wall)
    device_s = statistics.median(device) if device else None
    return Record(case.name, target.id, "ok", detail, cold_s=cold, median_s=median, min_s=min(wall),
                  device_s=device_s, gflops=work / median / 1e9,
                  device_gflops=work / device_s / 1e9 if device_s else None,
                  max_abs_err=max_abs, mean_abs_err=mean_abs, tol=tol, passed=passed)


# The CPU drivers' thread counts: PoCL's pthread device and Mesa's llvmpipe read them when they load.
DRIVER_THREAD_VARIABLES = ("POCL_MAX_PTHREAD_COUNT", "LP_NUM_THREADS")


@contextlib.contextmanager
def _threads(threads: int | None):
    """The numpy backend, BLAS, the CPU peers (they read `get_num_threads`) and the CPU drivers on
    `threads` threads while the target runs; the process's own settings again afterwards."""
    if threads is None:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in DRIVER_THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in DRIVER_THREAD_VARIABLES})
    try:
        with num_threads(threads):
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _records_here(target, cases, warmup, repeats, threads=None):
    with _threads(threads):
        reason = target.unavailable()  # in a worker process: the library's import and probe, before any timing
        if threads is not None:
            set_num_threads(threads)  # again: the probe may have loaded a BLAS of its own (cv2 bundles one)
        for case in cases:
            yield Record(case.name, target.id, "error", reason) if reason else _run_one(case, target, warmup, repeats)


def _worker(target, cases, warmup, repeats, threads, sender) -> None:
    for record in _records_here(target, cases, warmup, repeats, threads):
        sender.send(record)


def _records_isolated(target, cases, warmup, repeats, threads=None):
    """The target's records, measured in a fresh process of its own.

    On a CPU-only machine the stand-in drivers (PoCL, llvmpipe) and the CPU libraries (OpenMP,
    OpenBLAS, onnxruntime) each keep thread pools; in one process the idle pools of one target
    slowed the next by 10-100x on 2 cores. A fresh process per target measures each alone, and a
    driver crash costs only that target's records.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy the parent's driver threads' state
    receiver, sender = context.Pipe(duplex=False)  # send() writes at once: a crash loses no earlier record
    worker = context.Process(target=_worker, args=(target, cases, warmup, repeats, threads, sender), daemon=True)
    worker.start()
    sender.close()  # only the worker holds the write end now, so its end reads as EOF here
    done = 0
    try:
        while done < len(cases):
            try:
                record = receiver.recv()
            except EOFError:
                break
            done += 1
            yield record
    finally:
        receiver.close()
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
    if done < len(cases):
        died = f"the benchmark process died on layer {cases[done].name} (exit code {worker.exitcode})"
        for case in cases[done:]:
            yield Record(case.name, target.id, "error", died)


def run(cases: list[Case], targets: list, *, suite_name: str, warmup: int = 2, repeats: int = 10,
        isolate: bool = True, progress=None, requested: dict | None = None, model: ModelLayers | None = None,
        threads: int | None = None) -> Report:
    """Benchmark every case on every available target; `progress(case, target)` is called after each.

    With `isolate`, each target runs in a process of its own (see _records_isolated). `requested`
    ({"backends", "devices", "peers"}) and the `model` the layers came from go into the report as they are.
    `threads` (None: the cores) is what every CPU target runs on (see _threads): CPU drivers take it
    only in a fresh process, before they load, so in-process it holds for numpy and the peers.
    """
    infos = [target_info(t) for t in targets]
    live = [t for t, info in zip(targets, infos) if info["available"]]
    report = Report(suite_name, warmup, repeats, isolate,
                    datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    machine_info(), infos, [layer_info(c) for c in cases], requested=requested or {},
                    unchecked=reference_unavailable() or "", model=model, threads=threads)
    records = _records_isolated if isolate else _records_here
    by_target = {}
    for target in live:
        by_target[target.id] = []
        for record in records(target, cases, warmup, repeats, threads):
            by_target[target.id].append(record)
            if progress:
                progress(cases[len(by_target[target.id]) - 1], target)
    for i in range(len(cases)):
        row = [by_target[t.id][i] for t in live]
        base = next((r.median_s for r in row if r.target == BASELINE and r.median_s), None)
        for r in row:
            r.ratio_vs_cv2dnn = r.median_s / base if base and r.median_s else None
        report.records += row
    return report


# --- output --------------------------------------------------------------------------------------

TABLE_COLUMNS = ("layer", "target", "GFLOP", "cold ms", "median ms", "device ms", "GFLOP/s", "x cv2.dnn",
                 "max abs err", "check")
SUMMARY_COLUMNS = ("target", "device", "geomean x cv2.dnn", "geomean GFLOP/s", "layers run", "checks")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(seconds, fmt: str) -> str:
    return _num(None if seconds is None else seconds * 1e3, fmt)


def table_rows(report: Report) -> list[tuple[str, ...]]:
    """The per-(layer, target) table as text cells, shared by the terminal and markdown renderings."""
    flops = {layer["name"]: layer["flops"] for layer in report.layers}
    rows = []
    for r in report.records:
        if r.status != "ok":
            check = f"{r.status}: {r.reason}"
        elif r.passed is None:
            check = "not checked"
        else:
            check = "pass" if r.passed else f"FAIL (tol {r.tol:.2g})"
        rows.append((r.layer, r.target, f"{flops[r.layer] / 1e9:.3g}", _ms(r.cold_s, ".2f"),
                     _ms(r.median_s, ".3f"), _ms(r.device_s, ".3f"),
                     _num(r.gflops, ".1f"), _num(r.ratio_vs_cv2dnn, ".2f"), _num(r.max_abs_err, ".2e"), check))
    return rows


def summary_rows(report: Report) -> list[tuple[str, ...]]:
    devices = {t["id"]: t["device"] for t in report.targets}
    return [(s["target"], devices[s["target"]], _num(s["geomean_ratio_vs_cv2dnn"], ".2f"),
             _num(s["geomean_gflops"], ".1f"), f"{s['layers_ok']}/{len(report.layers)}",
             f"{s['checks_passed']} pass, {s['checks_failed']} fail") for s in report.summary()]


FASTEST_COLUMNS = ("layer", "fastest backend", "ms", "x cv2.dnn", "fastest peer", "ms", "x cv2.dnn")


def fastest_rows(report: Report) -> list[tuple[str, ...]]:
    """Per layer, the convbackends target and the peer with the lowest median that passed their check: which
    backend a user on this machine should pick for that kind of layer, and what the best other library does."""
    kinds = {t["id"]: t["kind"] for t in report.targets}
    rows = []
    for layer in report.layers:
        ran = [r for r in report.records if r.layer == layer["name"] and r.median_s and r.passed is not False]
        cells = [layer["name"]]
        for kind in ("backend", "peer"):
            best = min((r for r in ran if kinds[r.target] == kind), key=lambda r: r.median_s, default=None)
            cells += ["-", "-", "-"] if best is None else [best.target, _ms(best.median_s, ".3f"),
                                                            _num(best.ratio_vs_cv2dnn, ".2f")]
        rows.append(tuple(cells))
    return rows


def skipped_lines(report: Report) -> list[str]:
    return [f"{t['id']}: {t['reason']}" for t in report.targets if not t["available"]]


MODEL_COLUMNS = ("target", "device", "model ms (median x nodes)", "x cv2.dnn", "layers run")


def model_title(report: Report) -> str:
    m = report.model
    nodes = ", ".join(f"{count} {op}" for op, count in m.nodes.items())
    return f"model {os.path.basename(m.path)}: {nodes} nodes, {len(m.counts)} distinct layers"


def model_rows(report: Report) -> list[tuple[str, ...]]:
    devices = {t["id"]: t["device"] for t in report.targets}
    return [(row["target"], devices[row["target"]], _ms(row["total_s"], ".3f"), _num(row["ratio_vs_cv2dnn"], ".2f"),
             f"{row['layers_run']}/{len(report.model.counts)}") for row in report.model_totals()]


def skipped_nodes(model: ModelLayers | None) -> list[str]:
    return [f"{s['op_type']} node {s['node']}: {s['reason']}" for s in model.skipped] if model else []


def write_json(report: Report, path: str) -> None:
    import json

    with open(path, "w") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")


def write_csv(report: Report, path: str) -> None:
    """One row per (layer, target): the JSON record plus the layer's spec and flops."""
    layers = {layer["name"]: layer for layer in report.layers}
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["date", *(f.name for f in fields(Record)), "spec", "flops"])
        for r in report.records:
            layer = layers[r.layer]
            writer.writerow([report.date, *asdict(r).values(), layer["spec"], layer["flops"]])


def plot(report: Report, path: str) -> None:
    """Grouped bars: GFLOP/s of each target on each layer; a log axis when rates span over 20x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in report.targets if t["available"]]
    layers = [layer["name"] for layer in report.layers]
    rate = {(r.layer, r.target): r.gflops for r in report.records if r.gflops}
    width = 0.8 / max(1, len(targets))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * len(layers) * len(targets) + 2), 5.5), layout="constrained")
    for i, target in enumerate(targets):
        xs = [j + (i - (len(targets) - 1) / 2) * width for j in range(len(layers))]
        # Peers hatched, convbackends' own devices plain.
        ax.bar(xs, [rate.get((layer, target["id"]), 0.0) for layer in layers], width, label=target["id"],
               hatch="//" if target["kind"] == "peer" else None, edgecolor="white", linewidth=0)
    values = list(rate.values())
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GFLOP/s (median, numpy in/out)")
    ax.set_title(f"{ops_title(report)}, suite {report.suite}: {report.machine['cpu']}, {report.date[:10]} (peers hatched)",
                 fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
