"""Benchmark the `conv_transpose2d` layer suite on convbackends' devices and every peer; write a markdown report.

    python benchmarks/bench_conv_transpose2d.py --md docs/benchmarks-conv-transpose2d-cpu.md
    python benchmarks/bench_conv_transpose2d.py --backends numpy --peers torch,onnxruntime --repeats 20

The suite is issue 10's: DCGAN generator layers (4x4 s2 p1), a U-Net up-convolution (2x2 s2), FCN-style
depthwise 4x4 s2 upsampling of 21 classes and a 3x3 s2 with output_padding 1. Measuring and markdown are
benchmarks/bench_conv2d.py's (the engine of `convbackends bench`), with this suite as the default.
"""
from __future__ import annotations

import sys

from bench_conv2d import main  # this script's folder is on sys.path when it runs

if __name__ == "__main__":
    sys.exit(main(suite="conv_transpose2d", description=__doc__))
