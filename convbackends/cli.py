"""`convbackends devices | bench | parity`: what every device here does with convolutions.

Bad input ends in one line on stderr and exit status 2, never a traceback; `bench` exits 1 when a
convbackends backend misses the tolerance, `parity` when any case fails.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys

from . import __version__, bench, parity
from .runtime import available_backends, get_backend
from .peers import PEER_NAMES

BENCH_EPILOG = f"""\
layer spec (--layer, repeatable; without --suite only these layers run):
{bench.LAYER_SPEC_HELP}

targets: every device of every available backend (or --backends/--devices), the baseline cv2dnn
(cv2.dnn on the CPU, default engine, Winograd on) and the peers
  {', '.join(PEER_NAMES[1:])}
(--peers to choose; unavailable ones are listed with the reason). cv2dnn-opencl is cv2.dnn's
OpenCL target; where the only OpenCL device is a CPU (PoCL), convbackends sets
OPENCV_DNN_OPENCL_ALLOW_ALL_DEVICES=1 and OPENCV_OPENCL_DEVICE=:CPU: for it (values you set win).

measuring: each target runs in a fresh process of its own (--in-process to share one). Per layer:
the first call, construction and program/pipeline build included, is the "cold" time; then
--warmup calls; then the median of --repeats calls, numpy in and numpy out, beside the device
time where the API measures one. The first output is checked against cv2.dnn (Winograd off):
pass when max abs error <= 1e-4 * max(1, max|reference|). "x cv2.dnn" is the time ratio to the
baseline (< 1 is faster). --json writes schema_version {bench.SCHEMA_VERSION}: settings, machine, targets,
layers, results (one record per layer and target) and summary.

exit status: 0; 1 when a convbackends device fails the check or errors; 2 on bad input."""


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _layer(text: str):
    try:
        return bench.parse_layer(text)
    except bench.LayerSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _output_file(text: str) -> str:
    """Checked before a long run, so a typo in a directory does not cost the whole benchmark."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"directory {folder!r} of {text!r} does not exist")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convbackends", description="Devices, benchmarks and parity checks of the convbackends conv2d backends.")
    parser.add_argument("--version", action="version", version=f"convbackends {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = commands.add_parser("devices", help="every device of every backend, with its facts",
                                  description="Every device of every backend with the facts its driver reports; "
                                              "unavailable backends with the reason.")
    devices.add_argument("--json", action="store_true", help="print JSON instead of tables")

    run = commands.add_parser("bench", help="time a layer suite on backends and peers",
                              description="Time a layer suite on convbackends' devices and on peer libraries, "
                                          "checking each output against cv2.dnn.",
                              epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--suite", choices=list(bench.SUITE_BUILDERS),
                     help="built-in layer suite (default: standard, or none when --layer is given)")
    run.add_argument("--layer", action="append", type=_layer, default=[], metavar="SPEC",
                     help="add a layer, e.g. name=my3x3,c=64,hw=56,o=64,k=3,p=1 (format below)")
    add_run_options(run)
    run.add_argument("--json", type=_output_file, metavar="FILE", help="write every record as JSON")
    run.add_argument("--csv", type=_output_file, metavar="FILE", help="write every record as CSV")
    run.add_argument("--plot", type=_output_file, metavar="FILE.png", help="bar chart of GFLOP/s (matplotlib)")

    check = commands.add_parser("parity", help="check every backend and device against cv2.dnn",
                                description="Run a parity suite on every available backend and device and compare "
                                            "with cv2.dnn; exit status 1 on any failure.")
    check.add_argument("--suite", choices=list(parity.SUITES), default="opencv", help="parity suite (opencv)")
    add_target_options(check)
    return parser


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What to run and how often; shared with benchmarks/bench_conv2d.py."""
    add_target_options(parser)
    parser.add_argument("--peers", metavar="LIST",
                        help=f"peers besides cv2dnn: comma-separated from {', '.join(PEER_NAMES[1:])}, "
                             "'all' (default) or 'none'")
    parser.add_argument("--repeats", type=_positive, default=10, help="timed calls per layer; the median is shown (10)")
    parser.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls after the cold one (2)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every target in this process instead of one fresh process per target: starts "
                             "faster, but on a CPU-only machine the drivers' threads slow the CPU libraries down")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", metavar="LIST",
                        help="comma-separated backends, all their devices (default: every available one); 'none'")
    parser.add_argument("--devices", metavar="LIST",
                        help="comma-separated BACKEND:INDEX or BACKEND:NAME-SUBSTRING, e.g. opencl:0,vulkan:llvmpipe")


def _console(stderr: bool = False):
    from rich.console import Console

    # Piped into a file, tables keep their full width instead of rich's 80 columns.
    target = sys.stderr if stderr else sys.stdout
    return Console(file=target, width=None if target.isatty() else 200, highlight=False)


_BYTE_KEYS = ("bytes", "mem", "buffer", "range")
_COUNT_KEYS = ("elements", "count")  # e.g. max_texel_buffer_elements: a count, not a size


def _is_size(key: str, value) -> bool:
    key = key.lower()
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 1024
            and any(k in key for k in _BYTE_KEYS) and not any(k in key for k in _COUNT_KEYS))


def _fact(key: str, value) -> str:
    """A fact as text; sizes in bytes also in KiB/MiB/GiB, since drivers report them raw."""
    if isinstance(value, (list, tuple)):
        parts = [_fact(key, v) for v in value]
        return " x ".join(parts) if all(isinstance(v, int) for v in value) and "bytes" not in key else ", ".join(parts)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fact(k, v)}" for k, v in value.items())
    if _is_size(key, value):
        unit = max(u for u in range(4) if value >= 1024 ** u)
        return f"{value} ({value / 1024 ** unit:.4g} {('B', 'KiB', 'MiB', 'GiB')[unit]})"
    return str(value)


def devices_listing() -> list[dict]:
    """The JSON form of `convbackends devices`: one entry per backend."""
    listing = []
    for name, availability in available_backends().items():
        entry = {"name": name, "available": availability.available, "reason": availability.reason, "devices": []}
        if availability.available:
            entry["devices"] = [{"index": d.index, "name": d.name, "type": d.type, "facts": d.facts}
                                for d in get_backend(name).devices()]
        listing.append(entry)
    return listing


def cmd_devices(args) -> int:
    listing = devices_listing()
    if args.json:
        print(json.dumps({"schema_version": 1, "backends": listing}, indent=2, default=str))
        return 0
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    for entry in listing:
        if not entry["available"]:
            console.print(f"[bold]{entry['name']}[/]: unavailable ({escape(entry['reason'])})")
            continue
        table = Table(title=f"{entry['name']}: {len(entry['devices'])} device(s)", title_justify="left",
                      show_lines=True)
        for column in ("device", "name", "type", "facts"):
            table.add_column(column)
        for d in entry["devices"]:
            facts = "\n".join(f"{k}: {_fact(k, v)}" for k, v in d["facts"].items())
            table.add_row(*map(escape, (f"{entry['name']}:{d['index']}", d["name"], d["type"], facts)))
        console.print(table)
    return 0


@contextlib.contextmanager
def progress(total: int):
    """A progress bar on stderr while it is a terminal; yields step(description)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = _console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("starting", total=total)
        yield lambda description: progress.update(task, advance=1, description=description)


def run_bench(cases, targets, suite_name: str, args) -> bench.Report:
    """bench.run with the options of add_run_options and a progress bar."""
    live = sum(t.unavailable() is None for t in targets)
    with progress(live * len(cases)) as step:
        return bench.run(cases, targets, suite_name=suite_name, warmup=args.warmup, repeats=args.repeats,
                         isolate=not args.in_process, progress=lambda case, target: step(f"{case.name} on {target.id}"))


def cmd_bench(args) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'convbackends[cli]'")
    if args.suite:
        cases, suite_name = bench.suite(args.suite), args.suite + ("+custom" if args.layer else "")
    else:
        cases, suite_name = ([], "custom") if args.layer else (bench.suite("standard"), "standard")
    cases += args.layer
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"two layers are named {next(n for n in names if names.count(n) > 1)!r}: give --layer a name=")
    report = run_bench(cases, bench.targets(args.backends, args.devices, args.peers), suite_name, args)
    _print_report(report, _console())
    for path, write in ((args.json, bench.write_json), (args.csv, bench.write_csv), (args.plot, bench.plot)):
        if path:
            write(report, path)
            print(f"wrote {path}")
    return 1 if report.backend_failures() else 0


def _print_report(report, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"conv2d benchmark, suite {report.suite}: median of {report.repeats} after "
                        f"{report.warmup} warm-up, {report.machine['cpu']}, {report.date}", title_justify="left")
    for i, column in enumerate(bench.TABLE_COLUMNS):
        table.add_column(column, justify="left" if i < 2 or i == len(bench.TABLE_COLUMNS) - 1 else "right")
    previous = None
    for row in bench.table_rows(report):
        if previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        style = "red" if row[-1].startswith(("FAIL", "error")) else None
        table.add_row(*map(escape, row), style=style)
    console.print(table)
    summary = Table(title="per target: geometric mean over layers (x cv2.dnn: time ratio, < 1 is faster)",
                    title_justify="left")
    for i, column in enumerate(bench.SUMMARY_COLUMNS):
        summary.add_column(column, justify="left" if i < 2 else "right")
    for row in bench.summary_rows(report):
        summary.add_row(*map(escape, row))
    console.print(summary)
    for line in bench.skipped_lines(report):
        console.print(escape(f"not run: {line}"))


def cmd_parity(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    everything = bench.backend_targets(args.backends, args.devices)
    targets = [t for t in everything if t.index is not None]
    skipped = [t for t in everything if t.index is None]
    console = _console()
    table = Table(title=f"parity against cv2.dnn, suite {args.suite}", title_justify="left")
    for i, column in enumerate(("case", "target", "max abs err", "mean abs err", "tolerance", "result")):
        table.add_column(column, justify="right" if 2 <= i <= 4 else "left")
    counts = {t.id: [0, 0, 0] for t in targets}  # passed, failed, unsupported
    cases = parity.SUITES[args.suite]
    with progress(len(cases) * len(targets)) as step:
        for case in cases:
            ref = parity.reference_output(case)
            for target in targets:
                step(f"{case.name} on {target.id}")
                cells, failed = _parity_cells(case, target, ref, counts[target.id])
                table.add_row(case.name, target.id, *map(escape, cells), style="red" if failed else None)
    console.print(table)
    for target in skipped:
        console.print(escape(f"{target.id}: unavailable ({target.reason})"))
    for target in targets:
        passed, failed, unsupported = counts[target.id]
        console.print(escape(f"{target.id} ({target.device}): {passed} passed, {failed} failed, {unsupported} unsupported"))
    return 1 if any(c[1] for c in counts.values()) else 0


def _parity_cells(case, target, ref, count: list[int]) -> tuple[tuple[str, ...], bool]:
    """The result cells of one case on one target and whether it failed; counts passed, failed, unsupported."""
    reason = target.supports(case)
    if reason:
        count[2] += 1
        return ("-", "-", "-", f"unsupported: {reason}"), False
    try:
        result = parity.check(case, target.backend, target.index, ref)
    except Exception as exc:  # a crash is a failure of this case, not of the whole report
        count[1] += 1
        return ("-", "-", "-", f"error: {type(exc).__name__}: {exc}"), True
    count[0 if result.passed else 1] += 1
    verdict = "pass" if result.passed else f"FAIL: {result.detail}"
    return (f"{result.max_abs:.2e}", f"{result.mean_abs:.2e}", f"{result.tol:.2e}", verdict), not result.passed


COMMANDS = {"devices": cmd_devices, "bench": cmd_bench, "parity": cmd_parity}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # bad names, unavailable backends, unwritable files: one line, no traceback
        print(f"convbackends {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
