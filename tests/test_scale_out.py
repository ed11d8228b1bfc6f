"""Scale-out pieces: no password on disk or on screen, the storage URL from the environment, a
real PostgreSQL study (a fresh database per test, dropped afterwards), and a coordinator killed
with SIGKILL whose trials the next coordinator fails as stale and retries."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_module

# the study tests' tiny sizes and process helpers (tests/ is on sys.path, as for conftest.py)
from test_study import TINY, _cfg, _default_sigint

from mad_search.bench._common import free_port
from mad_search.bench.faults import kill_machine
from mad_search.settings import StudySettings
from mad_search.storage import scrub_passwords, scrub_run_dir
from mad_search.study import run_study

ROOT = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get("MAD_SEARCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def test_passwords_are_masked_in_text_and_in_hydras_files(tmp_path):
    secret = uuid.uuid4().hex[:12]
    text = f"- study.storage=postgresql+psycopg2://mad:{secret}@db.example:5432/s\nother: 1\n"
    assert secret not in scrub_passwords(text) and "mad:***@db.example" in scrub_passwords(text)
    assert scrub_passwords("sqlite:///outputs/x.db") == "sqlite:///outputs/x.db"
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(text)
    (hydra / "hydra.yaml").write_text("nothing: here\n")
    assert scrub_run_dir(tmp_path) == [hydra / "overrides.yaml"]
    assert secret not in (hydra / "overrides.yaml").read_text()


def test_storage_url_can_come_from_the_environment(monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/from_env.db"
    monkeypatch.setenv("MAD_SEARCH_STORAGE", url)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=layer_patterns"])
    assert StudySettings.from_config(cfg.study).storage == url
    monkeypatch.delenv("MAD_SEARCH_STORAGE")
    assert StudySettings.from_config(cfg.study).storage == "sqlite:///outputs/mad_search.db"


def _cli(tmp_path, *args, env=None, **kw):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MAD_SEARCH_CACHE": str(tmp_path / "cache"),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "mad_search", "+sweep=layer_patterns", *TINY,
         f"hydra.run.dir={tmp_path}/run", *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_default_sigint, **kw,
    )


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_no_password_is_written_or_printed(tmp_path):
    """The URL typed on the command line (Hydra saves every override in .hydra/) and the one
    given through MAD_SEARCH_STORAGE: neither password reaches the run directory or the
    terminal, also when the server cannot be reached."""
    secret = "pw" + uuid.uuid4().hex[:10]
    proc = _cli(tmp_path, f"study.storage=postgresql://mad:{secret}@127.0.0.1:1/nowhere")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "***" in out, out
    assert secret not in out
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").exists()
    assert _files_containing(tmp_path, secret) == []
    proc = _cli(tmp_path, env={"MAD_SEARCH_STORAGE": f"postgresql://mad:{secret}@127.0.0.1:1/x"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and secret not in out, out
    assert _files_containing(tmp_path, secret) == []


# --- a real PostgreSQL server -------------------------------------------------------------------


def _admin():
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(f"{PG_SERVER}/postgres", connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {PG_SERVER}: {str(exc).splitlines()[0]}")
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_url():
    """A fresh database on the local server, dropped afterwards."""
    conn = _admin()
    name = f"mad_test_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.close()


@pytest.mark.slow
def test_a_study_on_postgresql_records_host_and_worker_and_the_optuna_cli_reads_it(
    tmp_path, pg_url
):
    proc = _cli(tmp_path, f"study.storage={pg_url}", "study.n_trials=3", "search.params={}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="layer_patterns", storage=pg_url)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials), out
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done
    for t in done:
        assert t.user_attrs["host"] and t.user_attrs["worker"] in (0, 1)
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials", "--study-name", "layer_patterns",
         "--storage", pg_url, "-f", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count('"number"') == 3


# --- a coordinator killed without warning -------------------------------------------------------


def _running(storage: str) -> list:
    try:
        study = optuna.load_study(study_name="layer_patterns", storage=storage)
    except Exception:
        return []
    return study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def _kill_coordinator_mid_trial(tmp_path, storage: str, *args) -> list[int]:
    """Start a study, wait until two trials are running, SIGKILL the coordinator and its
    workers (a lost machine); the numbers of the trials left RUNNING."""
    proc = _cli(tmp_path, f"study.storage={storage}", *args, start_new_session=True)
    t0 = time.time()
    while len(_running(storage)) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 120, "no trials started"
        time.sleep(0.3)
    kill_machine(proc)
    return sorted(t.number for t in _running(storage))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkilled_coordinator_costs_only_its_running_trials(tmp_path, backend, request):
    storage = (
        f"sqlite:///{tmp_path}/study.db"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    beat = ["study.heartbeat.interval=1", "study.heartbeat.grace_period=3", "search.params={}"]
    stale = _kill_coordinator_mid_trial(tmp_path, storage, "study.n_trials=6",
                                        "train.max_steps=3000", *beat)
    assert len(stale) == 2
    before = {
        t.number: t.state
        for t in optuna.load_study(study_name="layer_patterns", storage=storage).get_trials()
        if t.state.is_finished()
    }
    time.sleep(4)  # past the grace period: no heartbeat since the kill
    # 3 trials: the third reference trial, left waiting by the killed run, comes first
    proc = _cli(tmp_path, f"study.storage={storage}", "study.n_trials=3", "train.max_steps=30",
                *beat)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "2 stale trial(s)" in out and "retried with the same parameters" in out, out
    trials = optuna.load_study(study_name="layer_patterns", storage=storage).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    by_number = {t.number: t for t in trials}
    for n in stale:
        assert by_number[n].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") in stale]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == stale
    for retry in retries:  # the same parameters and the same layer sequence
        original = by_number[retry.system_attrs["failed_trial"]]
        assert retry.params == original.params
        assert retry.user_attrs.get("reference_pattern") == original.user_attrs.get(
            "reference_pattern"
        )
        assert retry.state == optuna.trial.TrialState.COMPLETE
    # nothing that had finished was lost or rewritten
    assert all(by_number[n].state == state for n, state in before.items())


# --- the gRPC storage proxy ---------------------------------------------------------------------


def test_proxy_urls_are_checked_and_an_unreachable_proxy_is_one_line():
    from mad_search.errors import ConfigError
    from mad_search.storage import StudyStorage, grpc_address

    assert grpc_address("grpc://10.0.0.5:13000") == ("10.0.0.5", 13000)
    assert grpc_address("postgresql://u@h/db") is None
    with pytest.raises(ConfigError, match="grpc://HOST:PORT"):
        grpc_address("grpc://nohost")
    port = free_port()  # a port nobody listens on
    with pytest.raises(ConfigError) as err:
        StudyStorage(f"grpc://127.0.0.1:{port}")
    assert str(err.value).startswith(f"cannot reach the storage proxy at grpc://127.0.0.1:{port}")
    assert "python -m mad_search.proxy" in str(err.value) and "\n" not in str(err.value)


def _start_proxy(url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mad_search.proxy", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "MAD_SEARCH_STORAGE": url},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    first = proc.stdout.readline()  # printed once the storage is open, before serving
    assert first.startswith("storage proxy for postgresql://"), first
    time.sleep(1.0)
    return proc, port


@pytest.mark.slow
def test_a_study_runs_through_the_grpc_proxy(tmp_path, pg_url):
    proxy, port = _start_proxy(pg_url)
    try:
        proc = _cli(tmp_path, f"study.storage=grpc://127.0.0.1:{port}", "study.n_trials=2",
                    "search.params={}")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    trials = optuna.load_study(study_name="layer_patterns", storage=pg_url).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,)
    )  # the third reference trial waits for the next run
    assert len(trials) == 2, out
    assert all(t.user_attrs["host"] for t in trials)


@pytest.mark.slow
def test_storage_benchmark_smoke(tmp_path, pg_url):
    import json

    import mad_search.bench as bench

    out = tmp_path / "bench_storage.json"
    server = pg_url.rsplit("/", 1)[0]
    assert bench.main(["storage", "clients=[1,2]", "trials_per_client=2",
                       f"server={server}", f"out={out}"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["clients"]): r for r in result["rows"]}
    assert set(rows) == {("postgres", 1), ("postgres", 2), ("grpc", 1), ("grpc", 2)}
    for (_, n), r in rows.items():
        assert r["complete"] == r["trials"] == 2 * n and r["errors"] == 0, r
        assert r["ops_per_s"] > 0 and r["ask_p50_ms"] > 0 and r["max_db_connections"] >= 1


@pytest.mark.slow
def test_a_finished_study_fails_a_dead_coordinators_fresh_trial_and_leaves_a_live_ones(
    tmp_path, pg_url, capsys
):
    """Another coordinator asks a trial and dies seconds before this one finishes its study:
    not stale at this one's last check, it would stay RUNNING once the last live machine has
    gone. The finishing coordinator waits one grace period: the silent trial is failed (its
    retry waits for the next run), a trial whose coordinator still beats is left to it."""
    cfg = _cfg(tmp_path, "search.params={}", "study.heartbeat.interval=1",
               "study.heartbeat.grace_period=2", f"study.storage={pg_url}", n_trials=1)
    storage = optuna.storages.RDBStorage(pg_url, heartbeat_interval=1, grace_period=2)
    other = optuna.create_study(study_name=cfg.study.name, storage=storage, direction="maximize")
    dead, live = other.ask(), other.ask()
    mine_done, finished = threading.Event(), threading.Event()

    def beat():  # the other machine: beats both until this one's trial completes, then only
        while not finished.is_set():  # the live one (the dead one's machine is gone)
            if not mine_done.is_set():
                states = [t.state for t in other.get_trials(deepcopy=False)]
                if optuna.trial.TrialState.COMPLETE in states:
                    mine_done.set()
            for trial in ([live] if mine_done.is_set() else [dead, live]):
                storage.record_heartbeat(trial._trial_id)
            time.sleep(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        run_study(cfg, tmp_path / "run")
    finally:
        finished.set()
        thread.join(timeout=10)
    out = capsys.readouterr().out
    assert mine_done.is_set(), out
    states = {t.number: t.state for t in other.get_trials()}
    assert states[dead.number] == optuna.trial.TrialState.FAIL, (states, out)
    assert states[live.number] == optuna.trial.TrialState.RUNNING, (states, out)
    retries = [t for t in other.get_trials()
               if t.system_attrs.get("failed_trial") == dead.number]
    assert [t.state for t in retries] == [optuna.trial.TrialState.WAITING], out
    assert f"stale trial(s) [{dead.number}] of another coordinator failed" in out, out
    assert f"[{live.number}] left to their live coordinators" in out, out
