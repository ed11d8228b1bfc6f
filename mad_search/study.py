"""The Optuna coordinator: the only process that opens the study's storage.

It asks the sampler for a trial, turns the suggestions into run plans (one per task), hands the
trial to the first free Hogwild worker at once (no batch barrier), relays each worker report to
``trial.report`` / ``trial.should_prune`` and answers the worker, and tells Optuna the result with
the trial's layer sequence, sizes, metrics and Hogwild counters as user attributes. Workers never
touch the storage, so a SQLite file is safe; PostgreSQL lets several machines run the same
command against one study.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

import blocks
from mad_search import space as space_mod
from mad_search import tasks
from mad_search.config import USER_ERRORS, ConfigError, RunPlan, resolve
from mad_search.hogwild import (
    SharedTable,
    TrialJob,
    WorkerPool,
    pool_shape,
    share_task_data,
    table_key,
)

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
STUDY_KEYS = {"name", "storage", "n_trials", "timeout", "direction", "sampler", "pruner", "tasks"}
HOGWILD_KEYS = {
    "workers",
    "threads_per_worker",
    "embedding",
    "device",
    "lr",
    "rule",
    "max_nonfinite",
    "seed",
}


@dataclass
class SweepPlan:
    cfg: DictConfig
    space: dict
    task_cfgs: list[dict]
    study: dict
    hogwild: dict
    workers: int
    threads: int
    storage_url: str
    d_models: list[int]
    probe_plans: list[RunPlan] = field(default_factory=list)
    storage: Any = None  # the storage opened while checking (None: a SQLite file, opened later)


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        import re

        return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _task_cfgs(cfg: DictConfig, study_cfg: dict) -> list[dict]:
    """The tasks each trial trains on: ``study.tasks`` (names or mappings) or the ``task`` group."""
    listed = study_cfg.get("tasks")
    if not listed:
        return [dict(_container(cfg.task))]
    out = []
    from importlib import resources

    for item in listed:
        item = dict(item) if isinstance(item, dict) else {"name": item}
        name = item.get("name")
        if name not in tasks.names():
            raise ConfigError(
                f"study.tasks names unknown task {name!r}; valid: {', '.join(tasks.names())}"
            )
        base = OmegaConf.to_container(
            OmegaConf.load(resources.files("conf") / "task" / f"{name}.yaml")
        )
        base.update(item)
        out.append(base)
    return out


def _make_sampler(spec: dict) -> optuna.samplers.BaseSampler:
    spec = dict(spec or {})
    name = spec.pop("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError(f"study.sampler.name {name!r} unknown; valid: {', '.join(SAMPLERS)}")
    try:
        if name == "tpe":
            spec.setdefault("constant_liar", True)
            return optuna.samplers.TPESampler(**spec)
        return optuna.samplers.RandomSampler(**spec)
    except TypeError as exc:
        raise ConfigError(f"study.sampler ({name}): {exc}") from None


def _make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    spec = dict(spec or {})
    name = spec.pop("name", "median")
    if name not in PRUNERS:
        raise ConfigError(f"study.pruner.name {name!r} unknown; valid: {', '.join(PRUNERS)}")
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**spec)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**spec)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**spec)
        return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"study.pruner ({name}): {exc}") from None


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Open (and check) the study storage; one clear line, password masked, if it fails."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"study.storage must be a database URL like sqlite:///outputs/mad_search.db "
            f"or postgresql://user:pass@host/db, got {mask_url(str(url))!r}"
        )
    _check_sqlite_path(url)
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None
        )
    except Exception as exc:  # unreachable host, bad driver, malformed URL...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.replace(url, mask_url(url))
        raise ConfigError(f"cannot open study storage {mask_url(url)}: {reason[:300]}") from None
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        _sqlite_wal(storage)
    return storage


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (None for other URLs and in-memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).expanduser() if path and path != ":memory:" else None


def _check_sqlite_path(url: str) -> None:
    """Create a SQLite file's folder and check the file can be written, without opening it
    (``sqlalchemy`` is not imported); ConfigError (one line) otherwise."""
    path = _sqlite_file(url)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"cannot open study storage {mask_url(url)}: a file is in the way of the folder "
            f"{path.parent}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open study storage {mask_url(url)}: {exc.strerror}: {exc.filename}"
        ) from None
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.R_OK | os.W_OK):
        why = "is a directory" if path.is_dir() else "is not writable"
        raise ConfigError(f"cannot open study storage {mask_url(url)}: {target} {why}")


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging for a SQLite study file, synced at checkpoints rather than at every
    commit. The coordinator writes about 30 user attributes per trial, each its own Optuna
    commit; with SQLite's default rollback journal each one waits for an fsync (measured here:
    5.3 ms each, 0.16 s per trial during which a freed worker waits for its next trial; 1.5 ms
    each with WAL). WAL also lets optuna-dashboard read the file while the coordinator writes. A
    crash can lose the last commits but never corrupts the file (SQLite's guarantee for WAL +
    synchronous=NORMAL)."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener: reopen with it


def _apply(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def _has_interpolation(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_has_interpolation(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_interpolation(v) for v in node)
    return isinstance(node, str) and "${" in node


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for key ``a.b.c`` (what ``OmegaConf.update(merge=False)`` does
    on a config), creating missing levels."""
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"cannot set {key}: {'.'.join(parents[: i + 1])} is {child!r}, not a mapping"
            )
        node = child
    node[leaf] = value


def plans_for(cfg: DictConfig, task_cfgs: list[dict], overrides: dict[str, Any]) -> list[RunPlan]:
    """One validated run plan per task for a trial's overrides.

    The coordinator calls this for every probe at start-up and for every trial, so it works on
    plain containers (a deep copy of an OmegaConf tree costs about ten times more); a config
    with interpolations takes the OmegaConf path, so they see the overridden values."""
    # to_container builds a fresh tree, ours to change; a plain dict is the caller's: copy it.
    is_config = OmegaConf.is_config(cfg)
    base = OmegaConf.to_container(cfg, resolve=False) if is_config else copy.deepcopy(cfg)
    if _has_interpolation(base):
        trial_cfg: Any = _apply(cfg, overrides)
    else:
        trial_cfg = base
        for key, value in overrides.items():
            _set_dotted(trial_cfg, key, copy.deepcopy(_container(value)))
    out = []
    for task_cfg in task_cfgs:
        if isinstance(trial_cfg, dict):
            c: Any = {**trial_cfg, "task": copy.deepcopy(task_cfg)}
        else:
            c = copy.deepcopy(trial_cfg)
            c.task = OmegaConf.create(task_cfg)
        plan = resolve(c)
        plan.train.progress = False
        out.append(plan)
    return out


def validate_sweep(cfg: DictConfig) -> SweepPlan:
    """Check the whole sweep before any worker starts; raises one of ``USER_ERRORS``."""
    study_cfg = dict(_container(cfg.get("study")) or {})
    hog = dict(_container(cfg.get("hogwild")) or {})
    for key in sorted(set(study_cfg) - STUDY_KEYS):
        raise ConfigError(f"unknown study setting {key!r}; valid: {', '.join(sorted(STUDY_KEYS))}")
    for key in sorted(set(hog) - HOGWILD_KEYS):
        raise ConfigError(
            f"unknown hogwild setting {key!r}; valid: {', '.join(sorted(HOGWILD_KEYS))}"
        )
    for module in cfg.model.get("block_modules") or []:
        blocks.load_module(module)
    search = _container(cfg.get("search"))
    try:
        patterns = space_mod.validate(search, blocks.names())
    except space_mod.SpaceError as exc:
        raise ConfigError(str(exc)) from None
    n_trials = study_cfg.get("n_trials")
    if not isinstance(n_trials, int) or n_trials <= 0:
        raise ConfigError(f"study.n_trials must be a positive integer, got {n_trials!r}")
    timeout = study_cfg.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(
            f"study.timeout must be a positive number of seconds or null, got {timeout!r}"
        )
    if study_cfg.get("direction", "maximize") != "maximize":
        raise ConfigError("study.direction must be maximize (the objective is validation accuracy)")
    _make_sampler(study_cfg.get("sampler"))
    _make_pruner(study_cfg.get("pruner"))
    if not isinstance(study_cfg.get("name"), str) or not study_cfg["name"]:
        raise ConfigError(f"study.name must be a non-empty string, got {study_cfg.get('name')!r}")

    embedding = hog.get("embedding", "shared")
    if embedding not in ("shared", "private"):
        raise ConfigError(f"hogwild.embedding must be 'shared' or 'private', got {embedding!r}")
    device = str(hog.get("device", "cpu"))
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"hogwild.device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("hogwild.device=cuda but no CUDA device is available; use cpu")
    try:
        workers, threads = pool_shape(hog)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if hog.get("rule", "adagrad") not in ("sgd", "adagrad"):
        raise ConfigError(f"hogwild.rule must be sgd or adagrad, got {hog.get('rule')!r}")
    lr = hog.get("lr", 0.05)
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"hogwild.lr must be positive, got {lr!r}")

    params = (search or {}).get("params") or {}
    d_dist = params.get("model.d_model")
    if d_dist is None:
        d_models = [cfg.model.d_model]
    elif d_dist["type"] == "categorical":
        d_models = list(d_dist["choices"])
    else:
        raise ConfigError(
            "search.params.model.d_model must be categorical (one shared embedding "
            "table per task and width)"
        )
    task_cfgs = _task_cfgs(cfg, study_cfg)
    # Probe plans: every pattern x every categorical choice (bounded) must resolve and build.
    cats = {k: v["choices"] for k, v in params.items() if v["type"] == "categorical"}
    keys = list(cats)
    combos = list(itertools.islice(itertools.product(*cats.values()), 64)) or [()]
    probe_plans = []
    for layers in patterns or [None]:
        for combo in combos:
            overrides = dict(zip(keys, combo))
            if layers is not None:
                overrides["model.pattern"] = layers
            probe_plans += plans_for(cfg, task_cfgs, overrides)
    url = study_cfg.get("storage")
    if isinstance(url, str) and _sqlite_file(url) is not None:
        # A local file: checked here without opening it; opening it (and importing the database
        # layer, half a second) waits until the workers are starting.
        _check_sqlite_path(url)
        storage = None
    else:  # a server (or anything else): connect now, so an unreachable one fails here
        storage = make_storage(url)
    return SweepPlan(
        cfg=cfg,
        space=search,
        task_cfgs=task_cfgs,
        study=study_cfg,
        hogwild=hog,
        workers=workers,
        threads=threads,
        storage_url=study_cfg["storage"],
        d_models=d_models,
        probe_plans=probe_plans,
        storage=storage,
    )


def _enqueue_references(study: optuna.Study, space: dict) -> int:
    existing = study.get_trials(deepcopy=False)
    added = 0
    for ref in space.get("reference") or []:
        if isinstance(ref, str):
            if any(t.user_attrs.get("reference_pattern") == ref for t in existing):
                continue
            study.enqueue_trial({}, user_attrs={"reference_pattern": ref, "reference": True})
        else:
            ref = dict(ref)
            if any(
                all(t.params.get(k) == v for k, v in ref.items())
                for t in existing
                if t.user_attrs.get("reference")
            ):
                continue
            study.enqueue_trial(ref, user_attrs={"reference": True})
        added += 1
    return added


class Progress:
    """Live display: trials done / running / pruned / failed, and each worker's trial."""

    def __init__(self, total: int, stream=sys.stdout):
        self.total, self.stream = total, stream
        self.counts = {"done": 0, "pruned": 0, "failed": 0}
        self.workers: dict[int, str] = {}
        self.tty = stream.isatty()
        self._last = 0.0

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.status(force=True)

    def status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < (1.0 if self.tty else 30.0):
            return
        self._last = now
        finished = sum(self.counts.values())
        line = (
            f"trials {finished}/{self.total} finished (complete {self.counts['done']}, "
            f"pruned {self.counts['pruned']}, failed {self.counts['failed']}), "
            f"running {len(self.workers)}"
        )
        if self.workers:
            line += " | " + " | ".join(f"w{k}: {v}" for k, v in sorted(self.workers.items()))
        if self.tty:
            self.stream.write(
                "\r\033[K" + line[: os.get_terminal_size(self.stream.fileno()).columns - 1]
            )
        elif force:
            self.stream.write(line + "\n")
        self.stream.flush()


def _flat_attrs(result: dict) -> dict:
    out = {}
    for key in (
        "val_accuracy",
        "test_accuracy",
        "tokens_per_s",
        "params",
        "state_size",
        "slot",
        "pid",
        "host",
        "device",
        "backend",
        "wall_seconds",
        "shared_block_params",
        "table_is_shared",
    ):
        if key in result:
            out[key] = result[key]
    for key, value in (result.get("hogwild") or {}).items():
        out[f"hogwild.{key}"] = value
    for t in result.get("tasks") or []:
        for key in ("val_accuracy", "test_accuracy", "steps", "tokens_per_s", "stopped"):
            out[f"{t['task']}.{key}"] = t[key]
    return out


def run_study(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run the sweep in ``cfg``: coordinator + Hogwild pool; returns the run summary."""
    sweep = validate_sweep(cfg)  # every config error before any worker starts
    # The workers import torch and the trial code while the coordinator builds the task data,
    # opens the study and creates the shared tables.
    pool = WorkerPool(sweep.workers, sweep.threads)
    try:
        return _run_study(cfg, sweep, pool, out_dir)
    finally:
        pool.kill_all()  # already stopped unless something went wrong


def _run_study(cfg: DictConfig, sweep: SweepPlan, pool: WorkerPool, out_dir) -> dict:
    from mad_search import report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Task data is built (or loaded from the disk cache) once here and shared with the workers;
    # before the study is opened, so settings the generator cannot satisfy leave no study behind.
    task_data: dict[tuple, dict] = {}
    for plan in sweep.probe_plans:
        _task_data(task_data, plan)
    storage = sweep.storage or make_storage(sweep.storage_url)
    study = optuna.create_study(
        study_name=sweep.study["name"],
        storage=storage,
        direction="maximize",
        sampler=_make_sampler(sweep.study.get("sampler")),
        pruner=_make_pruner(sweep.study.get("pruner")),
        load_if_exists=True,
    )
    before = len(study.get_trials(deepcopy=False))
    enqueued = _enqueue_references(study, sweep.space)
    study.set_user_attr("search_space", json.loads(json.dumps(sweep.space, default=str)))
    study.set_user_attr("sampler", dict(sweep.study.get("sampler") or {}))
    study.set_user_attr("pruner", dict(sweep.study.get("pruner") or {}))
    study.set_user_attr("tasks", [t["name"] for t in sweep.task_cfgs])
    hog = sweep.hogwild
    print(
        f"study {sweep.study['name']!r} at {mask_url(sweep.storage_url)}: {before} trials so far, "
        f"{enqueued} reference trials enqueued; {sweep.workers} workers x {sweep.threads} threads, "
        f"{hog.get('embedding', 'shared')} embedding"
    )

    tables: dict[str, SharedTable] = {}
    for plan in sweep.probe_plans:
        key = table_key(plan.task_name, plan.task_settings, plan.d_model)
        if key not in tables:
            tables[key] = _new_table(plan, sweep)
    n_trials = int(sweep.study["n_trials"])
    timeout = sweep.study.get("timeout")
    progress = Progress(n_trials)
    t_start = time.time()
    running: dict[int, tuple[optuna.Trial, Any]] = {}
    started = 0
    interrupted = False
    # Ctrl-C only raises a flag that the loop checks between storage calls: a KeyboardInterrupt
    # raised inside an SQLAlchemy query leaves that connection's read lock behind, and the
    # "mark running trials failed" writes below then fail with "database is locked". A second
    # Ctrl-C gets Python's default behaviour back.
    stop = _InterruptFlag()
    finished: list[tuple] = []  # trials whose worker is free again, results not yet recorded
    try:
        while not stop.raised:
            timed_out = timeout is not None and time.time() - t_start > timeout
            for slot in pool.free_slots():
                if started >= n_trials or timed_out or stop.raised:
                    break
                trial = study.ask()
                started += 1
                try:
                    overrides = space_mod.suggest(trial, sweep.space)
                    plans = plans_for(sweep.cfg, sweep.task_cfgs, overrides)
                except USER_ERRORS as exc:
                    trial.set_user_attr("fail_reason", f"invalid suggestion: {exc}")
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    progress.counts["failed"] += 1
                    progress.event(f"trial {trial.number} failed: invalid suggestion: {exc}")
                    continue
                plan = plans[0]
                keys = [table_key(p.task_name, p.task_settings, p.d_model) for p in plans]
                for p, key in zip(plans, keys):  # a width first seen now (budgets): new table
                    if key not in tables:
                        tables[key] = _new_table(p, sweep)
                job = TrialJob(
                    number=trial.number,
                    plans=plans,
                    table_keys=keys,
                    tables={k: tables[k] for k in keys},
                    data=[_task_data(task_data, p) for p in plans],
                    block_modules=list(cfg.model.get("block_modules") or []),
                    embedding=hog.get("embedding", "shared"),
                    lr=float(hog.get("lr", 0.05)),
                    rule=hog.get("rule", "adagrad"),
                    max_nonfinite=int(hog.get("max_nonfinite", 3)),
                    device=str(hog.get("device", "cpu")),
                    table_seed=int(hog.get("seed", 0)),
                )
                pool.submit(slot, job)  # first, so the worker starts while we write
                slot.started = time.time()
                running[trial.number] = (trial, slot)
                trial.set_user_attr("pattern", plan.pattern)
                trial.set_user_attr("layers", plan.layers)
                trial.set_user_attr("d_model", plan.d_model)
                trial.set_user_attr("worker", slot.index)
                trial.set_user_attr("embedding", hog.get("embedding", "shared"))
                if plan.budget:
                    trial.set_user_attr("budget", plan.budget)
                progress.workers[slot.index] = f"#{trial.number} {plan.pattern}"
                progress.event(
                    f"trial {trial.number} -> worker {slot.index}: {plan.pattern} "
                    f"(d_model {plan.d_model})"
                )
            # Results are written after the freed workers have their next trial: a worker never
            # waits for the storage (about 30 writes per trial).
            while finished:
                _record(study, progress, *finished.pop(0))
            if not running and (started >= n_trials or timed_out):
                break
            for slot, msg in pool.wait(0.5):
                done = _handle(study, pool, slot, msg, running, progress)
                if done is not None:
                    finished.append(done)
            progress.status()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the flag was installed
        interrupted = True
    finally:
        stop.restore()
    try:
        while finished:  # stopped by Ctrl-C before these were written
            _record(study, progress, *finished.pop(0))
    except Exception as exc:  # storage left unusable by a hard (second) Ctrl-C
        print(f"could not record finished trials: {exc}", file=sys.stderr)
    interrupted = interrupted or stop.raised
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        pool.kill_all()
        for trial, _slot in list(running.values()):
            try:
                trial.set_user_attr(
                    "fail_reason", "interrupted (Ctrl-C); rerun the command to resume"
                )
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception as exc:  # storage left unusable by a hard (second) Ctrl-C
                print(f"could not mark trial {trial.number} failed: {exc}", file=sys.stderr)
        print(
            f"\ninterrupted: {len(running)} running trial(s) marked failed; the study is saved, "
            "rerun the same command to resume",
            file=sys.stderr,
        )
    else:
        pool.close()
    summary = report.finish(
        study, out_dir, tables, sweep, time.time() - t_start, pool.restarts, interrupted=interrupted
    )
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _task_data(cache: dict[tuple, dict], plan: RunPlan) -> dict:
    """The plan's task data as tensors in shared memory, built (or loaded from the disk cache)
    the first time a task configuration is seen; workers read this one copy."""
    key = (plan.task_name, json.dumps(plan.task_settings, sort_keys=True, default=str), plan.seed)
    if key not in cache:
        built = tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings)
        cache[key] = share_task_data(tasks.as_tensors(built))
    return cache[key]


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


def _new_table(plan: RunPlan, sweep: SweepPlan) -> SharedTable:
    hog = sweep.hogwild
    return SharedTable(
        plan.task_info.vocab_size,
        plan.d_model,
        sweep.workers,
        seed=int(hog.get("seed", 0)),
        rule=hog.get("rule", "adagrad"),
        share=hog.get("embedding", "shared") == "shared",
    )


def _handle(study, pool, slot, msg, running, progress) -> tuple | None:
    """Act on one worker message. A trial's end frees its worker at once and returns
    ``(trial, kind, msg)`` for :func:`_record`, which the caller runs once the free workers have
    been given new trials."""
    from optuna.trial import TrialState

    if msg is None:  # the worker died
        job = slot.job
        code = slot.process.exitcode
        why = f"exit code {code}"
        if code is not None and code < 0:
            why = f"killed by {signal.Signals(-code).name}"
        if job is not None and job.number in running:
            trial, _ = running.pop(job.number)
            trial.set_user_attr("fail_reason", f"worker {slot.index} (pid {slot.pid}) died: {why}")
            study.tell(trial, state=TrialState.FAIL)
            progress.counts["failed"] += 1
        progress.workers.pop(slot.index, None)
        progress.event(f"worker {slot.index} (pid {slot.pid}) died ({why}); starting a new one")
        pool.restart(slot)
        return None
    kind = msg[0]
    if kind == "ready":
        slot.ready = True
        return None
    number = msg[1]
    if number not in running:
        return None
    trial, _ = running[number]
    if kind == "report":
        _, _, step, value = msg
        trial.report(value, step)
        prune = trial.should_prune()
        slot.conn.send("prune" if prune else "continue")
        pattern = trial.user_attrs.get("pattern", "")
        progress.workers[slot.index] = f"#{number} {pattern} step {step} val {value:.3f}"
        return None
    running.pop(number)
    slot.job = None
    progress.workers.pop(slot.index, None)
    return trial, kind, msg


def _record(study, progress, trial, kind, msg) -> None:
    """Write a finished trial's result: user attributes, then ``tell``."""
    from optuna.trial import TrialState

    number = trial.number
    result = msg[-1] if isinstance(msg[-1], dict) else {}
    for key, value in _flat_attrs(result).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        trial.set_user_attr(key, value)
    if kind == "done":
        study.tell(trial, result["val_accuracy"])
        progress.counts["done"] += 1
        progress.event(
            f"trial {number} complete: val {result['val_accuracy']:.4f} test "
            f"{result['test_accuracy']:.4f} ({result['tokens_per_s']:,.0f} tok/s, "
            f"{trial.user_attrs.get('pattern')})"
        )
    elif kind == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
        progress.counts["pruned"] += 1
        progress.event(f"trial {number} pruned ({trial.user_attrs.get('pattern')})")
    else:
        reason = msg[2]
        trial.set_user_attr("fail_reason", reason)
        if result.get("traceback"):
            trial.set_user_attr("traceback", result["traceback"][-1500:])
        study.tell(trial, state=TrialState.FAIL)
        progress.counts["failed"] += 1
        progress.event(f"trial {number} failed: {reason}")
