"""Faults against real studies: what each costs.

    python -m mad_search.bench faults [faults=[...]] [n_trials=6] [max_steps=150]
                                      [outage_s=8] [grace_s=3]

Each fault runs the real command (``python -m mad_search +sweep=layer_patterns``, tiny sizes)
against a real storage, does the damage, lets the study finish (rerunning the command where a
user would), and then reads the study:

- ``worker_sigkill``: one Hogwild worker killed with SIGKILL mid-trial (SQLite).
- ``coordinator_sigkill``: the coordinator and its workers killed with SIGKILL (a lost machine),
  then the command rerun (SQLite): the next coordinator fails the stale trials and retries them.
- ``two_machines``: two coordinators on one PostgreSQL study; one killed with SIGKILL; the other
  fails its stale trials while it runs and picks up their retries (trials 5x ``max_steps`` long,
  so that the first machine is still busy when the second has started).
- ``postgres_restart``: PostgreSQL stopped for ``outage_s`` seconds mid-study, then started.
- ``nan_trial``: a layer sequence whose loss goes NaN (a plug-in block).
- ``storage_unreachable``: a PostgreSQL URL nobody answers, at start.
- ``run_dir_full``: the run directory's file system fills up mid-study.
- ``run_dir_read_only``: the run directory on a read-only file system, at start.

PostgreSQL faults use a throwaway server of our own (:mod:`mad_search.bench._postgres`: a real
restart without touching the machine's server); the run-directory faults mount a small tmpfs
(root only; skipped, saying so, where mounting is not allowed). Columns: trials finished
(COMPLETE or PRUNED), failed, lost (a finished trial missing or changed, a result held and never
recorded, or a trial left RUNNING), retried (stale trials enqueued again), the shared tables
finite (from the final run's ``study_summary.json``), the study completed (every trial it was
asked for finished, or, for a fault at start, nothing started), and the line the user saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mad_search.bench import BenchError
from mad_search.bench import _common as common

FAULTS = (
    "worker_sigkill",
    "coordinator_sigkill",
    "two_machines",
    "postgres_restart",
    "nan_trial",
    "storage_unreachable",
    "run_dir_full",
    "run_dir_read_only",
)
DEFAULTS: dict[str, Any] = {
    "faults": list(FAULTS),
    "n_trials": 6,
    "max_steps": 150,
    "outage_s": 8,
    "grace_s": 3,
}
SIZES = [
    "task=in_context_recall",
    "task.seq_len=32",
    "task.num_train_examples=512",
    "task.num_test_examples=128",
    "model.d_model=32",
    "train.eval_every=10",
    "train.batch_size=16",
    "hogwild.workers=2",
    "hogwild.threads_per_worker=1",
    "search.params={}",
]
ROOT = Path(__file__).resolve().parents[2]
TWO_MACHINES_STEPS = 5  # see two_machines


class _Scene:
    """One fault's working folder, its commands and what they printed."""

    def __init__(self, root: Path, opts: dict):
        self.root, self.opts = root, opts
        self.outputs: list[str] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(root)]),
            "MAD_SEARCH_CACHE": str(root / "cache"),
        }
        self.env.pop("MAD_SEARCH_STORAGE", None)
        grace = opts["grace_s"]
        self.beat = [
            f"study.heartbeat.interval={max(1, grace // 3)}",
            f"study.heartbeat.grace_period={grace}",
        ]

    def start(self, storage: str, *args: str, run: str = "run", steps: int | None = None):
        return subprocess.Popen(
            [sys.executable, "-m", "mad_search", "+sweep=layer_patterns", *SIZES,
             f"study.n_trials={self.opts['n_trials']}",
             f"train.max_steps={steps or self.opts['max_steps']}", *self.beat,
             f"study.storage={storage}", f"hydra.run.dir={self.root / run}", *args],
            cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )

    def finish(self, proc, timeout: float = 600) -> int:
        out, _ = proc.communicate(timeout=timeout)
        self.outputs.append(out)
        return proc.returncode

    def text(self) -> str:
        return "\n".join(self.outputs)


def trials(storage: str) -> list:
    """The trials of the ``layer_patterns`` study at ``storage`` (none while it cannot be read)."""
    import optuna

    try:
        return optuna.load_study(study_name="layer_patterns", storage=storage).get_trials()
    except Exception:
        return []


def wait_running(storage: str, procs, at_least: int = 1, timeout: float = 300) -> None:
    """Until ``at_least`` trials are RUNNING and one has reported."""
    from optuna.trial import TrialState

    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"the study ended early: {p.stdout.read()[-2000:]}")
        running = [t for t in trials(storage) if t.state == TrialState.RUNNING]
        if len(running) >= at_least and any(t.intermediate_values for t in running):
            return
        time.sleep(0.3)
    raise RuntimeError("no trial started")


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def workers(pid: int) -> list[int]:
    """The Hogwild worker processes of the coordinator ``pid`` (spawned: ``spawn_main``)."""
    return [
        p for p in children(pid)
        if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
    ]


def kill_machine(proc) -> None:
    """SIGKILL the coordinator and every process of its group (a lost machine)."""
    pids = children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.stdout.read()


def _line(text: str, *patterns: str) -> str:
    """The first output line matching any of ``patterns`` (what the user saw)."""
    for pattern in patterns:
        for line in text.splitlines():
            if re.search(pattern, line):
                return line.strip()
    return ""


def _snapshot(storage: str) -> dict[int, tuple]:
    return {t.number: (t.state.name, t.values) for t in trials(storage) if t.state.is_finished()}


def _row(fault: str, scene: _Scene, storage: str | None, before: dict, line: str,
         expected: int, rc: int, held_unrecorded: int = 0, run: str = "run") -> dict:
    """Read the study after the fault."""
    found = trials(storage) if storage else []
    states = [t.state.name for t in found]
    now = {t.number: (t.state.name, t.values) for t in found}
    changed = sum(1 for n, v in before.items() if now.get(n) != v)
    running = states.count("RUNNING")
    summary = scene.root / run / "study_summary.json"
    finite = None
    if summary.exists():
        tables = json.loads(summary.read_text())["tables"].values()
        finite = all(t["finite"] for t in tables)
    finished = sum(s in ("COMPLETE", "PRUNED") for s in states)
    return {
        "fault": fault,
        "trials_finished": finished,
        "trials_failed": states.count("FAIL"),
        "trials_lost": changed + running + held_unrecorded,
        "trials_retried": sum("failed_trial" in t.system_attrs for t in found),
        "left_running": running,
        "table_finite": finite,
        "study_completed": rc == 0 and sum(s != "RUNNING" for s in states) >= expected,
        "exit_code": rc,
        "line": line,
    }


# --- the faults ---------------------------------------------------------------------------------


def worker_sigkill(scene: _Scene, opts: dict) -> dict:
    storage = f"sqlite:///{scene.root}/study.db"
    proc = scene.start(storage)
    wait_running(storage, [proc])
    before = _snapshot(storage)
    os.kill(workers(proc.pid)[0], signal.SIGKILL)
    rc = scene.finish(proc)
    line = _line(scene.text(), r"worker \d+ \(pid \d+\) died")
    return _row("worker_sigkill", scene, storage, before, line, opts["n_trials"], rc)


def coordinator_sigkill(scene: _Scene, opts: dict) -> dict:
    storage = f"sqlite:///{scene.root}/study.db"
    proc = scene.start(storage, run="first")
    wait_running(storage, [proc], at_least=2)
    kill_machine(proc)
    before = _snapshot(storage)
    time.sleep(opts["grace_s"] + 1)
    rc = scene.finish(scene.start(storage))
    line = _line(scene.text(), r"stale trial\(s\)")
    # the killed run's trials count too: every trial of the study must be finished
    return _row("coordinator_sigkill", scene, storage, before, line, opts["n_trials"], rc)


def two_machines(scene: _Scene, opts: dict) -> dict:
    from mad_search.bench._postgres import PrivatePostgres

    with PrivatePostgres() as pg:
        storage = pg.create_database("study")
        # trials TWO_MACHINES_STEPS times as long: machine A must still be busy when B has
        # started (B's start-up is seconds; with the native kernels a 150-step trial at these
        # sizes is one second or less, and A finished the study before B ran a trial)
        steps = TWO_MACHINES_STEPS * opts["max_steps"]
        a = scene.start(storage, run="machine_a", steps=steps)
        wait_running(storage, [a], at_least=1)  # A creates the study first
        b = scene.start(storage, run="run", steps=steps)
        wait_running(storage, [a, b], at_least=4)
        kill_machine(a)
        before = _snapshot(storage)
        rc = scene.finish(b)
        line = _line(scene.text(), r"stale trial\(s\) .* of another coordinator")
        return _row("two_machines", scene, storage, before, line, opts["n_trials"], rc)


def postgres_restart(scene: _Scene, opts: dict) -> dict:
    from mad_search.bench._postgres import PrivatePostgres

    with PrivatePostgres() as pg:
        storage = pg.create_database("study")
        proc = scene.start(storage)
        wait_running(storage, [proc])
        before = _snapshot(storage)
        pg.stop()
        time.sleep(opts["outage_s"])
        pg.start()
        rc = scene.finish(proc)
        held = scene.root / "run" / "held_trials.json"
        unrecorded = len(json.loads(held.read_text())["trials"]) if held.exists() else 0
        text = scene.text()
        line = _line(text, r"storage unreachable \(")
        back = _line(text, r"storage back after")
        return _row("postgres_restart", scene, storage, before, f"{line} ... {back}",
                    opts["n_trials"], rc, held_unrecorded=unrecorded)


NAN_PLUGIN = """
import torch
from blocks import Block, register


@register("nan_after_5")
class NanAfter5(Block):
    '''A linear mixer whose output turns NaN after 5 training calls.'''

    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.lin = torch.nn.Linear(d_model, d_model)
        self.calls = 0

    def mix(self, x):
        self.calls += 1
        y = self.lin(x)
        return y * float("nan") if self.training and self.calls > 5 else y
"""


def nan_trial(scene: _Scene, opts: dict) -> dict:
    (scene.root / "nan_block_plugin.py").write_text(textwrap.dedent(NAN_PLUGIN))
    storage = f"sqlite:///{scene.root}/study.db"
    proc = scene.start(
        storage, "model.block_modules=[nan_block_plugin]", "~search.pattern",
        "+search.pattern={kind:choice,choices:[nan_after_5,attention]}", "search.reference=[]",
    )
    rc = scene.finish(proc)
    line = _line(scene.text(), r"trial \d+ failed: .*(diverged|non-finite)")
    return _row("nan_trial", scene, storage, {}, line, opts["n_trials"], rc)


def storage_unreachable(scene: _Scene, opts: dict) -> dict:
    port = common.free_port()
    storage = f"postgresql://postgres@127.0.0.1:{port}/study"
    rc = scene.finish(scene.start(storage), timeout=300)
    line = _line(scene.text(), r"^error: ")
    row = _row("storage_unreachable", scene, None, {}, line, 0, rc)
    row["study_completed"] = None  # nothing to complete: refused before anything started
    return row


@contextlib.contextmanager
def _tmpfs(path: Path, size_kb: int, read_only: bool = False) -> Iterator[str | None]:
    """A small tmpfs mounted at ``path`` for the block (read-only if asked), unmounted after;
    yields None, or why it could not be mounted (not root, no privilege)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        yield f"cannot mount a tmpfs: {(proc.stderr.strip() or 'mount failed')[:200]}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def run_dir_full(scene: _Scene, opts: dict) -> dict:
    disk = scene.root / "small_disk"
    with _tmpfs(disk, 4096) as why:
        if why:
            return {"fault": "run_dir_full", "skipped": why}
        storage = f"sqlite:///{scene.root}/study.db"  # the study itself on a disk with room
        proc = scene.start(storage, run="small_disk/run")
        wait_running(storage, [proc])
        before = _snapshot(storage)
        with open(disk / "filler", "wb") as f:  # fill the disk
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        rc = scene.finish(proc)
        line = _line(scene.text(), r"^error: ")
        row = _row("run_dir_full", scene, storage, before, line, opts["n_trials"], rc)
        # the study is complete in the storage; the report could not be written (exit 1)
        row["study_completed"] = rc == 1 and row["trials_lost"] == 0 and (
            row["trials_finished"] + row["trials_failed"] >= opts["n_trials"]
        )
        return row


def run_dir_read_only(scene: _Scene, opts: dict) -> dict:
    with _tmpfs(scene.root / "ro_disk", 64, read_only=True) as why:
        if why:
            return {"fault": "run_dir_read_only", "skipped": why}
        storage = f"sqlite:///{scene.root}/study.db"
        rc = scene.finish(scene.start(storage, run="ro_disk/run"), timeout=300)
        line = _line(scene.text(), r"^error: ")
        row = _row("run_dir_read_only", scene, storage, {}, line, 0, rc)
        row["study_completed"] = None  # refused before anything started
        return row


# --- the benchmark ------------------------------------------------------------------------------


def run(**opts) -> dict:
    faults = opts["faults"]
    if isinstance(faults, str):
        faults = [faults]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults:
        raise BenchError(f"faults: unknown fault {unknown[:1] or faults!r}; valid: "
                         f"{', '.join(FAULTS)}")
    common.check_at_least_one(opts, ["n_trials", "max_steps", "outage_s", "grace_s"])
    if opts["n_trials"] < 4:
        raise BenchError("n_trials must be at least 4 (two machines of two workers each)")
    rows = []
    for fault in faults:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"mad_fault_{fault}_") as tmp:
            scene = _Scene(Path(tmp), opts)
            try:
                row = globals()[fault](scene, opts)
            except Exception as exc:  # a fault that could not be staged: say so, go on
                row = {"fault": fault, "error": f"{type(exc).__name__}: {exc}"[:300],
                       "output_tail": scene.text()[-1500:]}
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"  {fault}: {row.get('line') or row.get('skipped') or row.get('error')}",
              flush=True)
    ok = [r for r in rows if "trials_lost" in r]
    return {
        "options": opts,
        "faults": rows,
        "trials_lost": sum(r["trials_lost"] for r in ok),
        "left_running": sum(r["left_running"] for r in ok),
        "tables_finite": all(r["table_finite"] is not False for r in ok),
        "target_met": bool(ok) and len(ok) == len(rows) and all(
            r["trials_lost"] == 0 and r["left_running"] == 0 and r["table_finite"] is not False
            and r["study_completed"] is not False and r["line"]
            for r in ok
        ),
        "run_id": uuid.uuid4().hex[:8],
    }


def table(result: dict) -> str:
    head = (f"{'fault':<20} {'finished':>8} {'failed':>6} {'lost':>4} {'retried':>7} "
            f"{'finite':>6} {'completed':>9} {'s':>5}  line")
    lines = [head, "-" * len(head)]

    def yn(v):
        return "-" if v is None else ("yes" if v else "NO")

    for r in result["faults"]:
        if "trials_lost" not in r:
            lines.append(f"{r['fault']:<20} {r.get('skipped') or r.get('error')}")
            continue
        lines.append(
            f"{r['fault']:<20} {r['trials_finished']:>8} {r['trials_failed']:>6} "
            f"{r['trials_lost']:>4} {r['trials_retried']:>7} {yn(r['table_finite']):>6} "
            f"{yn(r['study_completed']):>9} {r['seconds']:>5.0f}  {r['line'][:110]}"
        )
    lines.append(
        f"target (0 lost, 0 left RUNNING, tables finite, a clear line each): "
        f"{'met' if result['target_met'] else 'NOT met'}"
    )
    return "\n".join(lines)
