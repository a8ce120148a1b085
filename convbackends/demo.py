"""The demo: a few typical layers on every available backend and device, checked against cv2.dnn.

Run with `python -m convbackends.demo` (or `./setup.sh demo`). Exits non-zero on any mismatch.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from . import Conv2d, available_backends, devices
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
    print("convbackends demo: each backend and device against cv2.dnn (median of "
          f"{REPEATS} runs after warm-up; tolerance 1e-4*max(1,max|ref|))\n")
    header = f"{'backend':<8} {'device':<40} {'layer':<28} {'max abs err':>11} {'ok':>4} {'time ms':>9}"
    print(header)
    print("-" * len(header))
    failures = 0
    references = {case.name: reference_output(case) for case in LAYERS}
    for name, availability in available_backends().items():
        if not availability.available:
            print(f"{name:<8} unavailable: {availability.reason}")
            continue
        for device in devices(name):
            for case in LAYERS:
                x, w, b = case.tensors()
                with Conv2d(w, b, backend=name, device=device.index, **case.kwargs) as layer:
                    ms = _median_ms(layer, x)
                    max_abs, _, _, passed, _ = compare(np.asarray(layer(x)), references[case.name])
                failures += not passed
                print(f"{name:<8} {device.name[:40]:<40} {case.name:<28} {max_abs:>11.2e} "
                      f"{'yes' if passed else 'NO':>4} {ms:>9.2f}")
    print("\nall backends agree with cv2.dnn" if not failures else f"\n{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
