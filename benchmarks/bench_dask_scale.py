"""Strong scaling of convbackends.dask.conv2d on one machine, against one in-process conv2d.

    python benchmarks/bench_dask_scale.py --size 8192 --chunks 1024,2048,4096 --md docs/scale-out-table.md

The layer: x (1, 16, SIZE, SIZE) float32, a 3x3 16->16 convolution with bias, padding 1, numpy backend. The
input is drawn lazily by dask.array's random generator, chunk by chunk on the workers (never on the client);
each output block is reduced on its worker to one value, so the output is never gathered either.

Per configuration (a fresh LocalCluster of worker processes x threads on 127.0.0.1, chunk size): the median of
--repeats runs of the whole graph (draw + halo exchange + conv), the median of runs of the draw alone, and
the peak RSS of each worker process (getrusage). dask's nanny caps BLAS at one thread per worker process, so
a worker thread is one core. The baseline is convbackends.conv2d on a whole array in a process of its own,
once with BLAS on every core and once capped at one thread, input drawn before the clock starts; it holds
input, output and the backend's buffers at once (over 10 GiB at 8192x8192), so --baseline-size may be
smaller than --size: the comparison is then by GFLOP/s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CHANNELS, KERNEL = 16, 3


def _flops(size: int) -> float:
    return 2.0 * CHANNELS * CHANNELS * KERNEL * KERNEL * size * size


def _weights():
    rng = np.random.default_rng(1)
    w = rng.uniform(-1, 1, (CHANNELS, CHANNELS, KERNEL, KERNEL)).astype(np.float32) / 12
    return w, rng.uniform(-1, 1, CHANNELS).astype(np.float32)


def _corner(block):
    """One value per block: the block was computed, nothing big comes back."""
    return block[:1, :1, :1, :1].copy()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _draw(size: int, chunk: int):
    import dask.array as da

    return da.random.default_rng(0).random((1, CHANNELS, size, size), chunks=(1, CHANNELS, chunk, chunk),
                                           dtype=np.float32)


def _reduced(y):
    return y.map_blocks(_corner, chunks=tuple((1,) * len(c) for c in y.chunks), dtype=y.dtype)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cluster_run(size: int, chunk: int, workers: int, threads: int, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    import convbackends.dask as cbd

    w, b = _weights()
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("convbackends.dask"))  # imports out of the clock
        x = _draw(size, chunk)
        graph = _reduced(cbd.conv2d(x, w, b, padding=1, backend="numpy"))
        draw = _reduced(x)
        _timed(lambda: _reduced(cbd.conv2d(x[:, :, :chunk, :chunk], w, b, padding=1, backend="numpy")).compute())
        totals = [_timed(graph.compute) for _ in range(repeats)]
        draws = [_timed(draw.compute) for _ in range(repeats)]
        rss = client.run(_peak_rss_mib)
        tasks = len(graph.__dask_graph__())
    total, drawn = statistics.median(totals), statistics.median(draws)
    return {"kind": "dask", "size": size, "workers": workers, "threads": threads, "chunk": chunk, "total_s": total,
            "draw_s": drawn, "conv_s": total - drawn, "runs_s": totals, "draw_runs_s": draws,
            "peak_rss_mib": max(rss.values()), "tasks": tasks, "gflops": _flops(size) / total / 1e9}


def _in_process(size: int, repeats: int) -> None:
    """Child: conv2d on the whole array, median of `repeats` after one warm-up; prints JSON."""
    import convbackends as cb

    w, b = _weights()
    x = np.random.default_rng(0).random((1, CHANNELS, size, size), dtype=np.float32)
    cb.conv2d(x[:, :, :1024, :1024], w, b, padding=1, backend="numpy")
    runs = [_timed(lambda: cb.conv2d(x, w, b, padding=1, backend="numpy")) for _ in range(repeats)]
    print(json.dumps({"runs_s": runs, "peak_rss_mib": _peak_rss_mib()}))


def in_process_run(size: int, repeats: int, blas_threads: int | None) -> dict:
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
        if blas_threads:
            env[key] = str(blas_threads)
    out = subprocess.run([sys.executable, __file__, "--child", str(size), str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    median = statistics.median(result["runs_s"])
    return {"kind": "in-process", "size": size, "blas_threads": blas_threads or os.cpu_count(), "total_s": median,
            "conv_s": median, "runs_s": result["runs_s"], "peak_rss_mib": result["peak_rss_mib"],
            "gflops": _flops(size) / median / 1e9}


def markdown(rows: list[dict]) -> str:
    """One row per run; "x in-process" is the conv's time over the in-process conv2d's on as many cores, at the
    same GFLOP/s (the baseline may be smaller)."""
    base = {r["blas_threads"]: r["gflops"] for r in rows if r["kind"] == "in-process"}
    lines = ["| run | x | workers x threads | chunk | tasks | total s | draw s | conv s | GFLOP/s (conv) "
             "| x in-process | peak RSS per process MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"1x{CHANNELS}x{r['size']}x{r['size']}"
        if r["kind"] == "in-process":
            lines.append(f"| in-process conv2d, BLAS on {r['blas_threads']} core(s) | {shape} | - | whole | 1 "
                         f"| {r['total_s']:.2f} | (before) | {r['conv_s']:.2f} | {r['gflops']:.1f} | 1.00 "
                         f"| {r['peak_rss_mib']:.0f} |")
            continue
        conv_gflops = _flops(r["size"]) / r["conv_s"] / 1e9
        same_cores = base.get(min(os.cpu_count(), r["workers"] * r["threads"]))
        ratio = f"{same_cores / conv_gflops:.2f}" if same_cores else "-"
        lines.append(f"| dask | {shape} | {r['workers']} x {r['threads']} | {r['chunk']} | {r['tasks']} "
                     f"| {r['total_s']:.2f} | {r['draw_s']:.2f} | {r['conv_s']:.2f} | {conv_gflops:.1f} | {ratio} "
                     f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _in_process(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunks", default="1024,2048,4096")
    parser.add_argument("--workers", default="1x1,2x1,1x2", help="WORKERSxTHREADS configurations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-size", type=int, help="the in-process baseline's H = W (default: --size)")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--md", help="write the table as markdown here")
    args = parser.parse_args(argv)
    rows = []
    for threads in (None, 1):
        rows.append(in_process_run(args.baseline_size or args.size, args.repeats, threads))
        print(rows[-1], flush=True)
    for config in args.workers.split(","):
        workers, threads = (int(v) for v in config.split("x"))
        for chunk in (int(c) for c in args.chunks.split(",")):
            rows.append(cluster_run(args.size, chunk, workers, threads, args.repeats))
            print({k: v for k, v in rows[-1].items() if not k.endswith("runs_s")}, flush=True)
    table = markdown(rows)
    stamp = f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, " \
            f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f} (a shared machine)."
    print(table + "\n" + stamp)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n" + stamp + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
