"""Benchmark sparse_conv3d on LiDAR-like voxel sets: rulebook and compute apart, the GEMM part against this
machine's sgemm rate, spconv's CPU layers and cv2.dnn's dense conv3d as peers, and a scaling curve; write markdown
and a plot.

    python benchmarks/bench_sparse_conv3d.py --md docs/benchmarks-sparse.md --plot docs/sparse-scaling.png
    python benchmarks/bench_sparse_conv3d.py --backends numpy,opencl --repeats 3 --no-curve

Sites come from `parity.lidar_sites` (a seeded ground plane, boxes and poles, thinning out with range), never from
uniform noise. Every time is a median of `--repeats` calls after one warm-up. "rulebook" builds the layer's
rulebook from the sites; "compute" runs gather -> GEMM -> scatter with a built rulebook; "layer" is a whole call
on a tensor with no rulebook kept (what spconv's forward does). "GEMM" replays only the compute's GEMMs (the same
blocks, split over the cores the same way) on gathered inputs. spconv (`pip install torch==2.13.0+cpu spconv`) is
measured when it imports; its output is checked against ours (sites equal, features within the tolerance) and
its mismatching rows are counted. cv2.dnn runs the dense conv3d of the densified grid where it fits in
`--dense-limit-gib`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

import convbackends as cb
from convbackends.backends.numpy.conv2d import _in_parts
from convbackends.bench import machine_info
from convbackends.ops.sparse_conv3d import SparseConv3dGeometry, to_host
from convbackends.parity import lidar_sites, tolerance


@dataclass(frozen=True)
class Layer:
    name: str
    sites: int
    grid: tuple[int, int, int]
    c: int
    o: int
    subm: bool
    stride: int = 1

    @property
    def options(self) -> dict:
        return dict(subm=True) if self.subm else dict(stride=self.stride, padding=1)


LAYERS = [
    Layer("SubM 3x3x3 16->16, 20k in (41, 400, 352)", 20_000, (41, 400, 352), 16, 16, True),
    Layer("SubM 3x3x3 32->32, 60k in (41, 800, 704)", 60_000, (41, 800, 704), 32, 32, True),
    Layer("regular 3x3x3 s2 16->32, 20k in (41, 400, 352)", 20_000, (41, 400, 352), 16, 32, False, 2),
    Layer("SubM 3x3x3 64->64, 8k in (11, 200, 176)", 8_000, (11, 200, 176), 64, 64, True),
]
CURVE_GRID = (41, 1600, 1408)
CURVE_SITES = (5_000, 10_000, 20_000, 50_000, 100_000, 200_000)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of `repeats` calls after a warm-up (see `side_by_side`)."""
    return side_by_side({"fn": fn}, repeats)["fn"]


def side_by_side(calls: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Each call's median wall-clock and median CPU seconds (all threads of this process), the calls taking
    turns so that every one meets the same load: on a shared machine the load moves within seconds. The CPU time
    leaves out the time other jobs held the cores, the steadier figure there."""
    for fn in calls.values():
        fn()
    samples = {name: ([], []) for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name][0].append(time.perf_counter() - start)
            samples[name][1].append(time.process_time() - start_cpu)
    return {name: (statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in samples.items()}


def sgemm_call():
    """A 2048^2 float32 GEMM through numpy's BLAS, all cores: 2 * 2048^3 flops."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((2048, 2048), dtype=np.float32) for _ in range(2))
    return lambda: a @ b


SGEMM_FLOPS = 2 * 2048**3


def tensors(layer: Layer, seed: int = 0):
    rng = np.random.default_rng(seed)
    indices = lidar_sites(layer.sites, layer.grid, seed=seed)
    features = rng.uniform(-1, 1, (len(indices), layer.c)).astype(np.float32)
    w = rng.uniform(-1, 1, (layer.o, layer.c, 3, 3, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, layer.o).astype(np.float32)
    return features, indices, w, b


def gemm_only_call(prepared, rulebook, features):
    """The numpy compute's GEMMs alone: the same blocks per tap and output-row part, inputs gathered beforehand."""
    offsets, in_rows, out_rows = rulebook.pairs()
    block, taps = prepared.block_rows, prepared.taps
    blocks = {}  # part's first row -> [(gathered input block, tap matrix)] in the order run() meets them

    def collect(r0: int, r1: int) -> None:
        mine = []
        for t in range(len(taps)):
            lo, hi = int(offsets[t]), int(offsets[t + 1])
            a, b = lo + np.searchsorted(out_rows[lo:hi], (r0, r1))
            mine += [(np.take(features, in_rows[b0:min(b0 + block, b)], axis=0), taps[t])
                     for b0 in range(a, b, block)]
        blocks[r0] = mine

    def replay(r0: int, r1: int) -> None:
        buffer = np.empty((block, taps.shape[2]), np.float32)
        for gathered, w in blocks[r0]:
            np.matmul(gathered, w, out=buffer[:len(gathered)])

    work = int(offsets[-1]) * (features.shape[1] + taps.shape[2])  # what run() gives _in_parts
    _in_parts(rulebook.n_out, work, collect)
    return lambda: _in_parts(rulebook.n_out, work, replay)


def convbackends_calls(layer: Layer, backend: str):
    """(calls to time, facts, the layer to close): rulebook, compute, a whole layer call, and on numpy the GEMMs."""
    features, indices, w, b = tensors(layer)
    t = cb.SparseTensor(features, indices, layer.grid, 1)
    conv = cb.SparseConv3d(w, b, backend=backend, **layer.options)
    rules = conv.spec.rules(t)
    prepared = conv._prepared
    rulebook = prepared.rulebook(t._indices, rules)
    geom = SparseConv3dGeometry(rules, rulebook.n_in, rulebook.n_out, layer.c, layer.o)
    calls = {
        f"{backend} rulebook": lambda: prepared.rulebook(t._indices, rules),
        f"{backend} compute": lambda: prepared.run(features, rulebook, geom),
        f"{backend} layer": lambda: conv(cb.SparseTensor(features, indices, layer.grid, 1)),
    }
    if backend == "numpy":
        calls["numpy gemm"] = gemm_only_call(prepared, rulebook, features)
    facts = dict(pairs=int(rulebook.pairs()[0][-1]), n_out=rulebook.n_out, output=conv(t))
    return calls, facts, conv


def spconv_available() -> str | None:
    try:
        import spconv.pytorch  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def spconv_calls(layer: Layer, ours: cb.SparseTensor):
    """spconv's layer (its forward builds the rulebook), weights converted to its (O, kd, kh, kw, C): the call to
    time, and its output checked against ours (sites equal? rows of features beyond the tolerance)."""
    import spconv.pytorch as spconv
    import torch

    features, indices, w, b = tensors(layer)
    kind = spconv.SubMConv3d if layer.subm else spconv.SparseConv3d
    options = {} if layer.subm else dict(stride=layer.stride, padding=1)
    conv = kind(layer.c, layer.o, 3, bias=True, **options)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w.transpose(0, 2, 3, 4, 1).copy()))
        conv.bias.copy_(torch.from_numpy(b))

    def call():
        with torch.no_grad():
            x = spconv.SparseConvTensor(torch.from_numpy(features), torch.from_numpy(indices), list(layer.grid), 1)
            return conv(x)

    y = call()
    sites, values = y.indices.numpy(), y.features.numpy()
    order = np.lexsort(sites.T[::-1])
    same_sites = np.array_equal(sites[order], ours.indices)
    mismatched = None
    if same_sites:
        ref = to_host(ours.features)
        mismatched = int((np.abs(values[order] - ref).max(axis=1) > tolerance(ref)).sum())
    return call, dict(same_sites=same_sites, mismatched_rows=mismatched)


def measure_dense_cv2(layer: Layer, limit_gib: float, repeats: int) -> float | None:
    """cv2.dnn's dense conv3d over the whole grid, when input and output fit in `limit_gib`."""
    from convbackends.reference import cv2_conv3d

    volume = int(np.prod(layer.grid))
    out_volume = volume if layer.subm else int(np.prod([(n - 1) // layer.stride + 1 for n in layer.grid]))
    if 4 * (volume * layer.c + out_volume * layer.o) * 2 > limit_gib * 2**30:
        return None
    features, indices, w, b = tensors(layer)
    dense = cb.SparseTensor(features, indices, layer.grid, 1).dense()
    return timed(lambda: cv2_conv3d(dense, w, b, stride=layer.stride, padding=1), max(1, repeats // 3))[0]


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy", help="comma-separated convbackends backends (numpy)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--md", metavar="FILE", help="write the markdown here instead of stdout")
    parser.add_argument("--plot", metavar="FILE", help="write the scaling curve here (PNG)")
    parser.add_argument("--no-curve", action="store_true", help="skip the scaling curve")
    parser.add_argument("--dense-limit-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    missing_spconv = spconv_available()
    load_before = os.getloadavg()
    sgemm = sgemm_call()

    def measure(layer: Layer, layer_backends, with_gemm: bool):
        """Every timed call of one layer side by side: ours per backend, spconv's, and the sgemm reference."""
        calls, facts, layers = {}, {}, []
        for backend in layer_backends:
            more, facts[backend], conv = convbackends_calls(layer, backend)
            calls.update(more)
            layers.append(conv)
        base = facts.get("numpy") or facts[layer_backends[0]]
        check = None
        if not missing_spconv:
            calls["spconv layer"], check = spconv_calls(layer, base["output"])
        if with_gemm:
            calls["sgemm"] = sgemm
        times = side_by_side(calls, args.repeats)
        for conv in layers:
            conv.close()
        return times, facts, check

    rows, goals, sgemm_rates = [], [], []
    for layer in LAYERS:
        times, facts, peer = measure(layer, backends, with_gemm=True)
        dense = measure_dense_cv2(layer, args.dense_limit_gib, args.repeats)
        rate = SGEMM_FLOPS / times["sgemm"][0] / 1e9
        sgemm_rates.append(rate)
        theirs = times.get("spconv layer")
        for backend, f in facts.items():
            ours = times[f"{backend} layer"]
            flops = 2 * f["pairs"] * layer.c * layer.o
            gemm = times.get(f"{backend} gemm", (None,))[0]
            speedup = theirs and (theirs[0] / ours[0], theirs[1] / ours[1])
            rows.append([
                layer.name, backend, f"{f['pairs'] / layer.sites:.1f}", f"{f['n_out']}",
                ms(times[f"{backend} rulebook"][0]), ms(times[f"{backend} compute"][0]),
                f"{ms(ours[0])} ({ms(ours[1])})",
                "-" if gemm is None else f"{flops / gemm / 1e9:.0f} ({flops / gemm / 1e9 / rate:.0%})",
                f"{ms(theirs[0])} ({ms(theirs[1])})" if theirs else "-",
                f"{speedup[0]:.1f}x ({speedup[1]:.1f}x)" if theirs else "-", ms(dense),
            ])
            if backend == "numpy" and theirs:
                goals.append((layer.name, speedup, flops / gemm / 1e9 / rate, peer))

    curve = []
    if not args.no_curve:
        for sites in CURVE_SITES:
            layer = Layer(f"SubM {sites}", sites, CURVE_GRID, 16, 16, True)
            times, _, _ = measure(layer, ["numpy"], with_gemm=False)
            curve.append((sites, times["numpy rulebook"][0], times["numpy compute"][0], *times["numpy layer"],
                          *times.get("spconv layer", (None, None))))

    m = machine_info()
    parts = [
        "# sparse_conv3d benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, Python {m['python']}; load average "
        f"before the run {load_before[0]:.1f} (a shared machine: other jobs ran beside this one)",
        f"- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + ("" if missing_spconv else ", spconv (CPU build)"),
        f"- sgemm rate (2048^2 float32, numpy BLAS, all cores), measured beside each layer: "
        f"{min(sgemm_rates):.0f}-{max(sgemm_rates):.0f} GFLOP/s",
        f"- method: per layer, every timed call (ours, spconv's, the sgemm) takes turns, {args.repeats} rounds after "
        "one warm-up, medians; seeded LiDAR-like sites "
        "(`parity.lidar_sites`). pairs/site: rulebook pairs per input site. GEMM GFLOP/s: useful flops "
        "(2 x pairs x C x O) over the time of the compute's GEMMs replayed alone, and its share of the sgemm rate. "
        "spconv layer: its forward on a fresh tensor (rulebook included), to compare with our \"layer\" column. "
        "In parentheses: the median CPU time of the process (all threads), steadier than wall time on a shared "
        "machine; \"spconv / ours\" gives the wall ratio and the CPU ratio.",
        "",
        markdown_table(["layer", "backend", "pairs/site", "out sites", "rulebook ms", "compute ms", "layer ms (CPU)",
                        "GEMM GFLOP/s (of sgemm)", "spconv layer ms (CPU)", "spconv / ours", "cv2.dnn dense ms"],
                       rows),
        "",
    ]
    if missing_spconv:
        parts.append(f"spconv not measured: {missing_spconv}")
    for name, (wall, cpu), share, peer in goals:
        check = "sites equal" if peer["same_sites"] else "SITES DIFFER"
        if peer["mismatched_rows"]:
            check += f", {peer['mismatched_rows']} rows of spconv's features differ from ours beyond the tolerance"
        parts.append(f"- {name}: {wall:.1f}x spconv's wall time, {cpu:.1f}x its CPU time (goal >= 5x: "
                     f"{'met' if min(wall, cpu) >= 5 else 'NOT met'}); GEMM at {share:.0%} of sgemm (goal >= 50%: "
                     f"{'met' if share >= 0.5 else 'NOT met'}); spconv output: {check}")
    if curve:
        parts += ["", f"## Scaling: SubM 3x3x3 16->16 in {CURVE_GRID}", "",
                  markdown_table(["sites", "rulebook ms", "compute ms", "layer ms (CPU)", "spconv layer ms (CPU)"],
                                 [[f"{row[0]}", ms(row[1]), ms(row[2]), f"{ms(row[3])} ({ms(row[4])})",
                                   f"{ms(row[5])} ({ms(row[6])})"] for row in curve])]
        if args.plot:
            plot(curve, args.plot)
            parts += ["", f"![scaling]({os.path.basename(args.plot)})"]
    text = "\n".join(parts) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def plot(curve, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [c[0] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = ((1, "numpy rulebook", "C0", "-"), (2, "numpy compute", "C1", "-"), (3, "numpy layer", "C2", "-"),
             (4, "numpy layer, CPU time", "C2", "--"), (5, "spconv CPU build, layer", "C3", "-"),
             (6, "spconv CPU build, layer, CPU time", "C3", "--"))
    for column, label, color, style in lines:
        values = [c[column] for c in curve]
        if all(v is not None for v in values):
            ax.plot(sites, [v * 1e3 for v in values], marker="o", color=color, linestyle=style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="active sites", ylabel="ms (median; CPU time: all threads)",
           title=f"SubM 3x3x3 16->16 in {CURVE_GRID}: time vs active sites")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
