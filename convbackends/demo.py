"""The demo: a few typical layers on every available backend and device, checked against cv2.dnn.

Run with `python -m convbackends.demo` (or `./setup.sh demo`). Exits non-zero on any mismatch.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from . import Conv2d, available_backends, devices
from .bench import reference_unavailable
from .cli import print_table, progress, require_rich
from .parity import Case, compare, reference_output

LAYERS = [
    Case("3x3 64->64 56x56 relu", (1, 64, 56, 56), (64, 64, 3, 3), True, dict(padding="same", activation="relu")),
    Case("3x3 256->256 28x28", (1, 256, 28, 28), (256, 256, 3, 3), True, dict(padding=1)),  # Winograd where it pays
    Case("depthwise 3x3 s2 96 112x112", (1, 96, 112, 112), (96, 1, 3, 3), True, dict(stride=2, padding=1, groups=96, activation="relu6")),
    Case("1x1 64->256 56x56", (1, 64, 56, 56), (256, 64, 1, 1), False, {}),
]
REPEATS = 5


def _median_ms(layer: Conv2d, x: np.ndarray) -> float:
    layer(x)  # warm-up: program/pipeline builds and first uploads
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    try:
        require_rich()
        missing = reference_unavailable()
        if missing:
            raise ValueError(f"the demo compares with cv2.dnn, but {missing}")
    except ValueError as exc:
        print(f"convbackends demo: error: {exc}", file=sys.stderr)
        return 2
    availability = available_backends()
    targets = [(name, device) for name, a in availability.items() if a.available for device in devices(name)]
    references = {case.name: reference_output(case) for case in LAYERS}
    rows, failures = [], 0
    with progress(len(targets) * len(LAYERS)) as step:
        for name, device in targets:
            for case in LAYERS:
                step(f"{case.name} on {name}:{device.index}")
                x, w, b = case.tensors()
                with Conv2d(w, b, backend=name, device=device.index, **case.kwargs) as layer:
                    ms = _median_ms(layer, x)
                    max_abs, _, _, passed, _ = compare(np.asarray(layer(x)), references[case.name])
                failures += not passed
                rows.append((f"{name}:{device.index}", device.name, case.name, f"{max_abs:.2e}",
                             "pass" if passed else "FAIL", f"{ms:.2f}"))
    print_table(f"convbackends demo: each backend and device against cv2.dnn (median of {REPEATS} runs after "
                "warm-up; tolerance 1e-4*max(1,max|ref|))", ("device", "name", "layer", "max abs err", "check", "ms"),
                rows, right=(3, 5), failed=lambda row: row[4] == "FAIL", sections=True)
    for name, a in availability.items():
        if not a.available:
            print(f"{name}: unavailable ({a.reason})")
    print("all backends agree with cv2.dnn" if not failures else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
