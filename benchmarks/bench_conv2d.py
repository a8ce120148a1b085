"""Benchmark the `standard` layer suite on convbackends' devices and every peer; write a markdown report.

    python benchmarks/bench_conv2d.py --md docs/benchmarks-cpu.md
    python benchmarks/bench_conv2d.py --backends numpy --peers torch,onnxruntime --repeats 5

The measuring is `convbackends.bench` (the engine of `convbackends bench`); this script only adds the
markdown: date and machine, one row per (layer, target) with its median time, GFLOP/s and time ratio
to cv2.dnn on the CPU, the geometric mean per target, and per layer the fastest backend and peer.
"""
from __future__ import annotations

import argparse
import sys

from convbackends import bench
from convbackends.cli import add_run_options, run_bench


def markdown_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: bench.Report) -> str:
    m = report.machine
    packages = ", ".join(f"{name} {version}" for name, version in m["packages"].items())
    devices = "; ".join(f"{t['id']}: {t['device']}" for t in report.targets if t["available"])
    parts = [
        f"# {bench.ops_title(report)} benchmark: suite `{report.suite}`",
        "",
        f"- date: {report.date}",
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['platform']}, Python {m['python']}",
        f"- load average at the start (1, 5, 15 min): {', '.join(map(str, m.get('load_average') or ['unknown']))}",
        f"- packages: {packages}",
        f"- targets: {devices}",
        f"- method: per layer and target, one cold call (construction, program/pipeline build and first run), "
        f"{report.warmup} untimed warm-up call(s), then the median of {report.repeats} calls, numpy in and numpy out. "
        "\"device ms\" is the API's own timer where it has one. \"x cv2.dnn\" is the time ratio to cv2.dnn on "
        "the CPU in the same run (< 1 is faster). Outputs are checked against cv2.dnn with Winograd off: "
        "max abs error <= 1e-4 * max(1, max|reference|).",
        "",
        markdown_table(bench.TABLE_COLUMNS, bench.table_rows(report)),
        "",
        "## Geometric mean over the layers",
        "",
        markdown_table(bench.SUMMARY_COLUMNS, bench.summary_rows(report)),
        "",
        "## Fastest per layer",
        "",
        markdown_table(bench.FASTEST_COLUMNS, bench.fastest_rows(report)),
    ]
    skipped = bench.skipped_lines(report)
    if skipped:
        parts += ["", "Not run here:", "", *(f"- {line}" for line in skipped)]
    return "\n".join(parts) + "\n"


def main(argv=None, suite: str = "standard", description: str = __doc__, extra=None) -> int:
    """The script's command line; benchmarks/bench_conv_transpose2d.py and bench_deform_conv2d.py run it with
    their own default suite, the latter with `extra(report)`, markdown appended to the report."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--suite", choices=list(bench.SUITE_BUILDERS), default=suite)
    parser.add_argument("--md", metavar="FILE", help="write the markdown here instead of stdout")
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        cases = bench.suite(args.suite)
        targets = bench.targets(args.backends, args.devices, args.peers)
    except ValueError as exc:
        parser.error(str(exc))
    report = run_bench(cases, targets, args.suite, args)
    text = markdown(report) + (extra(report) if extra else "")
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 1 if report.backend_failures() else 0


if __name__ == "__main__":
    sys.exit(main())
