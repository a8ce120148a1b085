"""Benchmark sparse_conv3d's device backends against numpy on the issue's layers (bench_sparse_conv3d.LAYERS):
rulebook and compute apart, every call of a layer taking turns with the others' (`side_by_side`), medians of
wall-clock and of CPU time (all threads of this process, PoCL's and llvmpipe's included).

    python benchmarks/bench_sparse_conv3d_devices.py --backends numpy,opencl,vulkan --repeats 7

"rulebook" builds the layer's rulebook from the sites and waits for the device (an OpenCL or CUDA build is
queued work otherwise); "compute" runs a layer on a built rulebook, numpy features in and out; "layer" is a
whole call on a fresh tensor (rulebook included). `--gpu-kernels` plans CPU devices as GPUs (the kernels and
shaders a GPU would run, on PoCL and llvmpipe: a check of those paths' costs, not a GPU measurement).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import convbackends as cb
from convbackends.bench import machine_info
from convbackends.ops.sparse_conv3d import SparseConv3dGeometry
from convbackends.runtime import get_backend

sys.path.insert(0, os.path.dirname(__file__))
from bench_sparse_conv3d import LAYERS, markdown_table, ms, side_by_side, tensors  # noqa: E402


def finisher(backend: str):
    """What waits for a backend's queued device work."""
    if backend == "opencl":
        from convbackends.runtime.opencl import BACKEND

        return BACKEND.runtime().queue.finish
    if backend == "cuda":
        import cupy

        return lambda: cupy.cuda.get_current_stream().synchronize()
    return lambda: None


def plan_as_gpus(backends) -> None:
    for backend in backends:
        if backend == "opencl":
            from convbackends.runtime.opencl import BACKEND

            rt = BACKEND.runtime()
            rt.limits = dataclasses.replace(rt.limits, type="gpu")
        elif backend == "vulkan":
            from convbackends.runtime import vulkan as _vk

            _vk.device(get_backend("vulkan").select().index).type = "gpu"


def calls_of(layer, backend: str):
    features, indices, w, b = tensors(layer)
    t = cb.SparseTensor(features, indices, layer.grid, 1)
    conv = cb.SparseConv3d(w, b, backend=backend, **layer.options)
    rules, prepared, finish = conv.spec.rules(t), conv._prepared, finisher(backend)
    rulebook = prepared.rulebook(t._indices, rules)
    geom = SparseConv3dGeometry(rules, rulebook.n_in, rulebook.n_out, layer.c, layer.o)

    def build():
        prepared.rulebook(t._indices, rules)
        finish()

    calls = {
        f"{backend} rulebook": build,
        f"{backend} compute": lambda: prepared.run(features, rulebook, geom),
        f"{backend} layer": lambda: conv(cb.SparseTensor(features, indices, layer.grid, 1)),
    }
    return calls, int(rulebook.pairs()[0][-1]), conv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy,opencl,vulkan")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gpu-kernels", action="store_true", help="plan CPU devices as GPUs")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.gpu_kernels:
        plan_as_gpus(backends)
    load = os.getloadavg()[0]
    rows = []
    for layer in LAYERS:
        calls, pairs, convs = {}, {}, []
        for backend in backends:
            more, pairs[backend], conv = calls_of(layer, backend)
            calls.update(more)
            convs.append(conv)
        times = side_by_side(calls, args.repeats)
        for conv in convs:
            conv.close()
        base = times[f"{backends[0]} layer"]
        for backend in backends:
            (rb, rb_cpu), (co, co_cpu), (la, la_cpu) = (times[f"{backend} {k}"] for k in ("rulebook", "compute",
                                                                                           "layer"))
            flops = 2 * pairs[backend] * layer.c * layer.o
            rows.append([layer.name, backend, f"{ms(rb)} ({ms(rb_cpu)})", f"{ms(co)} ({ms(co_cpu)})",
                         f"{flops / co / 1e9:.1f}", f"{ms(la)} ({ms(la_cpu)})",
                         f"{base[0] / la:.2f}x ({base[1] / la_cpu:.2f}x)"])
    m = machine_info()
    planned = "; CPU devices planned as GPUs" if args.gpu_kernels else ""
    print(f"# sparse_conv3d on the device backends\n\n- machine: {m['cpu']}, {m['cpu_count']} cores; load average "
          f"{load:.1f} before the run (shared)\n- median of {args.repeats} calls after a warm-up, all calls of a layer "
          f"taking turns; in parentheses the median CPU time of the process{planned}\n")
    print(markdown_table(["layer", "backend", "rulebook ms (CPU)", "compute ms (CPU)", "compute GFLOP/s",
                          "layer ms (CPU)", f"{backends[0]} layer / this"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
