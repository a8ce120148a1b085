"""The call users make: one-shot `conv2d(x, w, ...)` against a prepared `Conv2d`, side by side.

    python benchmarks/bench_one_shot.py --backends numpy,opencl,vulkan --md docs/benchmarks-one-shot-cpu.md

For every layer of the `standard` suite and every backend: the prepared layer and the functional call with
the same w and b, timed alternately (prepared, one-shot, prepared, ...) after warm-up, medians. The first
one-shot call prepares (it is reported as "first call"); later ones find the layer in the one-shot cache
after comparing w and b with the copies they were prepared from.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import convbackends as cb
from convbackends import bench


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(case, backend: str, repeats: int, warmup: int) -> dict:
    x, w, b = case.tensors()
    cb.clear_one_shot_cache()
    first = _timed(lambda: cb.conv2d(x, w, b, backend=backend, **case.kwargs))
    with cb.Conv2d(w, b, backend=backend, **case.kwargs) as layer:
        for _ in range(warmup):
            layer(x)
            cb.conv2d(x, w, b, backend=backend, **case.kwargs)
        prepared, one_shot = [], []
        for _ in range(repeats):
            prepared.append(_timed(lambda: layer(x)))
            one_shot.append(_timed(lambda: cb.conv2d(x, w, b, backend=backend, **case.kwargs)))
    p, o = statistics.median(prepared), statistics.median(one_shot)
    return dict(layer=case.name, backend=backend, first_ms=first * 1e3, prepared_ms=p * 1e3, one_shot_ms=o * 1e3,
                ratio=o / p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="numpy,opencl,vulkan")
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--md", help="write the table as markdown here")
    args = parser.parse_args(argv)
    rows = []
    for backend in args.backends.split(","):
        if not cb.available_backends()[backend].available:
            print(f"{backend}: unavailable, skipped")
            continue
        for case in bench.suite(args.suite):
            row = measure(case, backend, args.repeats, args.warmup)
            rows.append(row)
            print(f"{row['layer']:>28} {backend:>7}  first {row['first_ms']:9.2f} ms  prepared {row['prepared_ms']:8.2f} ms"
                  f"  one-shot {row['one_shot_ms']:8.2f} ms  ratio {row['ratio']:.2f}", flush=True)
    if args.md:
        lines = [f"# One-shot conv2d against a prepared Conv2d: suite `{args.suite}`", "",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
                 f"- machine: {platform.processor() or platform.machine()}, {platform.platform()}",
                 f"- method: medians of {args.repeats} alternating calls after {args.warmup} warm-up pairs; "
                 "numpy in, numpy out; `first call` is the one-shot call that prepared the layer", "",
                 "| layer | backend | first call ms | prepared ms | one-shot ms | one-shot / prepared |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['backend']} | {r['first_ms']:.2f} | {r['prepared_ms']:.3f} | "
                  f"{r['one_shot_ms']:.3f} | {r['ratio']:.2f} |" for r in rows]
        worst = {}
        for r in rows:
            worst[r["backend"]] = max(worst.get(r["backend"], 0), r["ratio"])
        lines += ["", "Worst ratio per backend: " + ", ".join(f"{k} {v:.2f}" for k, v in worst.items()), ""]
        with open(args.md, "w", encoding="utf-8") as out:
            out.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
