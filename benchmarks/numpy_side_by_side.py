"""The numpy backend against cv2.dnn (and other CPU peers) in one process, taking turns.

    python benchmarks/numpy_side_by_side.py                          # standard suite, numpy vs cv2dnn
    python benchmarks/numpy_side_by_side.py --peers torch --filter dw3x3 --rounds 7
    python benchmarks/numpy_side_by_side.py --one-thread --peers torch

On a shared machine two runs of the same layer differ by more than most optimisations gain, and
`convbackends bench` runs its targets one after another, each in a process of its own. Here each
layer's prepared numpy layer and its peers take turns, so a burst of load hits all of them alike:
the ratio is the figure to trust, not the milliseconds. A turn is a block of calls after a pause:
OpenBLAS and OpenCV threads spin for a while after a call, and on 2 cores a spinning pool slowed
the next library by up to 1.8x when calls alternated one by one.

--one-thread runs everything on the calling thread (numpy_cpu.set_num_threads(1),
cv2.setNumThreads(1), torch.set_num_threads(1)) and times it with that thread's CPU clock, which
time slices lost to other processes do not inflate: on a loaded machine, the figure to compare
algorithms with. Per layer it also gives the numpy preparation (Conv2d construction: spec and weight
repacking) and the one-shot `conv2d`, and checks numpy's output against cv2.dnn.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

import convbackends as cb
from convbackends import bench, peers
from convbackends.backends import numpy_cpu
from convbackends.parity import compare

# Longer than OpenBLAS's busy-wait after a call (2^28 cycles by default, ~0.1 s).
PAUSE_S = 0.15
ONE_THREAD_PEERS = ("cv2dnn", "torch")


def _one_thread() -> None:
    numpy_cpu.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def _median_ms(fn, repeats: int, clock) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def measure_layer(case, peer_list, rounds: int, calls: int, clock, pause: float) -> dict:
    """Median ms per target over `rounds` turns of `calls` calls, plus prepare and one-shot times."""
    x, w, b = case.tensors()
    layer = cb.Conv2d(w, b, **case.kwargs)
    prepared = {peer.id: peer.prepare(case, w, b) for peer in peer_list}
    try:
        runners = {"numpy": lambda: layer(x), **{name: (lambda p=p: p.profile(x)) for name, p in prepared.items()}}
        y = layer(x)
        *_, passed, detail = compare(y, np.asarray(prepared[bench.BASELINE].profile(x)[0]).reshape(y.shape))
        for run in runners.values():  # warm-up: scratch buffers, thread pools, caches
            run()
            run()
        times = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                time.sleep(pause)  # the previous target's spinning threads go to sleep first
                times[name].append(_median_ms(run, calls, clock))
    finally:
        for p in prepared.values():
            p.close()
    result = {name: statistics.median(t) for name, t in times.items()}
    repeats = max(3, calls)
    result["prepare"] = _median_ms(lambda: cb.Conv2d(w, b, **case.kwargs), repeats, clock)
    result["one-shot"] = _median_ms(lambda: cb.conv2d(x, w, b, **case.kwargs), repeats, clock)
    result["check"] = "pass" if passed else f"FAIL {detail}"
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=list(bench.SUITE_BUILDERS), default="standard")
    parser.add_argument("--filter", default="", help="only layers whose name contains this")
    parser.add_argument("--peers", default="none", help="peers besides cv2dnn, comma-separated (e.g. onnxruntime,torch)")
    parser.add_argument("--rounds", type=int, default=5, help="turns per target; the median over them is shown (5)")
    parser.add_argument("--calls", type=int, default=5, help="calls per turn; a turn counts its median (5)")
    parser.add_argument("--threads", type=int, help="numpy_cpu.set_num_threads(N) first")
    parser.add_argument("--one-thread", action="store_true",
                        help="everything on the calling thread, timed by its CPU clock (peers: cv2dnn, torch)")
    args = parser.parse_args(argv)
    peer_list = peers.select(args.peers)
    if args.one_thread:
        others = [p.id for p in peer_list if p.id not in ONE_THREAD_PEERS]
        if others:
            parser.error(f"--one-thread sets no thread count for {', '.join(others)}")
        _one_thread()
        clock, pause = time.thread_time, 0.0
    else:
        if args.threads:
            numpy_cpu.set_num_threads(args.threads)
        clock, pause = time.perf_counter, PAUSE_S
    for peer in peer_list:
        reason = peer.unavailable()
        if reason:
            parser.error(f"peer {peer.id} is unavailable: {reason}")
    names = [p.id for p in peer_list]
    columns = ["layer", "numpy ms", *(f"{n} ms" for n in names), *(f"numpy/{n}" for n in names),
               "prepare ms", "one-shot ms", "check"]
    print(f"numpy threads: {numpy_cpu.get_num_threads()}; clock: {'thread CPU' if args.one_thread else 'wall'}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    ratios = {n: [] for n in names}
    for case in bench.suite(args.suite):
        if args.filter not in case.name:
            continue
        r = measure_layer(case, peer_list, args.rounds, args.calls, clock, pause)
        for n in names:
            ratios[n].append(r["numpy"] / r[n])
        cells = [case.name, f"{r['numpy']:.2f}", *(f"{r[n]:.2f}" for n in names),
                 *(f"{r['numpy'] / r[n]:.2f}" for n in names), f"{r['prepare']:.2f}", f"{r['one-shot']:.2f}",
                 r["check"]]
        print("| " + " | ".join(cells) + " |", flush=True)
    for n in names:
        if ratios[n]:
            print(f"\ngeomean numpy/{n}: {math.exp(statistics.fmean(map(math.log, ratios[n]))):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
