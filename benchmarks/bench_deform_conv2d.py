"""Benchmark the `deform` layer suite (DCNv2, forward and backward) on convbackends' devices beside onnxruntime's
DeformConv; write a markdown report.

    python benchmarks/bench_deform_conv2d.py --md docs/benchmarks-deform-conv2d-cpu.md
    python benchmarks/bench_deform_conv2d.py --backends numpy,opencl --peers onnxruntime --repeats 5

The layers are issue 11's (bench.py's `deform` suite). Measuring and markdown are benchmarks/bench_conv2d.py's
(the engine of `convbackends bench`); this script adds a table of each target's forward time ratio to
onnxruntime's (cv2.dnn, the usual baseline, has no DeformConv). Peers time forwards only.
"""
from __future__ import annotations

import sys

from bench_conv2d import main, markdown_table  # this script's folder is on sys.path when it runs

PEER = "onnxruntime"


def onnxruntime_ratios(report) -> str:
    """Per forward layer and target: onnxruntime's median time / the target's (> 1: the target is faster)."""
    medians = {(r.layer, r.target): r.median_s for r in report.records if r.median_s}
    ran = {target for _, target in medians}
    targets = [t["id"] for t in report.targets if t["id"] in ran and t["id"] != PEER]
    rows = []
    for layer in report.layers:
        peer = medians.get((layer["name"], PEER))
        if layer.get("backward") or peer is None:
            continue
        rows.append((layer["name"], *(f"{peer / medians[layer['name'], t]:.2f}" if (layer["name"], t) in medians
                                      else "-" for t in targets)))
    note = ("\ndeform_conv2d forwards are checked against the float64 oracle (cv2.dnn has no DeformConv); the "
            "backward rows are timed only (the tests check the gradients by finite differences).\n")
    if not rows:
        return note
    return note + "\n".join(["", f"## Forward: {PEER} time / this target's (> 1 is faster than {PEER})", "",
                              markdown_table(("layer", *targets), rows)]) + "\n"


if __name__ == "__main__":
    sys.exit(main(suite="deform", description=__doc__, extra=onnxruntime_ratios))
