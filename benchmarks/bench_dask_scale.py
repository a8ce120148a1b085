"""Strong scaling of convbackends.dask.conv2d on one machine, and its overhead against one in-process conv2d.

    python benchmarks/bench_dask_scale.py --size 8192 --chunks 1024,2048 --workers 1x1,2x1 --overhead-size 4096
    python benchmarks/bench_dask_scale.py --size 8192 --chunks 1024,2048 --workers 1x1,2x1 --overhead-size 0 --input drawn

The layer: a 3x3 16->16 convolution with bias, padding 1, numpy backend, on x (1, 16, SIZE, SIZE) float32.
x is drawn by dask.array's random generator on the workers, never on the client: with --input persisted
(the default) once, before the clock starts, and kept in the workers' memory; with --input drawn inside
every run, chunk by chunk as the convolution needs it (the draw alone is timed apart, and subtracted). Each
output block is reduced on its worker to one value, so the output is never gathered. Each row is a fresh
LocalCluster of WORKERS processes x THREADS on 127.0.0.1; dask's nanny caps BLAS at one thread per worker
process, so a worker thread is one core.

Scaling rows: the median of --repeats runs of the chunked graph, after a warm-up of the same layer on a small
array; the peak RSS of each worker process (getrusage), which includes a persisted input (SIZE^2 x 64 bytes
over the workers). A row that fails (a worker killed for memory, say) is written with its reason, and the run
goes on. Every row has the 1-minute load average at its start and end: the machine may be shared.

Overhead rows (--overhead-size, one worker, one thread): the same graph against convbackends.conv2d on the
whole array drawn in the same worker process, in the same BLAS set-up, runs alternating (whole, chunked,
whole, ...) so that the machine's load falls on both alike.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _corner(block):
    """One value per block: the block was computed, nothing big comes back."""
    return block[:1, :1, :1, :1].copy()


def _reduced(y):
    return y.map_blocks(_corner, chunks=tuple((1,) * len(c) for c in y.chunks), dtype=y.dtype)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _whole_conv_s(size: int) -> float:
    """On a worker: convbackends.conv2d on a whole array drawn here, timed after a warm-up on a corner."""
    import convbackends as cb

    w, b = _weights()
    x = np.random.default_rng(0).random((1, CHANNELS, size, size), dtype=np.float32)
    cb.conv2d(x[:, :, :256, :256], w, b, padding=1, backend="numpy")
    seconds = _timed(lambda: cb.conv2d(x, w, b, padding=1, backend="numpy"))
    del x
    return seconds


class Cluster:
    """A fresh LocalCluster with x persisted on it and the chunked graph built."""

    def __init__(self, size: int, chunk: int, workers: int, threads: int, persisted: bool = True):
        import dask.array as da
        from distributed import Client, LocalCluster, wait

        import convbackends.dask as cbd
        from convbackends.fleet import LOCALHOST

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True, **LOCALHOST)
        self.client = Client(self.cluster)
        self.client.run(lambda: __import__("convbackends.dask"))  # imports out of the clock
        w, b = _weights()
        x = da.random.default_rng(0).random((1, CHANNELS, size, size), chunks=(1, CHANNELS, chunk, chunk),
                                            dtype=np.float32)
        if persisted:
            x = x.persist()
            wait(x)
        self.graph = _reduced(cbd.conv2d(x, w, b, padding=1, backend="numpy"))
        self.draw = _reduced(x)
        self.tasks = len(self.graph.__dask_graph__())
        # Warm-up on a small array of the same layer (it is found by its weights, not by x's size): every
        # worker imports, starts BLAS and prepares the layer the timed runs use.
        small = da.random.default_rng(1).random((1, CHANNELS, 512, 512), chunks=(1, CHANNELS, 128, 128),
                                                dtype=np.float32)
        self.run(_reduced(cbd.conv2d(small, w, b, padding=1, backend="numpy")))

    def run(self, graph=None) -> float:
        return _timed((self.graph if graph is None else graph).compute)

    def peak_rss_mib(self) -> float:
        return max(self.client.run(_peak_rss_mib).values())

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def _load() -> float:
    return os.getloadavg()[0]


def scaling_row(size: int, chunk: int, workers: int, threads: int, repeats: int, persisted: bool) -> dict:
    row = {"kind": "scaling", "size": size, "workers": workers, "threads": threads, "chunk": chunk,
           "input": "persisted" if persisted else "drawn", "load": [_load()]}
    try:
        cluster = Cluster(size, chunk, workers, threads, persisted)
        try:
            runs = [cluster.run() for _ in range(repeats)]
            draws = [] if persisted else [cluster.run(cluster.draw) for _ in range(repeats)]
            rss, tasks = cluster.peak_rss_mib(), cluster.tasks
        finally:
            cluster.close()
    except Exception as exc:  # noqa: BLE001 - a row that fails (a worker killed for memory) is a result too
        return {**row, "error": f"{type(exc).__name__}: {exc}", "load": row["load"] + [_load()]}
    median = statistics.median(runs) - (statistics.median(draws) if draws else 0)
    return {**row, "tasks": tasks, "median_s": median, "runs_s": runs, "draw_runs_s": draws,
            "gflops": _flops(size) / median / 1e9, "peak_rss_mib": rss, "load": row["load"] + [_load()]}


def overhead_row(size: int, chunk: int, repeats: int) -> dict:
    load = _load()
    cluster = Cluster(size, chunk, 1, 1)
    try:
        cluster.client.submit(_whole_conv_s, size, pure=False).result()  # its warm-up
        whole, chunked = [], []
        for _ in range(repeats):
            whole.append(cluster.client.submit(_whole_conv_s, size, pure=False).result())
            chunked.append(cluster.run())
        rss, tasks = cluster.peak_rss_mib(), cluster.tasks
    finally:
        cluster.close()
    w, c = statistics.median(whole), statistics.median(chunked)
    return {"kind": "overhead", "size": size, "chunk": chunk, "tasks": tasks, "whole_s": w, "chunked_s": c,
            "whole_runs_s": whole, "chunked_runs_s": chunked, "ratio": c / w, "peak_rss_mib": rss, "load": [load, _load()]}


def _loads(row: dict) -> str:
    return "-".join(f"{v:.1f}" for v in row["load"])


def markdown(rows: list[dict]) -> str:
    scaling = [r for r in rows if r["kind"] == "scaling"]
    overhead = [r for r in rows if r["kind"] == "overhead"]
    lines = []
    if scaling:
        single = {r["chunk"]: r["median_s"] for r in scaling if r["workers"] * r["threads"] == 1 and "error" not in r}
        lines += ["| x | input | workers x threads | chunk | tasks | conv s (median) | runs s (; draw alone) | GFLOP/s "
                  "| speed-up over 1 x 1 | peak RSS per worker MiB | load (1 min, start-end) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in scaling:
            if "error" in r:
                lines.append(f"| 1x{CHANNELS}x{r['size']}x{r['size']} | {r['input']} | {r['workers']} x {r['threads']} "
                             f"| {r['chunk']} | - | failed: {r['error'][:120]} | - | - | - | - | {_loads(r)} |")
                continue
            speedup = f"{single[r['chunk']] / r['median_s']:.2f}" if r["chunk"] in single else "-"
            runs = ", ".join(f"{s:.1f}" for s in r["runs_s"])
            if r["draw_runs_s"]:
                runs += "; " + ", ".join(f"{s:.1f}" for s in r["draw_runs_s"])
            lines.append(f"| 1x{CHANNELS}x{r['size']}x{r['size']} | {r['input']} | {r['workers']} x {r['threads']} "
                         f"| {r['chunk']} | {r['tasks']} | {r['median_s']:.1f} | {runs} | {r['gflops']:.1f} | {speedup} "
                         f"| {r['peak_rss_mib']:.0f} | {_loads(r)} |")
    if overhead:
        lines += ["", "| x | chunk | tasks | whole-array conv2d s | chunked s | chunked / whole "
                      "| runs s (whole; chunked) | peak RSS MiB | load (1 min, start-end) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in overhead:
            runs = f"{', '.join(f'{s:.1f}' for s in r['whole_runs_s'])}; " \
                   f"{', '.join(f'{s:.1f}' for s in r['chunked_runs_s'])}"
            lines.append(f"| 1x{CHANNELS}x{r['size']}x{r['size']} | {r['chunk']} | {r['tasks']} | {r['whole_s']:.1f} "
                         f"| {r['chunked_s']:.1f} | {r['ratio']:.2f} | {runs} | {r['peak_rss_mib']:.0f} | {_loads(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--chunks", default="1024,2048,4096")
    parser.add_argument("--workers", default="1x1,2x1", help="WORKERSxTHREADS configurations (1x1,2x1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--input", choices=("persisted", "drawn"), default="persisted",
                        help="x kept in the workers' memory, or drawn inside every run (persisted)")
    parser.add_argument("--overhead-size", type=int, default=4096, help="H = W of the overhead rows (0: none)")
    parser.add_argument("--overhead-chunks", default="1024,2048")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--md", help="write the tables as markdown here")
    args = parser.parse_args(argv)
    rows = []
    for chunk in (int(c) for c in args.overhead_chunks.split(",")) if args.overhead_size else ():
        rows.append(overhead_row(args.overhead_size, chunk, args.repeats))
        print(rows[-1], flush=True)
    for config in args.workers.split(",") if args.size else ():
        workers, threads = (int(v) for v in config.split("x"))
        for chunk in (int(c) for c in args.chunks.split(",")):
            rows.append(scaling_row(args.size, chunk, workers, threads, args.repeats, args.input == "persisted"))
            print(rows[-1], flush=True)
    stamp = (f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average over the last "
             f"15 minutes {os.getloadavg()[2]:.1f} (a shared machine).")
    text = markdown(rows) + "\n" + stamp + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
