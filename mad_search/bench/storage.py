"""Many machines against one study, simulated: storage operations per second and latency.

    python -m mad_search.bench storage [clients=[1,4,16,64]] [trials_per_client=20]
                                       [reports_per_trial=3] [modes=[postgres,grpc]]
                                       [server=postgresql://postgres@127.0.0.1:5432]

For each mode and each client count N, a fresh PostgreSQL database (created on ``server`` and
dropped afterwards) holds one study, and N light processes (each a stand-in for one machine's
coordinator: Optuna's ask / report / tell, no training) run ``trials_per_client`` synthetic
trials each, all released at once. ``postgres``: every client opens the database itself (its own
SQLAlchemy pool, as ``study.storage=postgresql://...`` does). ``grpc``: one Optuna gRPC storage
proxy (``python -m mad_search.proxy``) holds the database and the clients talk to it
(``study.storage=grpc://HOST:PORT``). Reported: storage operations per second (ask, suggest,
reports and tell, over the wall time from release to the last tell), p50 / p99 latency of ask and
of tell, the most connections open to the database at once (sampled from ``pg_stat_activity``),
and errors. On loopback, on this machine's cores: the server and every client share them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from mad_search.bench import BenchError
from mad_search.bench import _common as common

DEFAULTS: dict[str, Any] = {
    "clients": [1, 4, 16, 64],
    "trials_per_client": 20,
    "reports_per_trial": 3,
    "modes": ["postgres", "grpc"],
    "server": "postgresql://postgres@127.0.0.1:5432",
}
MODES = ("postgres", "grpc")


def _client(url: str, study_name: str, trials: int, reports: int, barrier, out) -> None:
    """One simulated coordinator: ask, suggest, report, tell, timed; its record on ``out``."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    record: dict[str, Any] = {"ask": [], "tell": [], "errors": 0, "error": None}
    try:
        if url.startswith("grpc://"):
            host, port = url[len("grpc://") :].split(":")
            storage = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        else:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        study = optuna.load_study(
            study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler()
        )
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        barrier.wait()
        out.put(record)
        return
    barrier.wait()
    record["start"] = time.time()
    for _ in range(trials):
        try:
            t0 = time.perf_counter()
            trial = study.ask()
            record["ask"].append(time.perf_counter() - t0)
            x = trial.suggest_float("x", 0.0, 1.0)
            for step in range(reports):
                trial.report(x * (step + 1), step)
            t0 = time.perf_counter()
            study.tell(trial, x)
            record["tell"].append(time.perf_counter() - t0)
        except Exception as exc:
            record["errors"] += 1
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    record["end"] = time.time()
    out.put(record)


def _admin(server: str):
    try:
        import psycopg
    except ImportError:
        raise BenchError(
            "the storage benchmark needs psycopg: pip install 'mad-search[postgres]'"
        ) from None
    try:
        return psycopg.connect(f"{server}/postgres", connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        from mad_search.storage import mask_url

        raise BenchError(
            f"cannot reach PostgreSQL at {mask_url(server)}: {str(exc).splitlines()[0]}"
        ) from None


def _start_proxy(url: str) -> tuple[subprocess.Popen, str]:
    import warnings

    import optuna

    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

    port = common.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mad_search.proxy", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MAD_SEARCH_STORAGE": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while time.time() - t0 < 60:
        if proc.poll() is not None:
            raise BenchError(f"the storage proxy did not start: {proc.stderr.read().strip()}")
        try:
            optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).get_all_studies()
            return proc, f"grpc://127.0.0.1:{port}"
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise BenchError("the storage proxy did not answer within 60 s")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _one(mode: str, n: int, opts: dict, admin) -> dict:
    """One mode at one client count, on a fresh database."""
    import optuna

    name = f"mad_bench_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = f"{opts['server']}/{name}"
    proxy = None
    peak = {"connections": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with admin.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))
                peak["connections"] = max(peak["connections"], cur.fetchone()[0])
            stop.wait(0.1)

    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(study_name="bench", storage=url)
        target = url
        if mode == "grpc":
            proxy, target = _start_proxy(url)
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(n + 1), ctx.Queue()
        procs = [
            ctx.Process(
                target=_client,
                args=(target, "bench", opts["trials_per_client"], opts["reports_per_trial"],
                      barrier, out),
                daemon=True,
            )
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        barrier.wait(timeout=600)  # every client has imported Optuna and opened the storage
        records = [out.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        stop.set()
        sampler.join(timeout=5)
        done = len(optuna.load_study(study_name="bench", storage=url).get_trials(
            states=(optuna.trial.TrialState.COMPLETE,)))
    finally:
        stop.set()
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    started = [r for r in records if "start" in r]
    wall = max(r["end"] for r in started) - min(r["start"] for r in started) if started else None
    ask = [v for r in records for v in r["ask"]]
    tell = [v for r in records for v in r["tell"]]
    ops = len(tell) * (3 + opts["reports_per_trial"])  # ask, suggest, reports, tell
    errors = sum(r["errors"] for r in records) + sum(1 for r in records if "start" not in r)
    return {
        "mode": mode,
        "clients": n,
        "trials": n * opts["trials_per_client"],
        "complete": done,
        "wall_s": wall,
        "ops_per_s": ops / wall if wall else None,
        "ask_p50_ms": 1e3 * statistics.median(ask) if ask else None,
        "ask_p99_ms": 1e3 * _percentile(ask, 0.99) if ask else None,
        "tell_p50_ms": 1e3 * statistics.median(tell) if tell else None,
        "tell_p99_ms": 1e3 * _percentile(tell, 0.99) if tell else None,
        "max_db_connections": peak["connections"],
        "errors": errors,
        "first_error": next((r["error"] for r in records if r["error"]), None),
    }


def run(**options: Any) -> dict:
    opts = _validate(options)
    admin = _admin(opts["server"])
    rows = []
    try:
        for mode in opts["modes"]:
            for n in opts["clients"]:
                common.note(f"storage: {mode}, {n} client(s) ...")
                rows.append(_one(mode, n, opts, admin))
    finally:
        admin.close()
    from mad_search.storage import mask_url

    return {
        "config": {**opts, "server": mask_url(opts["server"]), "cores": common.available_cores()},
        "machine": common.machine(),
        "rows": rows,
    }


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"storage benchmark: {cfg['trials_per_client']} trials per client, "
        f"{cfg['reports_per_trial']} reports per trial, PostgreSQL at {cfg['server']}, "
        f"{cfg['cores']} cores shared by the server and every client",
        "",
    ]
    fmt = "{:<8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6}"
    head = ("mode", "clients", "trials", "wall s", "ops/s", "ask p50", "ask p99", "tell p50",
            "tell p99", "conns", "errors")
    lines += [fmt.format(*head), "-" * len(fmt.format(*head))]
    for r in result["rows"]:
        lines.append(fmt.format(
            r["mode"], r["clients"], f"{r['complete']}/{r['trials']}",
            common.fmt(r["wall_s"], ".1f"),
            common.fmt(r["ops_per_s"], ".0f"), common.fmt(r["ask_p50_ms"], ".1f"),
            common.fmt(r["ask_p99_ms"], ".1f"), common.fmt(r["tell_p50_ms"], ".1f"),
            common.fmt(r["tell_p99_ms"], ".1f"), r["max_db_connections"], r["errors"],
        ))
    lines.append("latencies in ms; conns: most connections open to the study database at once")
    errs = [f"{r['mode']} x{r['clients']}: {r['first_error']}" for r in result["rows"]
            if r["first_error"]]
    if errs:
        lines.append("first errors: " + "; ".join(errs))
    return "\n".join(lines)


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    if not opts["clients"] or any(n < 1 for n in opts["clients"]):
        raise BenchError(f"option clients must be positive integers, got {opts['clients']}")
    unknown = [m for m in opts["modes"] if m not in MODES]
    if unknown or not opts["modes"]:
        raise BenchError(f"option modes must name {' and/or '.join(MODES)}, got {opts['modes']}")
    if opts["trials_per_client"] < 1 or opts["reports_per_trial"] < 0:
        raise BenchError("options trials_per_client >= 1 and reports_per_trial >= 0, please")
    return opts
