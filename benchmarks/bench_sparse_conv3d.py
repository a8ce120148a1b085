"""Benchmark sparse_conv3d on the sparse suite's LiDAR layers (convbackends/bench_sparse.py, the layers and timing
of `convbackends bench --suite sparse`), with what that table lacks: every backend and spconv's CPU build taking
turns in one process, the numpy compute's GEMMs against this machine's sgemm rate, cv2.dnn's and torch's dense
conv3d where the grid fits, and a scaling curve; writes markdown and a plot.

    python benchmarks/bench_sparse_conv3d.py --md docs/benchmarks-sparse.md --plot docs/sparse-scaling.png
    python benchmarks/bench_sparse_conv3d.py --backends numpy,opencl,vulkan --repeats 3 --no-curve

"rulebook", "compute" and "layer" are bench_sparse.BackendCalls' calls (a built rulebook's compute apart from its
build; "layer" a whole call on a fresh tensor, as spconv's forward is). "GEMM" replays only the numpy compute's
GEMMs (the same blocks, split over the cores the same way) on gathered inputs. spconv (`pip install
torch==2.13.0+cpu spconv`) is the peer of convbackends/peers.py, checked against the same float64 reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from convbackends import bench_sparse
from convbackends.runtime.numpy import in_parts
from convbackends.bench import machine_info
from convbackends.parity import Case, compare_sparse, tolerance
from convbackends.peers import Spconv
from convbackends.runtime import get_backend

CURVE_GRID = (41, 1600, 1408)
CURVE_SITES = (5_000, 10_000, 20_000, 50_000, 100_000, 200_000)
SGEMM_FLOPS = 2 * 2048**3


def sgemm_call():
    """A 2048^2 float32 GEMM through numpy's BLAS, all cores: SGEMM_FLOPS flops."""
    rng = np.random.default_rng(0)
    a, b = (rng.random((2048, 2048), dtype=np.float32) for _ in range(2))
    return lambda: a @ b


def gemm_only_call(calls: bench_sparse.BackendCalls):
    """The numpy compute's GEMMs alone: the same blocks per tap and output-row part, inputs gathered beforehand."""
    prepared, features = calls.layer._prepared, calls.t.features
    rulebook = calls.layer.rulebook(calls.t)
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

    work = int(offsets[-1]) * (features.shape[1] + taps.shape[2])  # what run() gives in_parts
    in_parts(rulebook.n_out, work, collect)
    return lambda: in_parts(rulebook.n_out, work, replay)


def measure_dense(case: Case, limit_gib: float, repeats: int) -> dict[str, float]:
    """Dense conv3d over the whole grid, cv2.dnn's and torch's (when installed), side by side, when input and
    output fit in `limit_gib`: {"cv2.dnn": median s, "torch": median s}, empty when they do not fit."""
    from convbackends.reference import cv2_conv3d

    grid, (o, c) = case.x_shape[2:], case.w_shape[:2]
    stride = case.kwargs.get("stride", 1)
    volume = int(np.prod(grid))
    out_volume = int(np.prod([(n - 1) // stride + 1 for n in grid]))
    if 4 * (volume * c + out_volume * o) * 2 > limit_gib * 2**30:
        return {}
    t, w, b = bench_sparse.tensors(case)
    dense = t.dense()
    calls = {"cv2.dnn": lambda: cv2_conv3d(dense, w, b, stride=stride, padding=1)}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        pass
    else:
        xt, wt, bt = (None if a is None else torch.from_numpy(a) for a in (dense, w, b))

        def dense_torch():
            with torch.inference_mode():
                return F.conv3d(xt, wt, bt, stride=stride, padding=1)

        calls["torch"] = dense_torch
    times = bench_sparse.side_by_side(calls, max(1, repeats // 3))
    return {name: found[0] for name, found in bench_sparse.medians(times).items()}


def spconv_check(y, ref) -> str:
    """spconv's output against the float64 reference: the sites, and how many rows miss the tolerance."""
    sites, features = ref
    if not np.array_equal(y.indices, sites):
        return f"SITES DIFFER ({y.num_sites} sites, reference {len(sites)})"
    bad = int((np.abs(y.features - features).max(axis=1) > tolerance(features)).sum())
    return f"sites equal, {bad} of {len(sites)} rows beyond the tolerance" if bad else "within the tolerance"


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def plan_as_gpus(backends) -> None:
    """Plan the CPU devices as GPUs (the kernels and shaders a GPU runs, on PoCL and llvmpipe)."""
    for backend in backends:
        if backend == "opencl":
            chosen = get_backend("opencl")
            rt = chosen.runtime(chosen.select().index)
            rt.limits = dataclasses.replace(rt.limits, type="gpu")
        elif backend == "vulkan":
            from convbackends.runtime import vulkan as _vk

            _vk.device(get_backend("vulkan").select().index).type = "gpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="numpy", help="comma-separated convbackends backends (numpy)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--md", metavar="FILE", help="write the markdown here instead of stdout")
    parser.add_argument("--plot", metavar="FILE", help="write the scaling curve here (PNG)")
    parser.add_argument("--no-curve", action="store_true", help="skip the scaling curve")
    parser.add_argument("--gpu-kernels", action="store_true", help="plan CPU devices as GPUs")
    parser.add_argument("--dense-limit-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.gpu_kernels:
        plan_as_gpus(backends)
    spconv = Spconv()
    missing_spconv = spconv.unavailable()
    load_before = os.getloadavg()
    sgemm = sgemm_call()

    def measure(case: Case, layer_backends, with_gemm: bool):
        """Every timed call of one layer side by side: ours per backend, spconv's, and the sgemm reference;
        (medians, each target's check against the float64 reference)."""
        t, w, b = bench_sparse.tensors(case)
        ref = bench_sparse.float64_output(case)
        calls, checks, opened = {}, {}, []
        try:
            for backend in layer_backends:
                ours = bench_sparse.BackendCalls(case, backend, get_backend(backend).select().index, t, w, b)
                opened.append(ours)
                checks[backend] = compare_sparse(ours.cold(), ref)
                calls.update(ours.calls(f"{backend} "))
                if backend == "numpy" and with_gemm:
                    calls["numpy gemm"] = gemm_only_call(ours)
            if not missing_spconv:
                theirs = spconv.prepare(case, w, b)
                opened.append(theirs)
                checks["spconv"] = spconv_check(theirs.in_site_order(theirs.profile(t)[0]), ref)
                calls["spconv layer"] = lambda: theirs.profile(t)
            if with_gemm:
                calls["sgemm"] = sgemm
            times = bench_sparse.medians(bench_sparse.side_by_side(calls, args.repeats))
        finally:
            for runner in opened:
                runner.close()
        return times, checks

    rows, goals, sgemm_rates = [], [], []
    for case in bench_sparse.suite():
        info = bench_sparse.layer_info(case)
        times, checks = measure(case, backends, with_gemm=True)
        dense = measure_dense(case, args.dense_limit_gib, args.repeats)
        rate = SGEMM_FLOPS / times["sgemm"][0] / 1e9
        sgemm_rates.append(rate)
        theirs = times.get("spconv layer")
        for backend in backends:
            ours = times[f"{backend} layer"]
            gemm = times.get(f"{backend} gemm", (None,))[0]
            speedup = theirs and (theirs[0] / ours[0], theirs[1] / ours[1])
            rows.append([
                info["spec"], backend, f"{info['pairs'] / case.sites:.1f}", f"{info['output_sites']}",
                ms(times[f"{backend} rulebook"][0]), ms(times[f"{backend} compute"][0]),
                f"{ms(ours[0])} ({ms(ours[1])})",
                "-" if gemm is None else f"{info['flops'] / gemm / 1e9:.0f} ({info['flops'] / gemm / 1e9 / rate:.0%})",
                f"{ms(theirs[0])} ({ms(theirs[1])})" if theirs else "-",
                f"{speedup[0]:.1f}x ({speedup[1]:.1f}x)" if theirs else "-", ms(dense.get("cv2.dnn")),
                ms(dense.get("torch")),
                "pass" if checks[backend][3] else f"FAIL: {checks[backend][4]}",
            ])
            if backend == "numpy" and theirs:
                goals.append((info["spec"], speedup, info["flops"] / gemm / 1e9 / rate, checks["spconv"]))

    curve = []
    if not args.no_curve:
        for sites in CURVE_SITES:
            case = dataclasses.replace(bench_sparse.suite()[0], name=f"subm-{sites}", x_shape=(1, 16, *CURVE_GRID),
                                       sites=sites)
            times, _ = measure(case, ["numpy"], with_gemm=False)
            curve.append((sites, times["numpy rulebook"][0], times["numpy compute"][0], *times["numpy layer"],
                          *times.get("spconv layer", (None, None))))

    m = machine_info()
    parts = [
        "# sparse_conv3d benchmark",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, Python {m['python']}; load average "
        f"before the run {load_before[0]:.1f} (a shared machine: other jobs ran beside this one)",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + ("" if missing_spconv else f", {spconv.device}"),
        f"- sgemm rate (2048^2 float32, numpy BLAS, all cores), measured beside each layer: "
        f"{min(sgemm_rates):.0f}-{max(sgemm_rates):.0f} GFLOP/s",
        f"- method: per layer, every timed call (each backend's, spconv's, the sgemm) takes turns, {args.repeats} "
        "rounds after one warm-up, medians; seeded LiDAR-like sites (`parity.lidar_sites`). pairs/site: rulebook "
        "pairs per input site. GEMM GFLOP/s: useful flops (2 x pairs x C x O) over the time of the numpy compute's "
        "GEMMs replayed alone, and its share of the sgemm rate. spconv layer: its forward on a fresh tensor "
        "(rulebook included), to compare with our \"layer\" column. In parentheses: the median CPU time of the "
        "process (all threads), steadier than wall time on a shared machine; \"spconv / ours\" gives the wall "
        "ratio and the CPU ratio. check: against float64 over the numpy rulebook (bench_sparse.float64_output)."
        + (" CPU devices planned as GPUs." if args.gpu_kernels else ""),
        "",
        markdown_table(["layer", "backend", "pairs/site", "out sites", "rulebook ms", "compute ms", "layer ms (CPU)",
                        "GEMM GFLOP/s (of sgemm)", "spconv layer ms (CPU)", "spconv / ours", "cv2.dnn dense ms",
                        "torch dense ms", "check"], rows),
        "",
    ]
    if missing_spconv:
        parts.append(f"spconv not measured: {missing_spconv}")
    for name, (wall, cpu), share, check in goals:
        parts.append(f"- {name}: {wall:.1f}x spconv's wall time, {cpu:.1f}x its CPU time (goal >= 5x: "
                     f"{'met' if min(wall, cpu) >= 5 else 'NOT met'}); GEMM at {share:.0%} of sgemm (goal >= 50%: "
                     f"{'met' if share >= 0.5 else 'NOT met'}); spconv's output: {check}")
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
