"""The search engine end to end on tiny settings: coordinator + Hogwild pool + real SQLite study."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from mad_search.bench._common import free_port
from mad_search.bench.faults import workers
from mad_search.config import ConfigError
from mad_search.hogwild import WorkerPool, WorkerStartError, share_task_data
from mad_search.hogwild.messages import Ready, Verdict
from mad_search.study import run_study, validate_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "task=in_context_recall",  # the default study is selective copying; tiny runs recall
    "task.seq_len=32",
    "task.num_train_examples=512",
    "task.num_test_examples=128",
    "model.d_model=32",
    "train.max_steps=30",
    "train.eval_every=10",
    "train.batch_size=16",
    "hogwild.workers=2",
    "hogwild.threads_per_worker=1",
]


def _cfg(tmp_path, *extra, sweep="layer_patterns", n_trials=4, search=None):
    overrides = [
        f"+sweep={sweep}",
        *TINY,
        f"study.n_trials={n_trials}",
        f"study.storage=sqlite:///{tmp_path}/study.db",
        *extra,
    ]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if search is not None:  # replace the sweep's search space wholesale
        with open_dict(cfg):
            cfg.search = search
    return cfg


def _study(tmp_path, name="layer_patterns"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/study.db")


def _plugin(tmp_path, name, body):
    """Write a block module in tmp_path; spawned workers inherit sys.path and import it."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))


def test_two_worker_study_records_everything(tmp_path):
    summary = run_study(_cfg(tmp_path, "search.params={}"), tmp_path / "run")
    study = _study(tmp_path)
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state.is_finished() for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, [t.user_attrs.get("fail_reason") for t in trials]
    for t in complete:
        a = t.user_attrs
        for key in (
            "pattern",
            "layers",
            "params",
            "state_size",
            "val_accuracy",
            "test_accuracy",
            "tokens_per_s",
            "worker",
            "hogwild.rows_per_step",
            "hogwild.collision_rate",
            "hogwild.staleness_mean",
            "in_context_recall.val_accuracy",
        ):
            assert key in a, key
        assert 0.0 <= t.value <= 1.0
        assert t.intermediate_values, "learning curves need intermediate values"
        assert a["shared_block_params"] == 0
        assert a["table_is_shared"] is True
    # the reference patterns were enqueued first
    assert trials[0].user_attrs.get("reference_pattern") == "(attention swiglu)*2"
    # both workers wrote the one shared table; it is finite
    (table,) = summary["tables"].values()
    assert table["finite"] and min(table["writes_per_worker"]) > 0
    assert {t.user_attrs["worker"] for t in complete} == {0, 1}
    # a freed worker got its next trial before the finished one was written and told
    for w in (0, 1):
        mine = sorted(
            (t for t in trials if t.user_attrs.get("worker") == w), key=lambda t: t.number
        )
        for prev, nxt in zip(mine, mine[1:]):
            assert nxt.datetime_start <= prev.datetime_complete, (prev.number, nxt.number)
    run = tmp_path / "run"
    for f in (
        "results.csv",
        "accuracy_vs_params.png",
        "accuracy_vs_state.png",
        "learning_curves.png",
        "study_summary.json",
    ):
        assert (run / f).stat().st_size > 0, f
    note = json.dumps(study._storage.get_study_system_attrs(study._study_id))
    assert "leaderboard" in note and "(attention swiglu)*2" in note
    with sqlite3.connect(tmp_path / "study.db") as db:  # dashboard reads while we write
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("lend", [True, False])
def test_an_idle_worker_lends_its_threads_to_the_last_trial(tmp_path, lend):
    # one trial on two one-thread workers: no trial is left to start, so from its first report
    # the busy worker trains with the idle one's thread too (hogwild.lend_idle_threads)
    cfg = _cfg(tmp_path, "search.params={}", "study.pruner.name=none",
               f"hogwild.lend_idle_threads={str(lend).lower()}", n_trials=1)
    run_study(cfg, tmp_path / "run")
    # (the sweep's other reference trials stay enqueued, waiting)
    (trial,) = [t for t in _study(tmp_path).get_trials() if t.state.is_finished()]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["threads"] == (2 if lend else 1)


@pytest.mark.parametrize(
    "workers,own,busy,last,want",
    [
        (2, 1, [0], True, {0: 2}),
        (2, 1, [0, 1], True, {0: 1, 1: 1}),
        (2, 1, [0], False, {0: 1}),  # trials still to start: an idle worker is about to get one
        (3, 1, [0, 2], True, {0: 2, 2: 1}),  # one spare thread, to the first busy slot
        (4, 2, [1], True, {1: 8}),
        (5, 1, [0, 1], True, {0: 3, 1: 2}),
    ],
)
def test_lent_threads_split_the_idle_workers_threads_among_the_busy(workers, own, busy, last,
                                                                     want):
    from types import SimpleNamespace

    from mad_search.study import Coordinator

    slots = [SimpleNamespace(index=i, job=object() if i in busy else None)
             for i in range(workers)]
    coordinator = SimpleNamespace(
        pool=SimpleNamespace(threads=own, workers=workers, slots=slots),
        source=SimpleNamespace(hogwild=SimpleNamespace(lend_idle_threads=True, device="cpu")),
        last_started=last, deferred=[],
    )
    got = {i: Coordinator._threads_for(coordinator, slots[i]) for i in busy}
    assert got == want
    if last:  # never more threads than the pool was given
        assert sum(got.values()) == workers * own


def test_task_data_is_shared_once_and_workers_never_import_datasets():
    data = {"train": (torch.randint(0, 9, (4, 8)), torch.randint(0, 9, (4, 8)))}
    assert all(t.is_shared() for t in share_task_data(data)["train"])
    code = (
        "import sys; import mad_search.hogwild.worker, mad_search.run, mad_search.train, blocks; "
        "print(sorted(m for m in ('datasets', 'pyarrow', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_worker_that_cannot_start_stops_the_pool_instead_of_looping():
    pool = WorkerPool(1, 0)  # torch.set_num_threads(0) raises in the worker before "ready"
    try:
        with pytest.raises(WorkerStartError, match="died 3 times before it was ready"):
            deadline = time.time() + 120
            while time.time() < deadline:
                for slot, msg in pool.wait(1.0):
                    assert msg is None, msg
                    pool.restart(slot)
    finally:
        pool.kill_all()


def test_a_message_to_a_worker_killed_since_it_last_spoke_is_a_death_not_a_crash():
    """The coordinator answers a worker's report after the worker may have died (CI once saw
    the default study stop with BrokenPipeError when a SIGKILL landed between a report and its
    verdict): the send fails quietly and the next wait reports the death."""
    pool = WorkerPool(1, 1)
    try:
        slot = pool.slots[0]
        deadline = time.time() + 120
        while not slot.ready and time.time() < deadline:
            for _, msg in pool.wait(1.0):
                assert isinstance(msg, Ready), msg
                slot.ready = True
        assert slot.ready
        assert pool.send(slot, Verdict(prune=False))  # alive: delivered
        os.kill(slot.pid, signal.SIGKILL)
        slot.process.join(timeout=30)
        assert not pool.send(slot, Verdict(prune=True))
        assert pool.wait(5.0) == [(slot, None)]
        pool.restart(slot)
        assert slot.process.is_alive()
    finally:
        pool.kill_all()


def test_rerun_resumes_and_loses_nothing(tmp_path):
    cfg = _cfg(tmp_path, "search.params={}", n_trials=2)
    run_study(cfg, tmp_path / "a")
    first = {
        t.number: t.user_attrs.get("pattern")
        for t in _study(tmp_path).get_trials()
        if t.state.is_finished()
    }
    assert len(first) == 2  # the third reference waits in the study for the next run
    run_study(cfg, tmp_path / "b")
    trials = _study(tmp_path).get_trials()
    assert len(trials) == 4
    assert {t.number: t.user_attrs.get("pattern") for t in trials[:2]} == first
    # references are not enqueued twice
    refs = [t.user_attrs.get("reference_pattern") for t in trials]
    assert refs.count("(attention swiglu)*2") == 1


def test_nan_trial_fails_with_reason_and_table_stays_finite(tmp_path):
    from mad_search.bench.faults import NAN_PLUGIN  # the faults benchmark stages the same block

    _plugin(tmp_path, "nan_block_plugin", NAN_PLUGIN)
    cfg = _cfg(
        tmp_path,
        "model.block_modules=[nan_block_plugin]",
        n_trials=3,
        search={"pattern": {"kind": "choice", "choices": ["nan_after_5", "attention"]}},
    )
    summary = run_study(cfg, tmp_path / "run")
    trials = _study(tmp_path).get_trials()
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    ok = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed and all("diverged" in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.user_attrs["pattern"] == "nan_after_5" for t in failed)
    assert ok and all(t.user_attrs["pattern"] == "attention" for t in ok)
    assert all(t["finite"] for t in summary["tables"].values())


def test_private_embedding_is_the_control(tmp_path):
    summary = run_study(
        _cfg(tmp_path, "hogwild.embedding=private", "search.params={}", n_trials=2),
        tmp_path / "run",
    )
    (table,) = summary["tables"].values()
    assert table["updates"] == 0  # nobody wrote the shared table
    trials = _study(tmp_path).get_trials()
    assert all(
        t.user_attrs.get("table_is_shared") is False
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("hogwild.embedding=both", "hogwild.embedding must be 'shared' or 'private'"),
        ("hogwild.workers=0", "hogwild.workers must be a positive integer"),
        ("study.n_trials=0", "study.n_trials must be a positive integer"),
        ("study.pruner.name=asha", "study.pruner.name 'asha' unknown"),
        ("search.pattern.ratio=['7:x']", "look like '7:1'"),
        ("search.pattern.kind=spiral", "search.pattern.kind 'spiral' unknown"),
        ("search.params={train.lr:{type:float,low:0.1,high:0.01}}", "low 0.1 is above high 0.01"),
        ("+search.reference=['mlstm*2 nope']", "unknown block 'nope'"),
        ("study.storage=notaurl", "study.storage must be a database URL"),
        ("+hogwild.worker=2", "unknown hogwild setting 'worker'"),
        ("+study.trials=2", "unknown study setting 'trials'"),
        ("hogwild.lr=0", "hogwild.lr must be positive"),
        ("hogwild.max_nonfinite=-1", "hogwild.max_nonfinite must be an integer >= 0"),
        ("hogwild.lend_idle_threads=sometimes", "hogwild.lend_idle_threads must be true or false"),
        # keys a single run honours but a sweep would silently ignore: refused
        ("train.embedding_optimizer=sgd", "train.embedding_optimizer='sgd' is not used in a sweep"),
        ("train.embedding_lr=0.1", "train.embedding_lr=0.1 is not used in a sweep"),
        ("device=cuda", "device='cuda' is not used in a sweep (the pool's workers use hogwild"),
        ("threads=1", "threads=1 is not used in a sweep"),
        ("model.sparse_embedding=true", "model.sparse_embedding=True is not used in a sweep"),
        (
            "+search.params={train.embedding_lr:{type:float,low:0.01,high:0.1}}",
            "search.params.train.embedding_lr is not used in a sweep",
        ),
    ],
)
def test_bad_sweep_config_fails_before_any_worker(tmp_path, override, fragment):
    with pytest.raises((ConfigError, ValueError)) as err:
        validate_sweep(_cfg(tmp_path, override))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_sqlite_storage_is_checked_without_opening_it(tmp_path):
    sweep = validate_sweep(_cfg(tmp_path / "new" / "dir"))
    assert not sweep.storage.opened  # opened once the workers are starting
    assert (tmp_path / "new" / "dir").is_dir() and not (
        tmp_path / "new" / "dir" / "study.db"
    ).exists()
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir" / "study.db").mkdir(parents=True)
    for sub, fragment in (("afile", "a file is in the way"), ("adir", "is a directory")):
        with pytest.raises(ConfigError) as err:
            validate_sweep(_cfg(tmp_path / sub))
        assert str(err.value).startswith("cannot open study storage sqlite:///"), err.value
        assert fragment in str(err.value) and "\n" not in str(err.value)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT, so
    # a suite run in the background would hand that to the CLI; give it a terminal's default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_cli(tmp_path, *args, timeout=300, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MAD_SEARCH_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mad_search",
            "+sweep=layer_patterns",
            *TINY,
            f"study.storage=sqlite:///{tmp_path}/study.db",
            f"hydra.run.dir={tmp_path}/run",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
        **kw,
    )


def _wait_for_running_trial(tmp_path, proc, timeout=120):
    storage = f"sqlite:///{tmp_path}/study.db"
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stdout.read()
        try:
            study = optuna.load_study(study_name="layer_patterns", storage=storage)
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if running and any(t.intermediate_values for t in running):
                return running
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError("no trial started")


@pytest.mark.slow
def test_sigkilled_worker_is_survived(tmp_path):
    proc = _run_cli(tmp_path, "study.n_trials=4", "search.params={}", "train.max_steps=60")
    _wait_for_running_trial(tmp_path, proc)
    pids = workers(proc.pid)
    assert pids, "no worker processes found"
    os.kill(pids[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    study = _study(tmp_path)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials), out
    killed = [t for t in trials if "SIGKILL" in str(t.user_attrs.get("fail_reason", ""))]
    assert len(killed) == 1, [t.user_attrs.get("fail_reason") for t in trials]
    summary = json.loads((tmp_path / "run" / "study_summary.json").read_text())
    assert summary["worker_restarts"] == 1
    assert all(t["finite"] for t in summary["tables"].values())


@pytest.mark.slow
def test_ctrl_c_marks_running_trials_and_rerun_resumes(tmp_path):
    proc = _run_cli(
        tmp_path,
        "study.n_trials=4",
        "search.params={}",
        "train.max_steps=200",
        start_new_session=True,
    )
    _wait_for_running_trial(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "rerun the same command to resume" in out
    trials = _study(tmp_path).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    interrupted = [t for t in trials if "interrupted" in str(t.user_attrs.get("fail_reason"))]
    assert interrupted
    before = {t.number: t.state for t in trials if t.state.is_finished()}
    proc = _run_cli(tmp_path, "study.n_trials=2", "search.params={}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    after = {t.number: t.state for t in _study(tmp_path).get_trials() if t.state.is_finished()}
    assert len(after) == len(before) + 2
    assert all(after[n] == state for n, state in before.items())  # nothing lost or rewritten


def test_storage_errors_are_one_line_with_password_masked(tmp_path):
    proc = _run_cli(tmp_path, "study.storage=postgresql://mad:s3cret@127.0.0.1:1/nowhere")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot open study storage"), out
    assert "s3cret" not in out and "***" in out


def test_optuna_cli_and_dashboard_read_the_study(tmp_path, capsys):
    run_study(_cfg(tmp_path, "search.params={}", n_trials=2), tmp_path / "run")
    (printed,) = [
        line.removeprefix("dashboard: ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("dashboard: ")
    ]
    storage = f"sqlite:///{tmp_path}/study.db"
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [
            str(bin_dir / "optuna"),
            "trials",
            "--study-name",
            "layer_patterns",
            "--storage",
            storage,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    done = {r["number"] for r in rows if r["state"] == "COMPLETE"}
    assert done == {0, 1}  # a third reference trial waits for the next run

    port = free_port()
    # The command exactly as the CLI printed it, run from another directory with the virtual
    # environment's bin/ off PATH (as for a user who never activated it).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != bin_dir
    )
    dash = subprocess.Popen(
        [*shlex.split(printed), "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere,
        env={**os.environ, "PATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "dashboard did not answer"
        (study,) = body["study_summaries"]
        assert study["study_name"] == "layer_patterns"
        sid = study["study_id"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{sid}?after=0", timeout=5
        ) as r:
            detail = json.loads(r.read())
        assert sum(t["state"] == "Complete" for t in detail["trials"]) == 2
        assert "leaderboard" in detail["note"]["body"]
    finally:
        dash.terminate()
        dash.wait(timeout=10)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="hogwild.device=cuda needs a CUDA GPU; none here")
def test_cuda_workers_keep_the_table_in_cpu_shared_memory(tmp_path):
    summary = run_study(
        _cfg(tmp_path, "hogwild.device=cuda", "search.params={}", n_trials=3), tmp_path / "run"
    )
    trials = _study(tmp_path).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3, [t.user_attrs.get("fail_reason") for t in trials]
    assert all(t.user_attrs["device"] == "cuda" and t.user_attrs["table_is_shared"] for t in done)
    (table,) = summary["tables"].values()
    assert table["finite"] and min(table["writes_per_worker"]) > 0


def test_language_modelling_study_minimises_validation_loss(tmp_path, capsys):
    """On the text task a trial is judged, pruned and ranked by validation loss (lower is
    better): the study minimises it, each trial's value is its val_loss attr, intermediate
    values are losses, and the leaderboard lists the lowest first."""
    cfg = _cfg(tmp_path, "task=text", "train.max_steps=20", "search.params={}", n_trials=3,
               search={"pattern": {"kind": "choice", "choices": ["attention", "short_conv",
                                                                 "swiglu"]}})
    run_study(cfg, tmp_path / "run")
    study = _study(tmp_path)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        assert t.value == pytest.approx(t.user_attrs["val_loss"])
        assert t.value == pytest.approx(min(t.intermediate_values.values()))  # the best checkpoint
        assert t.value > 1.0  # a loss in nats, not an accuracy
    board = capsys.readouterr().out
    assert "val loss" in board
    ranked = sorted(done, key=lambda t: t.value)
    positions = [board.index(f"\n{t.number:>4}  ") for t in ranked]
    assert positions == sorted(positions)


def test_tasks_judged_differently_cannot_share_a_study(tmp_path):
    cfg = _cfg(tmp_path, "search.params={}")
    with open_dict(cfg):
        cfg.study.tasks = ["in_context_recall", "text"]
    with pytest.raises(ConfigError, match="mixes tasks judged by loss \\(text\\)"):
        validate_sweep(cfg)
