"""The Optuna coordinator: the only process that opens the study's storage.

It asks the sampler for a trial, turns the suggestions into run plans (one per task, see
:mod:`mad_search.sweep`), hands the trial to the first free Hogwild worker at once (no batch
barrier), answers each worker :class:`~mad_search.hogwild.messages.Report` with
``trial.report`` / ``trial.should_prune``, and tells Optuna the result with the trial's layer
sequence, sizes, metrics and Hogwild counters as user attributes. Workers never touch the
storage, so a SQLite file is safe; PostgreSQL lets several machines run the same command against
one study.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.trial import TrialState

import blocks
from mad_search import report, tasks
from mad_search.display import Progress
from mad_search.errors import RunDirError, UserError
from mad_search.hogwild import SharedTable, TrialJob, WorkerPool, share_task_data, table_key
from mad_search.hogwild.messages import Ready, Report, TrialEnd, Verdict
from mad_search.hogwild.pool import Slot
from mad_search.jobs import JobSource
from mad_search.plan import RunPlan
from mad_search.replay import (
    HELD_FILE,
    FinishedElsewhere,
    TrialLog,
    record_elsewhere,
    save_held,
    write,
)
from mad_search.storage import Outage, StorageLost, first_line, is_unreachable
from mad_search.sweep import SweepPlan, validate_sweep

_HOST = socket.gethostname()


def run_study(cfg: DictConfig, out_dir: str | os.PathLike, sweep: SweepPlan | None = None) -> dict:
    """Run the sweep in ``cfg`` (or the already checked ``sweep``): coordinator + Hogwild pool;
    returns the run summary."""
    sweep = sweep or validate_sweep(cfg)  # every config error before any worker starts
    out = run_jobs(sweep, Path(out_dir))
    try:
        summary = report.finish(
            out.study,
            Path(out_dir),
            out.tables,
            sweep,
            out.wall_seconds,
            out.restarts,
            interrupted=out.interrupted,
        )
    except OSError as exc:  # disk full, file system gone read-only: the study has every trial
        raise RunDirError(
            f"cannot write the report into {out_dir}: {exc.strerror or exc}; every trial is "
            f"recorded in study {sweep.study.name!r} at {sweep.storage.masked} "
            f"({report.dashboard_command(sweep.storage.url, sweep.storage.artifact_dir)} shows it)"
        ) from None
    if out.interrupted:
        raise KeyboardInterrupt
    return summary


@dataclass
class Outcome:
    study: optuna.Study
    tables: dict[str, SharedTable]
    wall_seconds: float
    restarts: int
    interrupted: bool


def run_jobs(source: JobSource, out_dir: Path) -> Outcome:
    """Start the pool and run ``source``'s trials through it."""
    # The workers import torch and the trial code while the coordinator builds the task data,
    # opens the study and creates the shared tables.
    hog = source.hogwild
    pool = WorkerPool(hog.workers, hog.threads_per_worker, hog.backends)
    try:
        return Coordinator(source, pool, out_dir).run()
    finally:
        pool.kill_all()  # already stopped unless something went wrong


class Coordinator:
    """One study run: open the study, keep every worker busy, record what they report.

    Every storage write goes through a :class:`~mad_search.replay.TrialLog` per trial, written
    as soon as the storage answers. If it stops answering (a database restart, a lost network)
    the workers keep training: their reports get "do not prune", no new trial starts, finished
    trials are held (and saved in the run directory), and the storage is tried again with
    back-off; when it answers, everything held is written. After ``study.outage_timeout``
    seconds the coordinator stops (:class:`~mad_search.storage.StorageLost`).
    """

    def __init__(self, source: JobSource, pool: WorkerPool, out_dir: Path):
        self.source, self.pool, self.out_dir = source, pool, out_dir
        self.task_data: dict[tuple, dict] = {}
        self.tables: dict[str, SharedTable] = {}
        self.running: dict[int, optuna.Trial] = {}  # trial number -> trial, while a worker has it
        # asked trials an MLX worker cannot run (a block without an MLX twin), waiting for a
        # torch worker of this mixed pool
        self.deferred: list[tuple[optuna.Trial, list[RunPlan]]] = []
        self.logs: dict[int, TrialLog] = {}  # trial number -> what to write, until recorded
        self.ended: list[TrialLog] = []  # worker free, result not yet recorded
        self.labels: dict[int, str] = {}  # trial number -> how the display names it
        self.started = 0
        self.last_started = False  # no trial is left to start (idle workers may lend threads)
        self.last_beat = 0.0  # when the running trials' heartbeats were last recorded
        self.last_stale_check = time.time()  # when other coordinators' trials were last checked
        self.n_trials = source.study.n_trials  # until the source's prepare() says
        self.progress = Progress(self.n_trials)
        self.outage = Outage(source.study.outage_timeout)
        self.held: frozenset[int] = frozenset()  # trials last written to held_trials.json

    def run(self) -> Outcome:
        source = self.source
        self.out_dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # We record the heartbeats ourselves (see _heartbeat); Optuna warns at every tell that
        # its heartbeat thread only runs inside study.optimize.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        # Task data is built (or loaded from the disk cache) once here and shared with the
        # workers; before the study is opened, so settings the generator cannot satisfy leave no
        # study behind.
        for plan in source.probe_plans:
            self._data(plan)
        self.study = self._open_study()
        for plan in source.probe_plans:
            self._table(plan)
        t_start = time.time()
        interrupted = self._loop(t_start)
        self._record_ended(after_loop=True)  # trials that ended just before a Ctrl-C
        if interrupted:
            self._abandon_running()
        else:
            self.pool.close()
            self._settle_others()
        return Outcome(
            self.study, self.tables, time.time() - t_start, self.pool.restarts, interrupted
        )

    # --- setting up ---------------------------------------------------------------------------

    def _open_study(self) -> optuna.Study:
        source, settings = self.source, self.source.study
        study = optuna.create_study(
            study_name=settings.name,
            storage=source.storage.open(),
            directions=list(source.directions),
            sampler=settings.make_sampler(),
            pruner=settings.make_pruner(),
            load_if_exists=True,
        )
        stale = self._fail_stale(study)
        before = len(study.get_trials(deepcopy=False))
        self.n_trials, prepared = source.prepare(study)
        self.progress.total = self.n_trials
        hog = source.hogwild
        print(
            f"study {settings.name!r} at {source.storage.masked}: {before} trials so far, "
            f"{prepared}; {hog.workers} workers x {hog.threads_per_worker} threads, "
            f"{hog.embedding} embedding"
        )
        if stale:
            hb = settings.heartbeat
            print(
                f"{len(stale)} stale trial(s) {sorted(stale)} failed: no heartbeat for "
                f"{hb['grace_period']} s (the coordinator running them died); "
                + (f"retried with the same parameters (at most {hb['max_retry']} times)"
                   if hb["max_retry"] else "not retried (study.heartbeat.max_retry=0)")
            )
        return study

    def _beats(self) -> bool:
        """Whether this study has heartbeats: configured, and a storage that keeps them (not
        the gRPC proxy: its server's storage has them)."""
        storage = self.source.storage.open()  # the one opened for this study
        return bool(self.source.study.heartbeat) and hasattr(storage, "record_heartbeat")

    def _fail_stale(self, study: optuna.Study) -> list[int]:
        """Fail the trials whose coordinator stopped sending heartbeats (Optuna's
        ``fail_stale_trials``; its retry callback enqueues each again with the same parameters
        and user attributes, linked by the system attribute ``failed_trial``); their numbers."""
        if not self._beats():
            return []
        running = {
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        }
        if not running:
            return []
        with warnings.catch_warnings():  # "experimental" since Optuna 2.9; the version is pinned
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.number in running
        ]

    def _heartbeat(self, trials: list[optuna.Trial] | None = None) -> None:
        """Record a heartbeat for ``trials`` now, or (None) for every running trial once
        ``study.heartbeat.interval`` seconds have passed since the last round (ask/tell has no
        heartbeat thread of its own: ``study.optimize`` does)."""
        if not self._beats() or self.outage.down:
            return
        now = time.time()
        if trials is None:
            if now - self.last_beat < self.source.study.heartbeat["interval"]:
                return
            trials = list(self.running.values()) + [t for t, _ in self.deferred]
            self.last_beat = now
        storage = self.source.storage.open()
        for trial in trials:
            if not self._call(storage.record_heartbeat, trial._trial_id)[0]:
                return

    def _check_stale(self) -> None:
        """Every grace period, fail the trials of other coordinators of this study that stopped
        beating (a machine lost while this one runs): the retries the heartbeat enqueues are
        then asked for by whichever coordinator has trials left to run, this one included."""
        if not self._beats() or self.outage.down:
            return
        now = time.time()
        if now - self.last_stale_check < self.source.study.heartbeat["grace_period"]:
            return
        self.last_stale_check = now
        ok, stale = self._call(self._fail_stale, self.study)
        if ok and stale:
            self.progress.event(self._stale_line(stale, "retried with the same parameters"))

    def _stale_line(self, stale: list[int], retried: str) -> str:
        """The line that says other coordinators' trials were failed as stale; ``retried``
        says what became of their retries (when the study retries at all)."""
        hb = self.source.study.heartbeat
        return (
            f"{len(stale)} stale trial(s) {sorted(stale)} of another coordinator failed: no "
            f"heartbeat for {hb['grace_period']} s; "
            + (retried if hb["max_retry"] else "not retried")
        )

    def _settle_others(self) -> None:
        """Before a finished study exits, give trials other coordinators left RUNNING one
        grace period to show they are alive. A coordinator killed just after it asked a trial
        leaves one whose last heartbeat is seconds old: not stale at this coordinator's last
        check, so without this wait it would stay RUNNING after the study's last live machine
        has gone. Silent ones are failed (and retried later, like any stale trial); trials of
        live coordinators are theirs to finish. No wait when no other trial is running."""
        if not self._beats() or self.outage.down:
            return

        def others() -> set[int]:
            ok, found = self._call(
                self.study.get_trials, False, (TrialState.RUNNING,)
            )
            return {t.number for t in found} if ok else set()

        waiting = others()
        if not waiting:
            return
        hb = self.source.study.heartbeat
        print(
            f"{len(waiting)} trial(s) {sorted(waiting)} of other coordinators still running; "
            f"waiting up to {hb['grace_period']} s for their heartbeats (Ctrl-C: stop waiting)"
        )
        stop = _InterruptFlag()
        failed: list[int] = []
        deadline = time.time() + hb["grace_period"] + hb["interval"]
        try:
            while waiting and not stop.raised and time.time() < deadline:
                time.sleep(min(1.0, hb["interval"]))
                ok, stale = self._call(self._fail_stale, self.study)
                if ok:
                    failed += [n for n in stale if n in waiting]
                waiting = others() if ok else waiting
        finally:
            stop.restore()
        if failed:
            print(self._stale_line(failed, "their retries wait in the study for the next run"))
        if waiting:
            print(f"{len(waiting)} trial(s) {sorted(waiting)} left to their live coordinators")

    def _data(self, plan: RunPlan) -> dict:
        """The plan's task data as tensors in shared memory, built (or loaded from the disk
        cache) the first time a task configuration is seen; workers read this one copy."""
        key = (
            plan.task_name,
            json.dumps(plan.task_settings, sort_keys=True, default=str),
            plan.seed,
        )
        if key not in self.task_data:
            built = tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings)
            self.task_data[key] = share_task_data(tasks.as_tensors(built))
        return self.task_data[key]

    def _table(self, plan: RunPlan) -> str:
        """The key of the plan's shared table, created the first time its task and width are
        seen (a budget can choose a width no probe had)."""
        key = table_key(plan.task_name, plan.task_settings, plan.d_model)
        if key not in self.tables:
            hog = self.source.hogwild
            self.tables[key] = SharedTable(
                plan.task_info.vocab_size,
                plan.d_model,
                hog.workers,
                seed=hog.seed,
                rule=hog.rule,
                share=hog.embedding == "shared",
            )
        return key

    # --- the loop -----------------------------------------------------------------------------

    def _loop(self, t_start: float) -> bool:
        """Hand out trials and relay reports until every trial has ended and is recorded; True
        if stopped by Ctrl-C. Ctrl-C only raises a flag that the loop checks between storage
        calls: a KeyboardInterrupt raised inside an SQLAlchemy query leaves that connection's
        read lock behind, and marking the running trials failed then fails with "database is
        locked". A second Ctrl-C gets Python's default behaviour back."""
        settings = self.source.study
        stop = _InterruptFlag()
        try:
            while not stop.raised:
                self._retry_storage()
                if self.outage.expired(time.time()):
                    self._give_up()
                timed_out = (
                    settings.timeout is not None and time.time() - t_start > settings.timeout
                )
                self.last_started = self.started >= self.n_trials or timed_out or stop.raised
                for slot in self.pool.free_slots():
                    if self.started >= self.n_trials or timed_out or stop.raised:
                        break
                    if self.outage.down or not self._start_trial(slot):
                        break
                # Results are written after the freed workers have their next trial: a worker
                # never waits for the storage (about 30 writes per trial).
                self._record_ended()
                if (
                    not self.running
                    and not self.ended
                    and not self.deferred
                    and (self.started >= self.n_trials or timed_out)
                ):
                    break
                for slot, msg in self.pool.wait(0.5):
                    self._handle(slot, msg)
                self._heartbeat()
                self._check_stale()
                self.progress.status()
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the flag was installed
            return True
        finally:
            stop.restore()
        return stop.raised

    def _start_trial(self, slot: Slot) -> bool:
        """Ask for a trial and hand it to ``slot``'s worker; False if the storage did not
        answer the ask (nothing started). A trial whose blocks lack MLX twins waits for a torch
        worker (an MLX slot meanwhile asks for nothing more)."""
        if self.deferred:
            if slot.backend == "mlx":
                return True
            trial, plans = self.deferred.pop(0)
            self._launch(slot, trial, [dataclasses.replace(p, backend="torch") for p in plans])
            return True
        source, study = self.source, self.study
        asked, trial = self._call(study.ask)
        if not asked:
            return False
        # its first heartbeat at once: a trial left RUNNING with none is never found stale, so
        # a coordinator killed between the ask and the launch would leave it RUNNING for good
        self._heartbeat([trial])
        self.started += 1
        log = self.logs[trial.number] = TrialLog(trial)
        try:
            plans = source.plans(trial)
        except UserError as exc:
            log.set_attrs({"fail_reason": f"invalid suggestion: {exc}"})
            log.end("FAIL", event=f"trial {trial.number} failed: invalid suggestion: {exc}")
            self.ended.append(log)
            return True
        if slot.backend == "mlx" and not _has_twins(plans):
            self.deferred.append((trial, plans))
            return True
        self._launch(slot, trial, [dataclasses.replace(p, backend=slot.backend) for p in plans])
        return True

    def _launch(self, slot: Slot, trial: optuna.Trial, plans: list[RunPlan]) -> None:
        """Send ``trial``'s job to ``slot``'s worker and record its start."""
        source, progress = self.source, self.progress
        log = self.logs[trial.number]
        keys = [self._table(p) for p in plans]
        job = TrialJob(
            number=trial.number,
            plans=plans,
            table_keys=keys,
            hogwild=source.hogwild,
            tables={k: self.tables[k] for k in keys},
            data=[self._data(p) for p in plans],
            block_modules=source.block_modules,
            **source.job_fields(trial),
        )
        self.pool.submit(slot, job)  # first, so the worker starts while we write
        self.running[trial.number] = trial
        self._heartbeat([trial])  # beating from its launch (a deferred trial waited a while)
        plan = plans[0]
        log.set_attrs(
            {
                "pattern": plan.pattern,
                "layers": plan.layers,
                "d_model": plan.d_model,
                "worker": slot.index,
                "host": _HOST,
                "embedding": source.hogwild.embedding,
                **({"budget": plan.budget} if plan.budget else {}),
            }
        )
        self._flush(log)
        label = self.labels[trial.number] = source.label(trial, plans)
        progress.workers[slot.index] = f"#{trial.number} {label}"
        progress.event(
            f"trial {trial.number} -> worker {slot.index}: {label} (d_model {plan.d_model})"
            + (f" [{slot.backend}]" if slot.backend != "torch" else "")
        )

    def _handle(self, slot: Slot, msg: Ready | Report | TrialEnd | None) -> None:
        """Act on one worker message. A trial's end frees its worker at once; its result is
        written by :meth:`_record_ended` once the free workers have new trials."""
        if msg is None:
            self._worker_died(slot)
        elif isinstance(msg, Ready):
            slot.ready = True
        elif msg.number not in self.running:
            return
        elif isinstance(msg, Report):
            log = self.logs[msg.number]
            prune = False
            if self.source.reports_intermediate:
                log.reports[msg.step] = msg.value
                if self._flush(log) and not log.elsewhere:  # no storage: keep training
                    prune = bool(self._call(log.trial.should_prune)[1])
            # a dead worker: wait() reports it
            self.pool.send(slot, Verdict(prune=prune, threads=self._threads_for(slot)))
            label = self.labels.get(msg.number, "")
            self.progress.workers[slot.index] = (
                f"#{msg.number} {label} step {msg.step} val {msg.value:.3f}"
            )
        else:  # TrialEnd
            self.running.pop(msg.number)
            log = self.logs[msg.number]
            self._result(log, msg)
            self.ended.append(log)
            slot.job = None
            self.progress.workers.pop(slot.index, None)

    def _threads_for(self, slot: Slot) -> int:
        """Threads for ``slot``'s busy worker from now on: its own, plus, once no trial is left
        to start (and ``hogwild.lend_idle_threads``, on the CPU), an even share of the idle
        workers' threads, so the cores stay busy while the last trials finish and the pool
        never runs more threads than it was given."""
        own = self.pool.threads
        hog = self.source.hogwild
        if not (hog.lend_idle_threads and hog.device == "cpu" and self.last_started):
            return own
        if self.deferred:
            return own
        busy = [s.index for s in self.pool.slots if s.job is not None]
        idle = (self.pool.workers - len(busy)) * own
        if idle <= 0 or slot.index not in busy:
            return own
        rank = busy.index(slot.index)
        return own + idle // len(busy) + (1 if rank < idle % len(busy) else 0)

    def _worker_died(self, slot: Slot) -> None:
        job, code = slot.job, slot.process.exitcode
        why = f"exit code {code}"
        if code is not None and code < 0:
            why = f"killed by {signal.Signals(-code).name}"
        if job is not None and job.number in self.running:
            self.running.pop(job.number)
            log = self.logs[job.number]
            reason = f"worker {slot.index} (pid {slot.pid}) died: {why}"
            log.set_attrs({"fail_reason": reason})
            log.end("FAIL", event=f"trial {job.number} failed: {reason}")
            self.ended.append(log)
        self.progress.workers.pop(slot.index, None)
        self.progress.event(
            f"worker {slot.index} (pid {slot.pid}) died ({why}); starting a new one"
        )
        self.pool.restart(slot)

    # --- results ------------------------------------------------------------------------------

    def _result(self, log: TrialLog, end: TrialEnd) -> None:
        """Put a finished trial's result into its log (no storage call: the storage may be
        away; :meth:`_flush` writes it)."""
        result = end.result
        log.set_attrs(_flat_attrs(result))
        pattern = self.labels.pop(log.number, log.attrs.get("pattern"))
        if end.status == "done":
            outcome = self.source.outcome(log.trial, result)
            log.set_attrs(outcome.attrs)
            for step, value in outcome.intermediate:
                log.reports[step] = value
            values = [float(v) for v in outcome.values]
            test = outcome.attrs.get("test_accuracy", result["test_accuracy"])
            more = "".join(f" / {v:,.4g}" for v in values[1:])
            log.end(
                "COMPLETE",
                values,
                f"trial {log.number} complete: val {values[0]:.4f}{more} test {test:.4f} "
                f"({result['tokens_per_s']:,.0f} tok/s, {pattern})",
            )
        elif end.status == "pruned":
            log.end("PRUNED", event=f"trial {log.number} pruned ({pattern})")
        else:
            log.set_attrs({"fail_reason": end.reason})
            if result.get("traceback"):
                log.set_attrs({"traceback": result["traceback"][-1500:]})
            log.end("FAIL", event=f"trial {log.number} failed: {end.reason}")

    def _record_ended(self, after_loop: bool = False) -> None:
        """Write every ended trial's result (user attributes, then ``tell``); while the storage
        is away they are held, and saved in the run directory. After the loop a storage error
        is printed, not raised: a hard (second) Ctrl-C can leave it unusable."""
        try:
            for log in list(self.ended):
                if not self._flush(log):
                    break
        except Exception as exc:
            if not after_loop:
                raise
            print(f"could not record finished trials: {exc}", file=sys.stderr)
        self._save_held()

    def _flush(self, log: TrialLog) -> bool:
        """Write what the storage does not have yet of ``log``; False if the storage is (or
        just went) away. A trial failed as stale by another coordinator meanwhile (an outage
        longer than the heartbeat's grace period) gets its result recorded in its retry or
        as a new trial."""
        if self.outage.down:
            return False
        try:
            if not log.elsewhere:
                try:
                    write(self.study, log)
                except FinishedElsewhere:
                    log.elsewhere = True
            if log.elsewhere and log.state is not None:
                self._elsewhere(log)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._lost(exc)
            return False
        if log.recorded:
            self.logs.pop(log.number, None)
            if log in self.ended:
                self.ended.remove(log)
            key = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed"}[log.state]
            self.progress.counts[key] += 1
            self.progress.event(log.event)
        return True

    def _elsewhere(self, log: TrialLog) -> None:
        where = record_elsewhere(self.study, log.record(self.study.study_name))
        log.recorded = True
        self.progress.event(
            f"trial {log.number} was failed as stale while the storage was away; its result "
            f"was recorded {where}"
        )

    def _abandon_running(self) -> None:
        """After Ctrl-C: stop every worker and mark the trials they had failed (resumable).
        With the storage away they stay RUNNING: the next coordinator fails them as stale."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.pool.kill_all()
        for number in [*self.running, *(t.number for t, _ in self.deferred)]:
            log = self.logs[number]
            log.set_attrs({"fail_reason": "interrupted (Ctrl-C); rerun the command to resume"})
            log.end("FAIL", event=f"trial {number} interrupted")
            try:
                self._flush(log)
            except Exception as exc:  # storage left unusable by a hard (second) Ctrl-C
                print(f"could not mark trial {number} failed: {exc}", file=sys.stderr)
        print(
            f"\ninterrupted: {len(self.running)} running trial(s) "
            + (
                "left RUNNING (the storage is away): the next coordinator fails them as stale "
                "and retries them"
                if self.outage.down
                else "marked failed"
            )
            + "; the study is saved, rerun the same command to resume",
            file=sys.stderr,
        )
        if self._held_file().exists():
            print(self._replay_hint(), file=sys.stderr)

    # --- the storage going away ---------------------------------------------------------------

    def _call(self, fn, *args) -> tuple[bool, object]:
        """``(True, fn(*args))``, or ``(False, None)`` if the storage is away or just went."""
        if self.outage.down:
            return False, None
        try:
            return True, fn(*args)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._lost(exc)
            return False, None

    def _lost(self, exc: BaseException) -> None:
        now = time.time()
        reason = first_line(exc, self.source.storage.url)
        began = self.outage.failed(reason, now)
        limit = self.source.study.outage_timeout
        if began:
            self.progress.event(
                f"storage unreachable ({reason}): retrying with back-off"
                + (f" for up to {limit:g} s (study.outage_timeout)" if limit else "")
                + "; the workers keep training, finished trials are held"
            )
        else:
            self.progress.event(
                f"storage still unreachable after {now - self.outage.since:.0f} s; next try in "
                f"{self.outage.delay:.0f} s; {len(self.ended)} finished trial(s) held, "
                f"{len(self.running)} running"
            )
        self._save_held()

    def _retry_storage(self) -> None:
        """While the storage is away, try it when the back-off says; once it answers, record
        the heartbeats and everything held."""
        now = time.time()
        if not self.outage.down or not self.outage.due(now):
            return
        storage = self.source.storage.open()
        try:
            storage.get_study_id_from_name(self.source.study.name)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._lost(exc)
            return
        lasted = self.outage.recovered(now)
        self.progress.event(
            f"storage back after {lasted:.0f} s: recording {len(self.ended)} held trial(s)"
        )
        self.last_beat = 0.0
        self._heartbeat()
        for log in list(self.logs.values()):
            if log not in self.ended and not self._flush(log):
                return
        self._record_ended()

    def _held_file(self) -> Path:
        return self.out_dir / HELD_FILE

    def _save_held(self) -> None:
        """Keep the held results in the run directory (removed once all are recorded), so a
        coordinator that dies during the outage loses nothing finished. Written when the set
        of held trials changes (a held result never changes), not at every turn of the loop."""
        numbers = frozenset(log.number for log in self.ended)
        if numbers == self.held:
            return
        self.held = numbers  # also after a failed write: one line, not one per turn
        try:
            records = [log.record(self.study.study_name) for log in self.ended]
            save_held(self.out_dir, self.study.study_name, self.source.storage.masked, records)
        except OSError as exc:
            self.progress.event(
                f"cannot save the held trials in {self.out_dir}: {exc.strerror or exc}; they are "
                "kept in memory"
            )

    def _replay_hint(self) -> str:
        return (
            f"{len(self.ended)} finished trial(s) are saved in {self._held_file()}: "
            f"record them with `python -m mad_search.replay {self.out_dir}` once the storage "
            "is back"
        )

    def _give_up(self) -> None:
        lasted = time.time() - self.outage.since
        self.pool.kill_all()
        self._save_held()
        raise StorageLost(
            f"storage unreachable for {lasted:.0f} s (more than study.outage_timeout="
            f"{self.source.study.outage_timeout:g}; last error: {self.outage.reason}): stopped. "
            + (self._replay_hint() + ". " if self._held_file().exists() else "")
            + f"{len(self.running)} unfinished trial(s) stopped: the next coordinator fails them "
            "as stale and retries them"
        )


def _has_twins(plans: list[RunPlan]) -> bool:
    """Whether every block of ``plans`` has an MLX twin (an MLX worker can train them)."""
    twins = set(blocks.names("mlx"))
    return all(set(p.layers) <= twins for p in plans)


def _flat_attrs(result: dict) -> dict:
    out = {}
    for key in (
        "val_accuracy",
        "test_accuracy",
        "val_loss",
        "test_loss",
        "tokens_per_s",
        "params",
        "state_size",
        "slot",
        "pid",
        "host",
        "device",
        "backend",
        "wall_seconds",
        "threads",
        "shared_block_params",
        "table_is_shared",
    ):
        if key in result:
            out[key] = result[key]
    for key, value in (result.get("hogwild") or {}).items():
        out[f"hogwild.{key}"] = value
    for t in result.get("tasks") or []:
        for key in ("val_accuracy", "test_accuracy", "val_loss", "steps", "tokens_per_s",
                    "stopped"):
            out[f"{t['task']}.{key}"] = t[key]
        for key in ("val_accuracy_micro", "test_accuracy_micro"):
            if t.get(key) is not None:
                out[f"{t['task']}.{key}"] = t[key]
    return out


class _InterruptFlag:
    """Turns the first SIGINT into ``raised = True``; the next one raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self.raised = True
        signal.signal(signal.SIGINT, self._previous)

    def restore(self) -> None:
        if signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
