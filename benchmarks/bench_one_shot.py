"""The call users make: the one-shot functional form (`conv2d(x, w, ...)`, ...) against its prepared op object.

    python benchmarks/bench_one_shot.py --backends numpy,opencl,vulkan --md docs/benchmarks-one-shot-cpu.md

For every layer of the suites (`standard`, `conv_transpose2d`, `deform` (forwards) and `sparse` by default) and every backend: the op
object and the functional call of the layer's op with the same w and b, timed alternately (prepared, one-shot, prepared, ...) after warm-up, medians. The first
one-shot call prepares (it is reported as "first call"); later ones find the layer in the one-shot cache
after comparing w and b with the copies they were prepared from.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
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
    functional = getattr(cb, case.op)  # every op's functional form bears the op's name
    inputs = case.inputs()  # deform_conv2d's (offset, mask); () for the others
    keywords = dict(case.kwargs, **({"mask": inputs[1]} if inputs else {}))

    def call():
        return functional(x, *inputs[:1], w, b, backend=backend, **keywords)

    cb.clear_one_shot_cache()
    first = _timed(call)
    with case.layer(w, b, backend=backend) as layer:
        for _ in range(warmup):
            layer(x, *inputs)
            call()
        prepared, one_shot = [], []
        for _ in range(repeats):
            prepared.append(_timed(lambda: layer(x, *inputs)))
            one_shot.append(_timed(call))
    p, o = statistics.median(prepared), statistics.median(one_shot)
    return dict(layer=case.name, op=case.op, backend=backend, first_ms=first * 1e3, prepared_ms=p * 1e3, one_shot_ms=o * 1e3,
                ratio=o / p)


def measure_backend(backend: str, suites: str, repeats: int, warmup: int) -> list[dict]:
    """Every layer of the suites on one backend; forwards only (the deform suite's backward cases time
    gradients, which have no one-shot twin here)."""
    rows = []
    for case in (c for name in suites.split(",") for c in bench.suite(name) if not c.backward):
        row = measure(case, backend, repeats, warmup)
        rows.append(row)
        print(f"{row['layer']:>28} {backend:>7}  first {row['first_ms']:9.2f} ms  prepared {row['prepared_ms']:8.2f} ms"
              f"  one-shot {row['one_shot_ms']:8.2f} ms  ratio {row['ratio']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="numpy,opencl,vulkan")
    parser.add_argument("--suites", default="standard,conv_transpose2d,deform,sparse",
                        help="comma-separated bench suites")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--md", help="write the table as markdown here")
    args = parser.parse_args(argv)
    rows = []
    # A process per backend, as `bench` does: in one process PoCL's idle threads slowed llvmpipe's calls by
    # up to 20x on 2 cores.
    context = multiprocessing.get_context("spawn")
    for backend in args.backends.split(","):
        if not cb.available_backends()[backend].available:
            print(f"{backend}: unavailable, skipped")
            continue
        with context.Pool(1) as pool:
            rows += pool.apply(measure_backend, (backend, args.suites, args.repeats, args.warmup))
    if args.md:
        lines = [f"# One-shot calls against prepared op objects: suites `{args.suites}`", "",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
                 f"- machine: {platform.processor() or platform.machine()}, {platform.platform()}",
                 f"- method: a process per backend; medians of {args.repeats} alternating calls after {args.warmup} "
                 "warm-up pairs; numpy in, numpy out; `first call` is the one-shot call that prepared the layer",
                 "",
                 "| layer | op | backend | first call ms | prepared ms | one-shot ms | one-shot / prepared |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['op']} | {r['backend']} | {r['first_ms']:.2f} | {r['prepared_ms']:.3f} | "
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
