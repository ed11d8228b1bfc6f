"""The storage going away: which errors mean "unreachable", the back-off, held results replayed
exactly once, and a real PostgreSQL server (a private one, so it can be restarted) stopped in
the middle of a study: restarted in time (nothing lost), or not (the coordinator stops, the held
trials are replayed, the next coordinator retries the unfinished ones)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

# the study tests' tiny sizes and process helpers (tests/ is on sys.path, as for conftest.py)
from test_study import TINY, _default_sigint

from mad_search.bench.faults import wait_running
from mad_search.replay import HELD_FILE, TrialLog, load_held, replay_record, save_held
from mad_search.storage import Outage, is_unreachable

ROOT = Path(__file__).resolve().parents[1]


def test_connection_errors_are_unreachable_and_request_errors_are_not():
    refused = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = refused
    assert is_unreachable(refused) and is_unreachable(wrapped)
    assert is_unreachable(ConnectionResetError()) and is_unreachable(TimeoutError())
    assert not is_unreachable(ValueError("Cannot tell a FAIL trial."))
    assert not is_unreachable(optuna.exceptions.StorageInternalError("value too long"))
    assert not is_unreachable(KeyError("no study"))

    class RpcError(Exception):  # the shape of grpc's errors, as the storage proxy's client sees
        __module__ = "grpc._channel"

        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    import grpc

    assert is_unreachable(RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert is_unreachable(RpcError(grpc.StatusCode.UNKNOWN, "Exception calling application: "
                                   "(psycopg.OperationalError) connection failed"))
    assert not is_unreachable(RpcError(grpc.StatusCode.NOT_FOUND, "no trial"))


def test_backoff_doubles_to_its_ceiling_and_expires_after_the_limit():
    limit = random.uniform(50, 100)
    outage = Outage(limit, first=1.0, longest=8.0)
    t0 = random.uniform(0, 1e6)
    assert not outage.down and outage.due(t0) and not outage.expired(t0 + 1e6)
    assert outage.failed("refused", t0)  # the outage begins
    delays = [outage.delay]
    for k in range(6):
        assert not outage.failed("refused", t0 + k)
        delays.append(outage.delay)
    assert delays == [1, 2, 4, 8, 8, 8, 8]
    assert not outage.due(outage.next_try - 0.1) and outage.due(outage.next_try)
    assert not outage.expired(t0 + limit - 1) and outage.expired(t0 + limit + 1)
    assert outage.recovered(t0 + 30) == pytest.approx(30)
    assert not outage.down and not outage.expired(t0 + 1e6)
    assert not Outage(None).expired(0) and Outage(None).failed("x", 0)


def test_run_directory_problems_are_found_before_hydra_writes(tmp_path):
    from mad_search.rundir import run_dir_problem

    assert run_dir_problem(tmp_path / "a" / "b") is None  # made later, by Hydra
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_dir_problem(blocker / "run") == (
        f"cannot create the run directory {blocker / 'run'}: {blocker} is a file"
    )
    full = run_dir_problem(tmp_path / "run", min_free=1 << 62)  # more than any disk has free
    assert full.startswith(f"no space for the run directory {tmp_path / 'run'}: ")
    assert "KiB free on its file system" in full and "set hydra.run.dir" in full


def _study(tmp_path, name="s"):
    return optuna.create_study(
        study_name=name, storage=f"sqlite:///{tmp_path}/replay.db", load_if_exists=True
    )


def _held_log(study, value: float, state: str = "COMPLETE") -> dict:
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    log = TrialLog(trial)
    log.set_attrs({"pattern": "mlstm*4", "val_accuracy": value, "lr_seen": lr})
    log.reports = {10: value / 2, 20: value}
    log.end(state, [value] if state == "COMPLETE" else None)
    return log.record(study.study_name)


def test_a_held_result_is_replayed_into_its_own_trial_exactly_once(tmp_path):
    study = _study(tmp_path)
    value = random.random()
    rec = _held_log(study, value)
    rec = json.loads(json.dumps(rec))  # as read back from held_trials.json
    assert replay_record(study, rec) == f"into trial {rec['number']}"
    assert replay_record(study, rec).startswith("already recorded")
    (t,) = study.get_trials()
    assert t.state == TrialState.COMPLETE and t.value == value
    assert t.intermediate_values == {10: value / 2, 20: value}
    assert t.user_attrs["held_key"] == rec["key"] and t.user_attrs["pattern"] == "mlstm*4"
    pruned = _held_log(study, random.random(), state="PRUNED")
    replay_record(study, json.loads(json.dumps(pruned)))
    assert study.get_trials()[-1].state == TrialState.PRUNED


def test_a_result_whose_trial_was_failed_as_stale_goes_to_its_retry_or_a_new_trial(tmp_path):
    study = _study(tmp_path)
    value = random.random()
    rec = json.loads(json.dumps(_held_log(study, value)))
    # another coordinator failed it as stale, and its retry callback enqueued it again
    original = study.get_trials()[0]
    study.tell(original.number, state=TrialState.FAIL)
    study.enqueue_trial(original.params)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    study._storage.set_trial_system_attr(waiting._trial_id, "failed_trial", original.number)
    assert "the waiting retry of trial 0" in replay_record(study, rec)
    retry = study.get_trials()[1]
    assert retry.state == TrialState.COMPLETE and retry.value == value
    assert retry.params == original.params and retry.system_attrs["failed_trial"] == 0
    assert replay_record(study, rec).startswith("already recorded")
    # no retry waiting (max_retry reached): a new trial, linked to the original
    rec2 = json.loads(json.dumps(_held_log(study, random.random())))
    study.tell(rec2["number"], state=TrialState.FAIL)
    assert replay_record(study, rec2).startswith("as new trial")
    new = study.get_trials()[-1]
    assert new.system_attrs["replayed_from"] == rec2["number"] and new.value == rec2["values"][0]
    assert new.params == rec2["params"] and new.distributions == {
        "lr": FloatDistribution(1e-4, 1e-2, log=True)
    }
    assert len(study.get_trials()) == 4


def test_the_held_file_has_no_password_and_the_replay_command_records_it(tmp_path):
    study = _study(tmp_path, name="cli")
    recs = [_held_log(study, random.random()) for _ in range(3)]
    save_held(tmp_path, "cli", "postgresql://mad:***@db/x", recs)
    assert "***" in (tmp_path / HELD_FILE).read_text() and len(load_held(tmp_path)["trials"]) == 3
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MAD_SEARCH_STORAGE", None)
    no_password = subprocess.run(
        [sys.executable, "-m", "mad_search.replay", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert no_password.returncode == 2 and "needs its password" in no_password.stderr
    assert no_password.stderr.count("\n") == 1
    done = subprocess.run(
        [sys.executable, "-m", "mad_search.replay", str(tmp_path),
         "--storage", f"sqlite:///{tmp_path}/replay.db"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "3 held trial(s) recorded" in done.stdout
    assert not (tmp_path / HELD_FILE).exists()
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3


# --- a real PostgreSQL server stopped mid-study ------------------------------------------------


@pytest.fixture
def private_pg(tmp_path):
    pytest.importorskip("psycopg")
    from mad_search.bench._postgres import PrivatePostgres, bin_dir

    if bin_dir() is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
    with PrivatePostgres() as pg:
        yield pg


def _cli(tmp_path, storage, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAD_SEARCH_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen(
        [sys.executable, "-m", "mad_search", "+sweep=layer_patterns", *TINY,
         f"study.storage={storage}", f"hydra.run.dir={tmp_path}/run", "search.params={}", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_default_sigint,
    )


def _trials(url):
    return optuna.load_study(study_name="layer_patterns", storage=url).get_trials()


@pytest.mark.slow
def test_postgresql_restarted_mid_study_loses_no_trial(tmp_path, private_pg):
    url = private_pg.create_database(f"s_{uuid.uuid4().hex[:8]}")
    proc = _cli(tmp_path, url, "study.n_trials=5", "train.max_steps=150")
    wait_running(url, [proc])
    private_pg.stop()  # every connection dropped; new ones refused
    # away until a trial has ended during the outage (its result held on disk), at least 6 s
    deadline, held_path = time.monotonic() + 120, tmp_path / "run" / HELD_FILE
    time.sleep(6)
    while not held_path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    private_pg.start()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "storage unreachable (" in out and "storage back after" in out, out
    trials = _trials(url)
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials), out
    assert any("held_key" in t.user_attrs for t in trials)  # ended during the outage
    assert not (tmp_path / "run" / HELD_FILE).exists()


@pytest.mark.slow
def test_a_storage_that_stays_away_stops_the_coordinator_and_nothing_is_lost(
    tmp_path, private_pg
):
    url = private_pg.create_database(f"s_{uuid.uuid4().hex[:8]}")
    beat = ["study.heartbeat.interval=1", "study.heartbeat.grace_period=3"]
    proc = _cli(tmp_path, url, "study.n_trials=4", "train.max_steps=150",
                "study.outage_timeout=8", *beat)
    wait_running(url, [proc])
    private_pg.stop()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: storage unreachable for") and "stopped" in last, out
    assert "Warning" not in out, out  # the stale check every grace period: no Optuna warning
    # The trials in flight when the database went away either ended during the outage (held,
    # then replayed) or were still training when the coordinator gave up (left RUNNING, then
    # retried): which ones depends on the machine's speed, and both paths are checked below.
    held_path = tmp_path / "run" / HELD_FILE
    held = load_held(tmp_path / "run")["trials"] if held_path.exists() else []
    assert (f"python -m mad_search.replay {tmp_path}/run" in last) == bool(held), out
    private_pg.start()
    before = {t.number: t.state for t in _trials(url)}
    assert all(before[r["number"]] == TrialState.RUNNING for r in held)
    replay = subprocess.run(
        [sys.executable, "-m", "mad_search.replay", f"{tmp_path}/run", "--storage", url],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert replay.returncode == 0, replay.stderr
    by_number = {t.number: t for t in _trials(url)}
    for r in held:
        assert by_number[r["number"]].state == TrialState.COMPLETE
        assert by_number[r["number"]].value == r["values"][0]
    unfinished = sorted(n for n, t in by_number.items() if t.state == TrialState.RUNNING)
    assert held or unfinished, out  # the outage caught the trials in flight
    assert f"{len(unfinished)} unfinished trial(s) stopped" in last, out
    # the next coordinator fails the unfinished trials as stale and retries them
    time.sleep(4)
    proc = _cli(tmp_path, url, "study.n_trials=4", "train.max_steps=30", *beat)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert ("stale trial(s)" in out) == bool(unfinished) and "Warning" not in out, out
    trials = _trials(url)
    assert not [t for t in trials if t.state == TrialState.RUNNING], out
    retried = sorted(t.system_attrs["failed_trial"] for t in trials
                     if "failed_trial" in t.system_attrs)
    assert retried == unfinished


# --- the faults benchmark -----------------------------------------------------------------------


def test_bench_faults_refuses_unknown_faults_in_one_line(capsys):
    from mad_search import bench

    assert bench.main(["faults", "faults=[meteor]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown fault ['meteor']; valid: worker_sigkill" in err and "\n" not in err


@pytest.mark.slow
def test_bench_faults_two_machines_and_run_directory_faults(tmp_path):
    """The faults no other test covers (the rest have tests of their own above and in
    test_study / test_scale_out): every one loses nothing and says what happened in a line."""
    pytest.importorskip("psycopg")
    from mad_search import bench
    from mad_search.bench._postgres import bin_dir

    faults = ["two_machines", "storage_unreachable", "run_dir_full", "run_dir_read_only"]
    if bin_dir() is None:
        faults.remove("two_machines")
    out = tmp_path / "faults.json"
    assert bench.main(["faults", f"faults=[{','.join(faults)}]", "n_trials=4",
                       "max_steps=100", f"out={out}"]) == 0
    rows = {r["fault"]: r for r in json.loads(out.read_text())["faults"]}
    for fault, r in rows.items():
        if "skipped" in r:  # no privilege to mount a small file system here
            assert fault.startswith("run_dir_"), r
            continue
        assert "error" not in r, r
        assert r["trials_lost"] == 0 and r["left_running"] == 0, r
        assert r["table_finite"] is not False and r["study_completed"] is not False, r
        assert r["line"], r
    if "two_machines" in rows:
        r = rows["two_machines"]
        assert r["trials_retried"] >= 1 and "of another coordinator failed" in r["line"]
    assert rows["storage_unreachable"]["exit_code"] == 2
    assert rows["storage_unreachable"]["line"].startswith("error: cannot open study storage")
    if "skipped" not in rows["run_dir_full"]:
        assert rows["run_dir_full"]["exit_code"] == 1
        assert "No space left on device; every trial is recorded" in rows["run_dir_full"]["line"]
    if "skipped" not in rows["run_dir_read_only"]:
        assert "read-only file system" in rows["run_dir_read_only"]["line"]
