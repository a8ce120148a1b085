"""`convbackends devices | bench | parity`: what every device here does with convolutions.

Bad input, and a missing optional package, end in one line on stderr (what is wrong, or what to
install) and exit status 2, never a traceback; `bench` exits 1 when a convbackends backend misses the
tolerance, `parity` when any case fails.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from importlib import metadata

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
layers, results (one record per layer and target), summary and, with --onnx, model.

--onnx MODEL.onnx: every Conv, ConvTranspose and DeformConv node of the model, shapes from onnx.shape_inference (a
symbolic batch size is 1), merged into distinct layers; each is timed on every target with random
U(-1, 1) tensors, and the model's time is the sum of each distinct layer's median x its node count.

Without cv2.dnn (pip install 'convbackends[reference]') the layers are timed but not checked.

exit status: 0; 1 when a convbackends device fails the check or errors; 2 on bad input or a missing package."""


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


def _input_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    return text


def _output_file(text: str) -> str:
    """Checked before a long run, so a typo in a directory does not cost the whole benchmark."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"directory {folder!r} of {text!r} does not exist")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    run.add_argument("--onnx", type=_input_file, metavar="MODEL.onnx",
                     help="add every distinct Conv and ConvTranspose layer of this ONNX model, and report the "
                          "model's total")
    add_run_options(run)
    run.add_argument("--json", type=_output_file, metavar="FILE", help="write every record as JSON")
    run.add_argument("--csv", type=_output_file, metavar="FILE", help="write every record as CSV")
    run.add_argument("--plot", type=_output_file, metavar="FILE.png", help="bar chart of GFLOP/s (matplotlib)")
    fleet = run.add_mutually_exclusive_group()
    fleet.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on every worker of the Dask cluster at ADDRESS (e.g. tcp://head:8786), each on every "
                            "device it has: one table keyed by host and device (pip install 'convbackends[dask]')")
    fleet.add_argument("--local-cluster", type=_positive, metavar="N",
                       help="the same over an embedded Dask cluster of N worker processes on 127.0.0.1")

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
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="threads of the numpy backend, BLAS, the CPU peers and the CPU drivers (PoCL, "
                             "llvmpipe) (default: the cores)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every target in this process instead of one fresh process per target: starts "
                             "faster, but on a CPU-only machine the drivers' threads slow the CPU libraries down")


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", metavar="LIST",
                        help="comma-separated backends, all their devices (default: every available one); 'none'")
    parser.add_argument("--devices", metavar="LIST",
                        help="comma-separated BACKEND:INDEX or BACKEND:NAME-SUBSTRING, e.g. opencl:0,vulkan:llvmpipe")


def require_rich(alternative: str = "") -> None:
    """Tables and progress bars are drawn by rich, from the `cli` extra."""
    try:
        import rich  # noqa: F401
    except ImportError:
        raise ValueError(f"tables need rich: pip install 'convbackends[cli]'{alternative}") from None


def _warn_about_opencv_copies() -> None:
    """Two OpenCV distributions installed side by side overwrite each other's cv2 files: say so, on stderr."""
    installed = []
    for dist in bench.OPENCV_DISTRIBUTIONS:
        try:
            metadata.version(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        print(f"convbackends: warning: {' and '.join(installed)} are installed together and overwrite each other's "
              f"cv2: pip uninstall -y {' '.join(installed)}, then pip install the one to keep", file=sys.stderr)


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


def print_table(title: str, columns, rows, *, right=(), failed=None, sections=False, lines=False) -> None:
    """One table on stdout: the renderer of every command and of the demo. `right`: indices of the columns
    aligned right; `failed(row)`: rows drawn red; `sections`: a rule where the first cell changes;
    `lines`: a rule between all rows (for cells of several lines)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left", show_lines=lines)
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i in right else "left")
    previous = None
    for row in rows:
        if sections and previous is not None and row[0] != previous:
            table.add_section()
        previous = row[0]
        table.add_row(*map(escape, row), style="red" if failed and failed(row) else None)
    _console().print(table)


def cmd_devices(args) -> int:
    if not args.json:
        require_rich(" (devices --json works without it)")
    listing = devices_listing()
    if args.json:
        print(json.dumps({"schema_version": 1, "backends": listing}, indent=2, default=str))
        return 0
    for entry in listing:
        if not entry["available"]:
            print(f"{entry['name']}: unavailable ({entry['reason']})")
            continue
        rows = [(f"{entry['name']}:{d['index']}", d["name"], d["type"],
                 "\n".join(f"{k}: {_fact(k, v)}" for k, v in d["facts"].items())) for d in entry["devices"]]
        print_table(f"{entry['name']}: {len(rows)} device(s)", ("device", "name", "type", "facts"), rows, lines=True)
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


def run_bench(cases, targets, suite_name: str, args, model: bench.ModelLayers | None = None) -> bench.Report:
    """bench.run with the options of add_run_options and a progress bar."""
    live = sum(t.unavailable() is None for t in targets)
    requested = {key: getattr(args, key) for key in ("backends", "devices", "peers")}
    with progress(live * len(cases)) as step:
        return bench.run(cases, targets, suite_name=suite_name, warmup=args.warmup, repeats=args.repeats,
                         isolate=not args.in_process, progress=lambda case, target: step(f"{case.name} on {target.id}"),
                         requested=requested, model=model, threads=args.threads)


def cmd_bench(args) -> int:
    require_rich()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'convbackends[cli]'")
    parts, cases, model = [], [], None
    if args.suite:
        parts, cases = [args.suite], bench.suite(args.suite)
    if args.onnx:
        model = bench.onnx_layers(args.onnx)
        if not model.cases:
            raise ValueError("; ".join([f"{args.onnx} has no Conv, ConvTranspose or DeformConv node to benchmark",
                                        *bench.skipped_nodes(model)]))
        parts, cases = parts + [f"onnx:{os.path.basename(args.onnx)}"], cases + model.cases
    if args.layer:
        parts, cases = parts + ["custom"], cases + args.layer
    if not parts:
        parts, cases = ["standard"], bench.suite("standard")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"two layers are named {next(n for n in names if names.count(n) > 1)!r}: give --layer a name=")
    on_cluster = args.scheduler or args.local_cluster
    if on_cluster:
        from . import fleet

        report = fleet.run_cli(cases, "+".join(parts), args, model)
    else:
        report = run_bench(cases, bench.targets(args.backends, args.devices, args.peers), "+".join(parts), args, model)
    _print_report(report)
    if on_cluster:
        print_table("per worker: machine facts", fleet.HOST_COLUMNS, fleet.host_rows(report), right=(3, 4))
    for path, write in ((args.json, bench.write_json), (args.csv, bench.write_csv), (args.plot, bench.plot)):
        if path:
            write(report, path)
            print(f"wrote {path}")
    return 1 if report.backend_failures() else 0


def _print_report(report: bench.Report) -> None:
    print_table(f"{bench.ops_title(report)} benchmark, suite {report.suite}: median of {report.repeats} after {report.warmup} warm-up, "
                f"{report.machine['cpu']}, {report.date}", bench.table_columns(report), bench.table_rows(report),
                right=range(2, len(bench.table_columns(report)) - 1), failed=lambda row: row[-1].startswith(("FAIL", "error")),
                sections=True)
    print_table("per target: geometric mean over layers (x cv2.dnn: time ratio, < 1 is faster)",
                bench.SUMMARY_COLUMNS, bench.summary_rows(report), right=range(2, len(bench.SUMMARY_COLUMNS)))
    if report.model is not None:
        print_table(bench.model_title(report), bench.MODEL_COLUMNS, bench.model_rows(report),
                    right=range(2, len(bench.MODEL_COLUMNS)))
    for line in bench.skipped_nodes(report.model):
        print(f"not benchmarked: {line}")
    for line in bench.skipped_lines(report):
        print(f"not run: {line}")
    if report.unchecked:
        print(f"checks skipped, outputs not compared with cv2.dnn: {report.unchecked}")


def cmd_parity(args) -> int:
    require_rich()
    missing = bench.reference_unavailable()
    if missing:
        raise ValueError(f"parity compares with cv2.dnn, but {missing}")
    everything = bench.backend_targets(args.backends, args.devices)
    targets = [t for t in everything if t.index is not None]
    skipped = [t for t in everything if t.index is None]
    counts = {t.id: [0, 0, 0] for t in targets}  # passed, failed, unsupported
    cases = parity.SUITES[args.suite]
    rows = []
    with progress(len(cases) * len(targets)) as step:
        for case in cases:
            ref = parity.reference_output(case)
            for target in targets:
                step(f"{case.name} on {target.id}")
                rows.append((case.name, target.id, *_parity_cells(case, target, ref, counts[target.id])))
    print_table(f"parity against cv2.dnn, suite {args.suite}",
                ("case", "target", "max abs err", "mean abs err", "tolerance", "result"), rows, right=(2, 3, 4),
                failed=lambda row: row[-1].startswith(("FAIL", "error")))
    for target in skipped:
        print(f"{target.id}: unavailable ({target.reason})")
    for target in targets:
        passed, failed, unsupported = counts[target.id]
        print(f"{target.id} ({target.device}): {passed} passed, {failed} failed, {unsupported} unsupported")
    return 1 if any(c[1] for c in counts.values()) else 0


def _parity_cells(case, target, ref, count: list[int]) -> tuple[str, ...]:
    """The result cells of one case on one target; counts passed, failed, unsupported."""
    reason = target.supports(case)
    if reason:
        count[2] += 1
        return "-", "-", "-", f"unsupported: {reason}"
    try:
        result = parity.check(case, target.backend, target.index, ref)
    except Exception as exc:  # a crash is a failure of this case, not of the whole report
        count[1] += 1
        return "-", "-", "-", f"error: {type(exc).__name__}: {exc}"
    count[0 if result.passed else 1] += 1
    verdict = "pass" if result.passed else f"FAIL: {result.detail}"
    return f"{result.max_abs:.2e}", f"{result.mean_abs:.2e}", f"{result.tol:.2e}", verdict


COMMANDS = {"devices": cmd_devices, "bench": cmd_bench, "parity": cmd_parity}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _warn_about_opencv_copies()
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # bad names, unavailable backends, unwritable files: one line, no traceback
        print(f"convbackends {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
