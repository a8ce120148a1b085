"""The benchmark over a Dask cluster: `convbackends bench --scheduler ADDRESS` or `--local-cluster N`.

Every worker runs the suite through `bench.run` on every target it has itself (its own backends, devices
and peers, found on the worker), and the results come back as one report keyed by host and device: target
ids are `HOST/TARGET` (`HOST#NAME/TARGET` where a host runs several workers), `report.machine["hosts"]`
holds each worker's machine facts, and the JSON, CSV and plot writers of `bench` take it as it is.

Workers on one host take turns, so that none times the others' load; hosts run at the same time. The
targets run without the one-thread caps dask's nanny puts on BLAS and OpenMP (`THREAD_CAPS`), as users run
those libraries; the JSON's `machine.hosts[...].thread_caps` lists any that stayed (with --in-process on a
worker that `dask worker` started, the worker's own libraries keep them). Each
worker streams its progress and each target's records as they finish (`Worker.log_event`). A worker that
leaves the cluster mid-run (it died, or was stopped) or whose run raises keeps the records it sent; every
other row of it is marked failed with the reason, and the rest of the table is still produced.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from . import __version__, bench

__all__ = ["WorkerRun", "connect", "run", "run_cli", "host_rows", "HOST_COLUMNS"]


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ValueError("--scheduler and --local-cluster need dask.distributed: pip install 'convbackends[dask]'") \
            from None
    return distributed


# dask's nanny starts worker processes with these at 1 (distributed.nanny.pre-spawn-environ), so that a worker's
# task threads do not oversubscribe the cores. A benchmark times each library as users run it, on every core.
THREAD_CAPS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# Scheduler, workers and their HTTP servers (dask starts those even without a dashboard, on every interface
# unless told otherwise) on the loopback interface only, on free ports.
LOCALHOST = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "worker_dashboard_address": "127.0.0.1:0"}


@contextlib.contextmanager
def connect(scheduler: str | None = None, local_workers: int | None = None, timeout_s: float = 20):
    """A Client of the scheduler at `scheduler`, or of an embedded cluster of `local_workers` worker processes
    bound to 127.0.0.1 (one thread each, not daemonic, so each can run its targets in processes of their own
    as `bench` does); closed on exit."""
    distributed = _distributed()
    if scheduler:
        with distributed.Client(scheduler, timeout=timeout_s) as client:
            yield client
        return
    import dask

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items() if k not in THREAD_CAPS}
    with dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": environ}), \
            distributed.LocalCluster(n_workers=local_workers, threads_per_worker=1, processes=True, **LOCALHOST) \
            as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(local_workers, timeout=timeout_s * 3)
        yield client


# --- on each worker ---------------------------------------------------------------------------------

def worker_facts() -> dict:
    """What a reader of a fleet result needs about one worker: bench.machine_info() and where it runs."""
    from distributed import get_worker

    worker = get_worker()
    return {**bench.machine_info(), "hostname": socket.gethostname(), "worker": worker.address,
            "worker_name": str(worker.name), "nthreads": worker.state.nthreads, "convbackends": __version__}


@contextlib.contextmanager
def _without_dask_thread_caps():
    """The processes started inside run without the thread caps dask's nanny set (a value the user set differs
    from dask's configured one and stays); yields the caps left in force."""
    import dask

    caps = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    lifted = {k: os.environ.pop(k) for k in THREAD_CAPS if k in os.environ and os.environ[k] == str(caps.get(k))}
    try:
        yield {k: os.environ[k] for k in THREAD_CAPS if k in os.environ}
    finally:
        os.environ.update(lifted)


def _bench_on_worker(topic: str, cases, suite_name: str, backends, devices, peers, warmup: int, repeats: int,
                     isolate: bool, threads: int | None) -> dict:
    """Runs on a worker: the suite on each of its targets, one bench.run each, every step sent as an event."""
    from distributed import get_worker

    worker = get_worker()

    def send(kind: str, **message) -> None:
        worker.log_event(topic, {"kind": kind, "worker": worker.address, **message})

    # A daemonic worker process (dask's default for `dask worker`) may not start processes of its own.
    isolated = isolate and not multiprocessing.current_process().daemon
    facts = worker_facts()
    # This process's libraries are loaded under the caps it started with: in process they stay.
    capped = {k: os.environ[k] for k in THREAD_CAPS if k in os.environ}
    targets = bench.targets(backends, devices, peers)
    infos = [bench.target_info(t) for t in targets]
    records, unchecked = {}, ""
    with _without_dask_thread_caps() if isolated else contextlib.nullcontext(capped) as caps:
        facts["thread_caps"] = caps
        send("start", machine=facts, targets=infos, isolated=isolated)
        for target in targets:
            report = bench.run(cases, [target], suite_name=suite_name, warmup=warmup, repeats=repeats,
                               isolate=isolated, progress=lambda case, t: send("layer", target=t.id, layer=case.name),
                               threads=threads)
            records[target.id] = [asdict(r) for r in report.records]
            unchecked = unchecked or report.unchecked
            send("records", target=target.id, records=records[target.id])
    return {"machine": facts, "targets": infos, "isolated": isolated, "records": records, "unchecked": unchecked}


# --- on the client ----------------------------------------------------------------------------------

@dataclass
class WorkerRun:
    """One worker's part of the run, as far as the client knows it."""

    label: str  # its rows' prefix: the host name, with "#worker-name" where the host runs several workers
    address: str
    host: str
    layers: int  # cases per target
    future: object = None
    machine: dict | None = None
    targets: list[dict] | None = None  # target_info() of each of its targets, once it has started
    records: dict[str, list[dict]] = field(default_factory=dict)  # target id -> its records' dicts
    isolated: bool = True
    unchecked: str = ""
    layers_done: int = 0
    failure: str = ""
    finished: bool = False

    def started(self, message: dict) -> None:
        self.machine, self.targets, self.isolated = message["machine"], message["targets"], message["isolated"]

    @property
    def total(self) -> int | None:
        """Layers to run in all (available targets x cases), once known."""
        return None if self.targets is None else self.layers * sum(t["available"] for t in self.targets)


def _labels(client, workers: dict) -> dict[str, str]:
    """address -> label: the worker's host name (asked of the worker), "#name" added where a host has several."""
    names = client.run(socket.gethostname, on_error="return")
    by_host = defaultdict(list)
    for address, info in workers.items():
        by_host[info["host"]].append(address)
    labels = {}
    for host, addresses in by_host.items():
        for address in addresses:
            name = names.get(address)
            label = name if isinstance(name, str) else host
            if len(addresses) > 1:
                label += f"#{workers[address].get('name', address)}"
            labels[address] = label
    if len(set(labels.values())) < len(labels):  # two hosts of one name: tell them apart by address
        labels = {a: f"{label}@{workers[a]['host']}" for a, label in labels.items()}
    return labels


def run(client, cases: list, *, suite_name: str, backends: str | None = None, devices: str | None = None,
        peers: str | None = None, warmup: int = 2, repeats: int = 10, isolate: bool = True, progress=None,
        requested: dict | None = None, model=None, threads: int | None = None, poll_s: float = 0.2) -> bench.Report:
    """The suite on every worker of the client's cluster, as one bench.Report keyed by host and device.

    `progress(run, description)` is called on every event with the WorkerRun it concerns (its `layers_done`
    and `total`). `threads` is bench.run's, on every worker. Every `poll_s` seconds the workers still in the
    cluster are checked: the run of one that left is marked failed and cancelled.
    """
    workers = client.scheduler_info()["workers"]
    if not workers:
        raise ValueError(f"the Dask scheduler {client.scheduler.address} has no workers")
    labels = _labels(client, workers)
    runs = {a: WorkerRun(labels[a], a, workers[a]["host"], len(cases)) for a in sorted(workers, key=labels.get)}
    turns = defaultdict(list)  # host -> its runs still to start, in order
    for r in runs.values():
        turns[r.host].append(r)
    topic = f"convbackends-bench-{uuid.uuid4().hex}"
    events: queue.Queue = queue.Queue()
    client.subscribe_topic(topic, events.put)

    def start_next(host: str) -> None:
        if turns[host]:
            r = turns[host].pop(0)
            r.future = client.submit(_bench_on_worker, topic, cases, suite_name, backends, devices, peers, warmup,
                                     repeats, isolate, threads, workers=[r.address], allow_other_workers=False,
                                     pure=False,
                                     key=f"convbackends-bench-{r.label}-{uuid.uuid4().hex[:8]}")

    def finish(r: WorkerRun, failure: str = "") -> None:
        r.finished, r.failure = True, failure
        if progress:
            progress(r, f"failed: {failure}" if failure else "done")
        start_next(r.host)

    try:
        for host in list(turns):
            start_next(host)
        next_check = time.monotonic() + poll_s
        while not all(r.finished for r in runs.values()):
            try:
                event = events.get(timeout=poll_s)
                while True:  # every event in before any future is collected: they are older
                    _apply(event[1], runs, progress)
                    event = events.get_nowait()
            except queue.Empty:
                pass
            for r in runs.values():
                if r.future is not None and not r.finished and r.future.done():
                    _collect(r)
                    finish(r, r.failure)
            if time.monotonic() >= next_check:
                alive = client.scheduler_info()["workers"]
                for r in runs.values():
                    if r.future is not None and not r.finished and r.address not in alive:
                        r.future.cancel()
                        finish(r, f"worker {r.address} left the cluster during the run (it died or was stopped)")
                next_check = time.monotonic() + poll_s
    finally:
        client.unsubscribe_topic(topic)
        for r in runs.values():
            if r.future is not None and not r.finished:
                r.future.cancel()
    return merge(list(runs.values()), cases, suite_name=suite_name, warmup=warmup, repeats=repeats, isolate=isolate,
                 requested=requested, model=model, threads=threads)


def _apply(message: dict, runs: dict[str, WorkerRun], progress) -> None:
    r = runs.get(message["worker"])
    if r is None or r.finished:
        return
    kind = message["kind"]
    if kind == "start":
        r.started(message)
        description = f"{sum(t['available'] for t in r.targets)} targets"
    elif kind == "layer":
        r.layers_done += 1
        description = f"{message['layer']} on {message['target']}"
    else:
        r.records[message["target"]] = message["records"]
        description = f"{message['target']} done"
    if progress:
        progress(r, description)


def _collect(r: WorkerRun) -> None:
    """The finished future's result into r, or its exception as r's failure."""
    try:
        result = r.future.result()
    except Exception as exc:  # noqa: BLE001 - a worker's failure is its rows' reason, not the run's end
        r.failure = f"{type(exc).__name__}: {exc}"
        return
    r.started(result)
    r.records, r.unchecked = result["records"], result["unchecked"]


def merge(runs: list[WorkerRun], cases: list, *, suite_name: str, warmup: int, repeats: int, isolate: bool,
          requested: dict | None = None, model=None, threads: int | None = None) -> bench.Report:
    """One report of every worker's records. Target ids become LABEL/ID; a row a worker never sent is an
    "error" record with the worker's failure; a worker that failed before naming its targets gets one
    error row per layer under its label. x cv2.dnn is against the same worker's cv2dnn."""
    targets, rows = [], {}  # rows: (case index, run index, target index) -> Record
    for i, r in enumerate(runs):
        reason = r.failure or "no record came back"
        if r.targets is None:
            targets.append({"id": r.label, "kind": "backend", "device": "", "available": True, "reason": "", "host": r.label})
            for c, case in enumerate(cases):
                rows[c, i, 0] = bench.Record(case.name, r.label, "error", r.failure or reason)
            continue
        for t, info in enumerate(r.targets):
            target_id = f"{r.label}/{info['id']}"
            targets.append({**info, "id": target_id, "host": r.label})
            if not info["available"]:
                continue
            sent = {record["layer"]: record for record in r.records.get(info["id"], [])}
            for c, case in enumerate(cases):
                record = sent.get(case.name)
                rows[c, i, t] = (bench.Record(**{**record, "target": target_id}) if record
                                 else bench.Record(case.name, target_id, "error", reason))
    records = [rows[key] for key in sorted(rows)]
    baselines = {(rec.layer, rec.target.rpartition("/")[0]): rec.median_s for rec in records
                 if rec.target.rpartition("/")[2] == bench.BASELINE and rec.median_s}
    for rec in records:
        base = baselines.get((rec.layer, rec.target.rpartition("/")[0]))
        rec.ratio_vs_cv2dnn = rec.median_s / base if base and rec.median_s else None
    hosts = {r.label: {**(r.machine or {}), "worker": r.address, "status": "failed" if r.failure else "ok",
                       "reason": r.failure} for r in runs}
    cpus = sorted({h["cpu"] for h in hosts.values() if h.get("cpu")})
    machine = {"cpu": f"{len(runs)} worker(s) on {len({r.host for r in runs})} host(s): {', '.join(cpus) or '?'}",
               "hosts": hosts}
    unchecked = "; ".join(sorted({f"{r.label}: {r.unchecked}" for r in runs if r.unchecked}))
    return bench.Report(suite=suite_name, warmup=warmup, repeats=repeats,
                        isolated=isolate and all(r.isolated for r in runs),
                        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine,
                        targets=targets, layers=[bench.layer_info(c) for c in cases], records=records,
                        requested=requested or {}, unchecked=unchecked, model=model, threads=threads)


HOST_COLUMNS = ("host", "worker", "cpu", "cores", "memory GiB", "platform", "python", "convbackends", "status")


def host_rows(report: bench.Report) -> list[tuple[str, ...]]:
    """Each worker's machine facts and how its run ended, as text cells."""
    return [(label, h["worker"], h.get("cpu", "-"), str(h.get("cpu_count", "-")), str(h.get("memory_gib", "-")),
             h.get("platform", "-"), h.get("python", "-"), h.get("convbackends", "-"),
             "ok" if h["status"] == "ok" else f"failed: {h['reason']}")
            for label, h in report.machine["hosts"].items()]


@contextlib.contextmanager
def _bars():
    """A progress bar per worker on stderr while it is a terminal; yields the `progress` callback of run()."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cli import _console

    err = _console(stderr=True)
    with Progress(TextColumn("{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=True,
                  disable=not err.is_terminal) as bars:
        tasks = {}

        def update(r: WorkerRun, description: str) -> None:
            if r.label not in tasks:
                tasks[r.label] = bars.add_task(description, label=r.label, total=None)
            bars.update(tasks[r.label], completed=r.layers_done, total=r.total, description=description)

        yield update


def run_cli(cases: list, suite_name: str, args, model=None) -> bench.Report:
    """`convbackends bench --scheduler/--local-cluster`: run() with the bench options and a bar per worker."""
    requested = {key: getattr(args, key) for key in ("backends", "devices", "peers")}
    requested.update(scheduler=args.scheduler, local_cluster=args.local_cluster)
    with connect(args.scheduler, args.local_cluster) as client, _bars() as progress:
        return run(client, cases, suite_name=suite_name, backends=args.backends, devices=args.devices,
                   peers=args.peers, warmup=args.warmup, repeats=args.repeats, isolate=not args.in_process,
                   progress=progress, requested=requested, model=model, threads=args.threads)
