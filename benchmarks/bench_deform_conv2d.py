"""Benchmark deform_conv2d (DCNv2: offsets and a mask) forward and backward on convbackends' backends beside
onnxruntime's DeformConv (forward) and torchvision's deform_conv2d (forward and backward), in one run.

    python benchmarks/bench_deform_conv2d.py --md docs/benchmarks-deform.md
    python benchmarks/bench_deform_conv2d.py --backends numpy,opencl --repeats 5 --layers 256x14
    python benchmarks/bench_deform_conv2d.py --threads 1      # every peer and BLAS on one thread

Per layer and target: one cold call, `--warmup` untimed calls, then the median of `--repeats` timed calls,
numpy (or CPU tensors) in and out. Backward is the five gradients of the linear op for a given grad_y; for
torchvision the forward that builds its graph is run untimed before each timed backward. Every convbackends
output is checked against onnxruntime's (max abs error <= 1e-4 * max(1, max|reference|)).
`SUITE` is the layer list for a `convbackends bench` deform suite.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass


def _threads_from_argv() -> int | None:
    """--threads N, read before numpy loads: BLAS takes its thread count from the environment at import."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--threads"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


THREADS = _threads_from_argv() if __name__ == "__main__" else None
if THREADS:
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(THREADS)
    if hasattr(os, "sched_setaffinity"):  # and THREADS cores: convbackends' own copy threads follow the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])

import numpy as np  # noqa: E402

import convbackends as cb  # noqa: E402
from convbackends.parity import compare  # noqa: E402


@dataclass(frozen=True)
class Layer:
    """A 3x3, stride 1, pad 1 DCNv2 layer with C -> C channels and one offset group."""

    name: str
    n: int
    c: int
    h: int
    w: int

    def tensors(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1, 1, (self.n, self.c, self.h, self.w)).astype(np.float32)
        w = rng.uniform(-1, 1, (self.c, self.c, 3, 3)).astype(np.float32) / np.float32(3 * self.c ** 0.5)
        b = rng.uniform(-1, 1, self.c).astype(np.float32)
        offset = rng.uniform(-2, 2, (self.n, 18, self.h, self.w)).astype(np.float32)
        mask = rng.uniform(0, 1, (self.n, 9, self.h, self.w)).astype(np.float32)
        grad_y = rng.uniform(-1, 1, (self.n, self.c, self.h, self.w)).astype(np.float32)
        return x, w, b, offset, mask, grad_y

    @property
    def gflop(self) -> float:
        return 2 * self.n * self.c * self.c * 9 * self.h * self.w / 1e9


# DCNv2 ResNet-50 stage layers (3x3, C -> C) and a batched one.
SUITE = [
    Layer("128x28", 1, 128, 28, 28),
    Layer("256x14", 1, 256, 14, 14),
    Layer("512x7", 1, 512, 7, 7),
    Layer("256x56", 1, 256, 56, 56),
    Layer("4x64x56", 4, 64, 56, 56),
]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_TEXT = {"wall": "wall clock",
              "cpu": "process's CPU time (with --threads 1: immune to other processes' load, not to shared caches)"}
clock = time.perf_counter


def median_ms(fn, warmup: int, repeats: int, before=None) -> float:
    """Median time of fn() in ms by `clock`; `before()` runs untimed ahead of each call (warm-up calls included)."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before:
            before()
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times) * 1e3


def onnxruntime_forward(layer: Layer, w, b):
    """An onnxruntime session running DeformConv (opset 19) for this layer: returns run(x, offset, mask)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    shape = [layer.n, layer.c, layer.h, layer.w]
    node = helper.make_node("DeformConv", ["x", "W", "offset", "B", "mask"], ["y"], kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "deform",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, [layer.n, 18, layer.h, layer.w]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [layer.n, 9, layer.h, layer.w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = ort.SessionOptions()
    if THREADS:
        options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x, offset, mask: session.run(None, {"x": x, "offset": offset, "mask": mask})[0]


def torchvision_peer():
    """(forward(x, offset, mask, w, b), backward(...) timing pair) from torchvision, or None when missing."""
    try:
        import torch
        from torchvision.ops import deform_conv2d
    except Exception:  # not installed, or a build that does not load (its C ops missing)
        return None
    if THREADS:
        torch.set_num_threads(THREADS)
    return torch, deform_conv2d


def run(layers, backends, warmup: int, repeats: int) -> list[dict]:
    rows = []
    tv = torchvision_peer()
    for layer in layers:
        x, w, b, offset, mask, grad_y = layer.tensors()
        ort_run = onnxruntime_forward(layer, w, b)
        reference = ort_run(x, offset, mask)
        results = {"onnxruntime": (median_ms(lambda: ort_run(x, offset, mask), warmup, repeats), None)}
        for backend in backends:
            with cb.DeformConv2d(w, b, padding=1, backend=backend) as dcn:
                y = dcn(x, offset, mask)  # the cold call
                _, _, _, passed, detail = compare(np.asarray(y), reference.astype(np.float64))
                if not passed:
                    raise SystemExit(f"{backend} on {layer.name}: {detail}")
                forward = median_ms(lambda: dcn(x, offset, mask), warmup, repeats)
                with cb.DeformConv2d(w, padding=1, backend=backend) as linear:
                    linear.backward(grad_y, x, offset, mask)
                    backward = median_ms(lambda: linear.backward(grad_y, x, offset, mask), warmup, repeats)
            results[backend] = (forward, backward)
        if tv is not None:
            torch, deform_conv2d = tv
            tensors = [torch.from_numpy(a) for a in (x, offset, mask, w, b)]
            tx, toff, tmask, tw, tb = tensors
            with torch.inference_mode():
                forward = median_ms(lambda: deform_conv2d(tx, toff, tw, tb, padding=1, mask=tmask), warmup, repeats)
            leaves = [t.clone().requires_grad_() for t in tensors]
            gy = torch.from_numpy(grad_y)
            graph = {}

            def build():
                lx, loff, lmask, lw, lb = leaves
                graph["y"] = deform_conv2d(lx, loff, lw, lb, padding=1, mask=lmask)

            backward = median_ms(lambda: torch.autograd.grad(graph["y"], leaves, gy), warmup, repeats, before=build)
            results["torchvision"] = (forward, backward)
        for target, (forward, backward) in results.items():
            rows.append(dict(layer=layer.name, shape=f"N{layer.n} {layer.c}->{layer.c} {layer.h}x{layer.w}",
                             target=target, forward_ms=forward, backward_ms=backward,
                             forward_vs_ort=results["onnxruntime"][0] / forward,
                             backward_vs_torchvision=(results["torchvision"][1] / backward
                                                      if backward and "torchvision" in results else None)))
        print(f"{layer.name}: " + ", ".join(f"{t} {f:.1f}/{'-' if bw is None else f'{bw:.1f}'} ms"
                                             for t, (f, bw) in results.items()), file=sys.stderr)
    return rows


def markdown(rows, warmup: int, repeats: int, clock_name: str) -> str:
    columns = ("layer", "shape", "target", "forward ms", "backward ms", "forward: ort time / this",
               "backward: torchvision time / this")
    lines = [
        "# deform_conv2d benchmark (DCNv2, 3x3, pad 1, one offset group, with mask)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"threads: {THREADS or 'each library its default'}",
        f"- method: per layer and target one cold call, {warmup} warm-up call(s), then the median of {repeats} "
        f"calls, side by side in one process, timed by the {CLOCK_TEXT[clock_name]}. "
        "Ratios > 1: this target is faster than the peer.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in rows:
        def fmt(v, spec=".2f"):
            return "-" if v is None else format(v, spec)
        lines.append("| " + " | ".join((r["layer"], r["shape"], r["target"], fmt(r["forward_ms"]),
                                        fmt(r["backward_ms"]), fmt(r["forward_vs_ort"]),
                                        fmt(r["backward_vs_torchvision"]))) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy", help="comma-separated convbackends backends (numpy)")
    parser.add_argument("--layers", help="comma-separated layer names of SUITE (all)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--md", metavar="FILE", help="write the markdown table here instead of stdout")
    parser.add_argument("--threads", type=int,
                        help="threads for BLAS, onnxruntime and torch, and as many cores for the process (all)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the process's CPU time (for --threads 1 on a loaded machine)")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    layers = SUITE if not args.layers else [l for l in SUITE if l.name in args.layers.split(",")]
    rows = run(layers, [b.strip() for b in args.backends.split(",") if b.strip()], args.warmup, args.repeats)
    text = markdown(rows, args.warmup, args.repeats, args.clock)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
