"""Running the MAD protocol for one layer sequence: ``python -m mad_search +protocol=mad``.

Every run of the level (setting x learning rate x weight decay) is a trial of an Optuna study
(named for the level and the layer sequence) and a job for the Hogwild pool: all workers busy,
no barrier between settings. A run is enqueued with its id as a user attribute; rerunning the
command finds the runs already complete and enqueues only the others, so an interrupted protocol
resumes where it stopped and nothing finished is run twice. Each run trains its own embedding
table (runs at different learning rates must not train one table together). When the runs are
done the scores (:func:`mad_search.protocol.aggregate`) are printed as a table and written to
``mad_score.json`` in the run directory, and recorded on the study.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, open_dict
from optuna.trial import TrialState

import blocks
from mad_search import space as space_mod
from mad_search import tasks
from mad_search.config import check_pool_backends, resolve, to_plain
from mad_search.errors import ConfigError, RunDirError
from mad_search.jobs import JobSource, TrialOutcome
from mad_search.plan import RunPlan
from mad_search.protocol import RUN_BUDGET_KEYS, Level, aggregate, run_id, select_settings
from mad_search.settings import HogwildSettings, StudySettings
from mad_search.storage import StudyStorage
from mad_search.sweep import SweepPlan, trial_config, validate_sweep

PROTOCOL_KEYS = {"level", "levels", "study_name", "objectives"}
# mad-lab's optimiser: torch AdamW with its default betas (the paper's appendix says 0.98).
ADAMW_BETAS = (0.9, 0.999)


@dataclass
class ProtocolRun:
    id: str
    task: str
    setting: str
    lr: float
    weight_decay: float
    plan: RunPlan
    seed: int = 0  # the run's model seed after the level's first (``seeds``)


@dataclass(kw_only=True)
class ProtocolPlan(JobSource):
    """A protocol checked from end to end: its level, its runs, where they are recorded. A
    trial is one run, scored by its validation accuracy (learning curves for the dashboard; the
    study has no pruner)."""

    level: Level
    pattern: str
    d_model: int
    model_seed: int
    runs: list[ProtocolRun]

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.runs}
        record = level_budget(self.level)
        self.budgets = {r.id: task_budget(record, r.task) for r in self.runs}

    def prepare(self, study: optuna.Study) -> tuple[int, str]:
        """Enqueue every run not yet complete at its current budget (nor already waiting);
        returns how many trials this invocation runs. A run finished at other level settings
        (a changed ``max_steps``, a new ``per_task`` budget, ...) is kept in the study but
        neither counted nor scored: it is run again, and only it."""
        legacy = legacy_level(study)
        done, waiting = set(), set()
        stale: dict[str, tuple[str, Any, Any]] = {}  # task -> (first differing key, old, new)
        for t in study.get_trials(deepcopy=False):
            rid = t.user_attrs.get("run")
            if t.state == TrialState.COMPLETE:
                run = self.by_id.get(rid)
                if run is None:
                    continue
                new = self.budgets[rid]
                old = trial_budget(t, legacy, new)
                if old == new:
                    done.add(rid)
                else:
                    key = next(k for k in RUN_BUDGET_KEYS if old.get(k) != new.get(k))
                    stale.setdefault(run.task, (key, old.get(key), new.get(key)))
            elif t.state == TrialState.WAITING:
                if rid in self.by_id:
                    waiting.add(rid)  # trained at the current budget when it starts (plans)
                else:  # a run the level no longer has (fewer seeds, other rates): not to start
                    storage = study._storage
                    storage.set_trial_user_attr(
                        t._trial_id, "superseded", f"not a run of level {self.level.name!r}"
                    )
                    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        # longest first (tokens to train: steps x batch x sequence length), so the pool's
        # last runs are short ones and no worker idles long while another finishes a slow run
        # (greedy longest-processing-time scheduling); a run's seed does not depend on order
        for run in sorted(self.runs, key=lambda r: -run_cost(r.plan)):
            if run.id not in done and run.id not in waiting:
                study.enqueue_trial(
                    {},
                    user_attrs={
                        "run": run.id,
                        "setting": run.setting,
                        "task": run.task,
                        "lr": run.lr,
                        "weight_decay": run.weight_decay,
                        "seed": run.seed,
                        "budget": self.budgets[run.id],
                    },
                )
        stored = study.user_attrs.get("protocol_level")
        if stored is not None and "protocol_level_legacy" not in study.user_attrs:
            # the level that trials recorded without their own budget were trained at
            study.set_user_attr("protocol_level_legacy", stored)
        study.set_user_attr("protocol_level", dataclasses.asdict(self.level))
        study.set_user_attr("pattern", self.pattern)
        todo = len([r for r in self.runs if r.id not in done])
        total = len(self.runs)
        msg = f"MAD protocol level {self.level.name!r}: {total - todo} of {total} runs done"
        if stale:
            why = "; ".join(
                f"{task}: {k} {a!r} then, {b!r} now" for task, (k, a, b) in stale.items()
            )
            msg += (
                f"; runs finished at other settings of the level are kept in study "
                f"{study.study_name!r} but not scored, and run again ({why})"
            )
        return todo, msg

    def current_trials(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """The study's complete runs of this protocol at their current budget (what is
        scored)."""
        return [
            t for t in trials_at_level(study, self.level) if t.user_attrs.get("run") in self.by_id
        ]

    def plans(self, trial: optuna.Trial) -> list[RunPlan]:
        rid = trial.user_attrs.get("run")
        run = self.by_id.get(rid)
        if run is None:
            raise ConfigError(f"trial {trial.number} carries no run of this protocol ({rid!r})")
        # a run enqueued at other settings is trained at the current ones: say so on the trial
        if trial.user_attrs.get("budget") != self.budgets[rid]:
            trial.set_user_attr("budget", self.budgets[rid])
        return [run.plan]

    def job_fields(self, trial: optuna.Trial) -> dict:
        return {"model_seed": self.model_seed, "diverged_is_zero": True}

    def label(self, trial: optuna.Trial, plans: list[RunPlan]) -> str:
        return trial.user_attrs.get("run", "")


def level_budget(level: Level | dict) -> dict:
    """What a level's runs are trained with, as JSON would store it: the level without its
    name and descriptions (renaming or redescribing a level changes no run). A stored record
    lacking a field the level gained later (``per_task``, ...) had that field's default."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("name", "description")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    if isinstance(level, Level):
        record = dataclasses.asdict(level)
    else:
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(Level)
            if f.default is not dataclasses.MISSING
        }
        record = {**defaults, **level}
    return strip(json.loads(json.dumps(record)))


def task_view(record: dict, task: str) -> dict:
    """A level record (:func:`level_budget`) as ``task``'s runs see it: its ``per_task`` entry
    for the task, else the level itself."""
    return dict(record.get("per_task") or ()).get(task, record)


def task_budget(record: dict, task: str) -> dict:
    """The budget ``task``'s runs are trained with at the level ``record``
    (:func:`level_budget`): renaming, redescribing or changing another task's budget leaves it
    unchanged."""
    view = task_view(record, task)
    return {k: view.get(k, record.get(k)) for k in RUN_BUDGET_KEYS}


def legacy_level(study: optuna.Study) -> dict | None:
    """The level record (:func:`level_budget`) that the study's trials without a ``budget``
    attribute were trained at (studies made before runs recorded their own): the first level
    stored on the study."""
    attrs = study.user_attrs
    stored = attrs.get("protocol_level_legacy") or attrs.get("protocol_level")
    return None if stored is None else level_budget(stored)


def trial_budget(trial: optuna.trial.FrozenTrial, legacy: dict | None, current: dict) -> dict:
    """The budget a finished run was trained at: its own record, else its study's first
    level's (``legacy``, a :func:`level_budget` record) for its task, else (nothing recorded)
    ``current``."""
    own = trial.user_attrs.get("budget")
    if own is not None:
        return own
    if legacy is None:
        return current
    return task_budget(legacy, trial.user_attrs.get("task", ""))


def trials_at_level(
    study: optuna.Study, level: Level | dict | None = None
) -> list[optuna.trial.FrozenTrial]:
    """The study's complete runs trained at ``level``'s budget for their task, at the seeds and
    on the learning-rate and weight-decay grid it runs for that task (by default the level the
    study was last run at): the runs a score at that level counts. (A run at a rate the level
    no longer has keeps its budget, so the grid is checked apart from it.)"""
    record = level_budget(study.user_attrs["protocol_level"] if level is None else level)
    legacy = legacy_level(study)
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        task = t.user_attrs.get("task", "")
        current = task_budget(record, task)
        view = task_view(record, task)
        seeds = view.get("seeds", 1)
        if (
            trial_budget(t, legacy, current) == current
            and t.user_attrs.get("seed", 0) < seeds
            and _in_grid(t.user_attrs.get("lr"), view.get("lrs", record.get("lrs")))
            and _in_grid(t.user_attrs.get("weight_decay"),
                         view.get("weight_decays", record.get("weight_decays")))
        ):
            out.append(t)
    return out


def _in_grid(value: float | None, grid: list | None) -> bool:
    """Whether a run's ``value`` (its learning rate or weight decay) is one of ``grid``'s
    (a record without the grid, or a run without the value, counts as in it)."""
    if value is None or grid is None:
        return True
    return any(math.isclose(value, g, rel_tol=1e-9, abs_tol=1e-12) for g in grid)


def run_cost(plan: RunPlan) -> int:
    """A run's training work in tokens at most (steps x batch x sequence length): the
    protocol's estimate of how long the run takes, for ordering runs, not for reporting."""
    return plan.train.max_steps * plan.train.batch_size * plan.task_info.seq_len


def protocol_level(cfg: Any) -> tuple[Level, dict]:
    """The level ``cfg``'s ``protocol`` section chooses, checked, and the section itself."""
    node = to_plain(cfg.get("protocol")) or {}
    unknown = sorted(set(node) - PROTOCOL_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown protocol setting {unknown[0]!r}; valid: {', '.join(sorted(PROTOCOL_KEYS))}"
        )
    levels = node.get("levels") or {}
    name = node.get("level")
    if name not in levels:
        raise ConfigError(
            f"protocol.level {name!r} unknown; valid levels: {', '.join(sorted(levels))}"
        )
    return Level.from_config(name, levels[name]), node


def expand_runs(
    level: Level, model_cfg: dict, train_cfg: dict
) -> tuple[list[ProtocolRun], list[RunPlan]]:
    """The level's runs for one layer sequence (``model_cfg``), each with its validated plan,
    and one plan per setting (the task data and tables the runs need). ``train_cfg`` gives what
    the level does not set (gradient clipping)."""
    model_cfg = dict(model_cfg)
    if level.d_model is not None:
        model_cfg["d_model"] = level.d_model
    runs, probes = [], []
    for entry in select_settings(level, tasks.grid()):
        settings = entry["settings"]
        budget = level.for_task(entry["task"])  # the level, or its per_task settings for it
        base = resolve(
            {
                "task": {"name": entry["task"], **settings},
                "model": model_cfg,
                "train": {
                    **train_cfg,
                    "batch_size": budget.batch_size,
                    "max_steps": budget.steps(settings["num_train_examples"]),
                    "schedule": "cosine",
                    "warmup_steps": budget.warmup_steps,
                    "min_lr": budget.min_lr,
                    "betas": list(ADAMW_BETAS),
                    "eval_every": budget.eval_every
                    or -(-settings["num_train_examples"] // budget.batch_size),
                    "target_accuracy": level.target_accuracy,
                    "accuracy": level.accuracy,
                    "progress": False,
                },
                "seed": entry["seed"],  # the grid's data seed (mad-lab's 12345)
            }
        )
        probes.append(base)
        for lr in budget.lrs:
            for wd in budget.weight_decays:
                train = dataclasses.replace(base.train, lr=lr, weight_decay=wd)
                try:
                    train.validate()
                except ValueError as exc:
                    raise ConfigError(f"protocol level {level.name}: {exc}") from None
                for seed in range(budget.seeds):
                    runs.append(
                        ProtocolRun(
                            id=run_id(entry["id"], lr, wd, seed),
                            task=entry["task"],
                            setting=entry["id"],
                            lr=lr,
                            weight_decay=wd,
                            plan=dataclasses.replace(base, train=train, model_seed_offset=seed),
                            seed=seed,
                        )
                    )
    return runs, probes


def validate_protocol(cfg: DictConfig) -> ProtocolPlan:
    """Check the protocol in ``cfg`` (level, its settings, the layer sequence on every setting)
    before any worker starts; a one-line ``UserError`` otherwise."""
    level, node = protocol_level(cfg)
    model_cfg = dict(to_plain(cfg.get("model")) or {})
    block_modules = list(model_cfg.get("block_modules") or [])
    for module in block_modules:
        blocks.load_module(module)
    runs, probes = expand_runs(level, model_cfg, dict(to_plain(cfg.get("train")) or {}))
    study = StudySettings.from_config(to_plain(cfg.get("study")) or {})
    pattern = probes[0].pattern
    study_name = node.get("study_name") or f"mad:{level.name}:{pattern}"
    study = dataclasses.replace(
        study,
        name=study_name,
        n_trials=len(runs),
        timeout=None,
        sampler={"name": "random", "seed": 0},  # never asked: every trial is enqueued
        pruner={"name": "none"},  # every run trains to its budget or to the target accuracy
    )
    hogwild = dataclasses.replace(
        HogwildSettings.from_config(cfg.get("hogwild")), embedding="private"
    )
    check_pool_backends(hogwild, probes)
    return ProtocolPlan(
        level=level,
        pattern=pattern,
        d_model=probes[0].d_model,
        model_seed=cfg.get("seed", 0),
        runs=runs,
        study=study,
        hogwild=hogwild,
        storage=StudyStorage(study.storage, study.storage_options()),
        block_modules=block_modules,
        probe_plans=probes,
    )


def run_protocol(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run (or resume) the protocol in ``cfg``; returns what ``mad_score.json`` holds."""
    from mad_search.study import run_jobs

    protocol = validate_protocol(cfg)  # every config error before any worker starts
    out_dir = Path(out_dir)
    outcome = run_jobs(protocol, out_dir)
    scores = score(protocol, outcome.study)
    print("\n" + table(scores))
    try:
        (out_dir / "mad_score.json").write_text(json.dumps(scores, indent=2, default=str))
    except OSError as exc:  # disk full: the runs are in the study, a rerun only rescores
        raise RunDirError(
            f"cannot write {out_dir / 'mad_score.json'}: {exc.strerror or exc}; every run is "
            f"recorded in study {protocol.study.name!r}: rerun the same command (with a "
            "writable hydra.run.dir) to write it, no run is repeated"
        ) from None
    print(f"\nscores: {out_dir / 'mad_score.json'}")
    if outcome.interrupted:
        raise KeyboardInterrupt
    return scores


def run_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One complete protocol run's record (as ``mad_score.json`` lists it) from its trial: the
    task, setting and hyper-parameters from its user attrs, its validation accuracy (the
    trial's value), test accuracy, both splits' micro accuracies, steps, stop reason, seconds
    and threads."""
    a = trial.user_attrs
    return {
        "run": a.get("run"),
        "task": a["task"],
        "setting": a["setting"],
        "lr": a["lr"],
        "weight_decay": a["weight_decay"],
        "seed": a.get("seed", 0),
        "val_accuracy": trial.value,
        "test_accuracy": a.get("test_accuracy"),
        # micro accuracies (runs recorded before they were kept have none)
        "val_accuracy_micro": a.get(f"{a['task']}.val_accuracy_micro"),
        "test_accuracy_micro": a.get(f"{a['task']}.test_accuracy_micro"),
        "steps": a.get(f"{a['task']}.steps"),
        "stop_reason": a.get(f"{a['task']}.stopped"),
        "seconds": a.get("wall_seconds"),
        "threads": a.get("threads"),  # the most it trained with, lent threads included
        "trial": trial.number,
    }


def score(protocol: ProtocolPlan, study: optuna.Study) -> dict:
    """The protocol's scores from its study's complete runs (partial while runs are missing);
    also recorded on the study."""
    runs = [run_record(t) for t in protocol.current_trials(study)]
    order = {r.id: i for i, r in enumerate(protocol.runs)}
    runs.sort(key=lambda r: order[r["run"]])
    level = protocol.level
    settings_of: dict[str, set] = {}  # the level's tasks that have settings, in its order
    for r in protocol.runs:
        settings_of.setdefault(r.task, set()).add(r.setting)
    out = aggregate(runs, tasks=list(settings_of))
    result = {
        "pattern": protocol.pattern,
        "level": level.name,
        "level_settings": dataclasses.asdict(level),
        "d_model": protocol.d_model,
        "study": study.study_name,
        "storage": protocol.storage.masked,
        "runs_total": len(protocol.runs),
        "runs_complete": len(runs),
        "complete": len(runs) == len(protocol.runs),
        "mad_score": out["mad_score"] if len(runs) == len(protocol.runs) else None,
        "tasks": {
            t: {
                "score": out["tasks"][t],
                "settings_scored": sum(1 for s in out["settings"].values() if s["task"] == t),
                "settings": len(settings_of.get(t, ())),
            }
            for t in settings_of
        },
        "settings": out["settings"],
        "runs": runs,
    }
    if result["complete"]:
        study.set_user_attr("mad_score", result["mad_score"])
        study.set_user_attr("task_scores", {t: v["score"] for t, v in result["tasks"].items()})
    return result


def table(scores: dict) -> str:
    """The printed result: one row per task, then the MAD score."""
    head = (
        f"MAD protocol, level {scores['level']}: {scores['pattern']} (d_model "
        f"{scores['d_model']}), {scores['runs_complete']} of {scores['runs_total']} runs"
    )
    lines = [head, f"{'task':<26} {'settings':>9} {'score':>7}", "-" * 44]
    for task, t in scores["tasks"].items():
        shown = "-" if t["score"] is None else f"{t['score']:.4f}"
        lines.append(f"{task:<26} {t['settings_scored']:>4}/{t['settings']:<4} {shown:>7}")
    lines.append("-" * 44)
    mad = scores["mad_score"]
    lines.append(
        f"{'MAD score':<26} {'':>9} {'-' if mad is None else format(mad, '.4f'):>7}"
        + ("" if scores["complete"] else "  (incomplete: rerun the command to resume)")
    )
    return "\n".join(lines)


def trial_runs(level: Level, cfg: Any, overrides: dict) -> tuple[list[ProtocolRun], list[RunPlan]]:
    """:func:`expand_runs` for the layer sequence of a sweep trial (``cfg`` with its
    overrides)."""
    trial_cfg = trial_config(cfg, overrides)
    model = dict(to_plain(trial_cfg["model"]) or {})
    return expand_runs(level, model, dict(to_plain(trial_cfg["train"]) or {}))


OBJECTIVES = {"mad_score": "maximize", "params": "minimize", "state_size": "minimize"}


@dataclass(kw_only=True)
class ProtocolSweep(SweepPlan):
    """A sweep whose trials are scored by a protocol level: each trial trains the level's runs
    for its layer sequence (one after another, in one worker) and its value is the MAD score
    from the runs' validation accuracies (the test-based score is a user attribute)."""

    level: Level | None = None
    model_seed: int = 0
    runs_of: dict[int, list[ProtocolRun]] = field(default_factory=dict)
    reports_intermediate: bool = False  # a trial's runs are many curves, not one to prune on

    def plans(self, trial: optuna.Trial) -> list[RunPlan]:
        runs = trial_runs(self.level, self.cfg, space_mod.suggest(trial, self.space))[0]
        self.runs_of[trial.number] = runs
        return [r.plan for r in runs]

    def job_fields(self, trial: optuna.Trial) -> dict:
        return {"model_seed": self.model_seed + trial.number, "diverged_is_zero": True}

    def outcome(self, trial: optuna.Trial, result: dict) -> TrialOutcome:
        runs = self.runs_of.pop(trial.number)
        results = [
            {
                "task": r.task,
                "setting": r.setting,
                "lr": r.lr,
                "weight_decay": r.weight_decay,
                "seed": r.seed,
                "val_accuracy": e["val_accuracy"],
                "test_accuracy": e["test_accuracy"],
                "stop_reason": e["stopped"],
            }
            for r, e in zip(runs, result["tasks"])
        ]
        scores = aggregate(results, tasks=list(dict.fromkeys(r.task for r in runs)))
        named = {"mad_score": scores["mad_score_val"], **result}
        attrs = {
            "mad_level": self.level.name,
            "val_accuracy": scores["mad_score_val"],
            "test_accuracy": scores["mad_score"],
            "mad_score_val": scores["mad_score_val"],
            "mad_score_test": scores["mad_score"],
            **{f"mad.{t}.val": v for t, v in scores["tasks_val"].items()},
            **{f"mad.{t}.test": v for t, v in scores["tasks"].items()},
            "diverged_runs": sum(r["stop_reason"].startswith("diverged") for r in results),
        }
        steps = [] if len(self.objectives) > 1 else list(enumerate(scores["tasks_val"].values()))
        return TrialOutcome(
            values=[named[o] for o in self.objectives], attrs=attrs, intermediate=steps
        )


def validate_protocol_sweep(cfg: DictConfig) -> ProtocolSweep:
    """``+sweep=... +protocol=mad``: the sweep checked as any sweep, its trials scored by the
    protocol level (``protocol.objectives``: ``mad_score`` first, then optionally ``params``
    and/or ``state_size`` for a multi-objective study)."""
    level, node = protocol_level(cfg)
    objectives = list(node.get("objectives") or ["mad_score"])
    if (
        objectives[0] != "mad_score"
        or len(set(objectives)) != len(objectives)
        or not set(objectives) <= set(OBJECTIVES)
    ):
        raise ConfigError(
            f"protocol.objectives must be mad_score, then any of params, state_size (each once), "
            f"got {objectives}"
        )
    cfg = copy.deepcopy(cfg)
    params = (cfg.get("search") or {}).get("params") or {}
    with open_dict(cfg):
        for key in [k for k in params if k.startswith("train.")]:
            print(
                f"note: search.params.{key} is not used: the protocol level {level.name!r} sets "
                "the training (its learning-rate grid, budget and batch)"
            )
            del cfg.search.params[key]
    if level.d_model is not None and "model.d_model" in params:
        raise ConfigError(
            f"search.params.model.d_model conflicts with protocol level {level.name!r}, which "
            f"sets the width ({level.d_model}); remove one"
        )
    sweep = validate_sweep(cfg, plans=lambda c, _tasks, over: trial_runs(level, c, over)[1])
    fields = {f.name: getattr(sweep, f.name) for f in dataclasses.fields(SweepPlan)}
    fields["study"] = dataclasses.replace(sweep.study, pruner={"name": "none"})
    fields["hogwild"] = dataclasses.replace(sweep.hogwild, embedding="private")
    fields["objectives"] = tuple(objectives)
    fields["directions"] = tuple(OBJECTIVES[o] for o in objectives)
    fields["reports_intermediate"] = False
    return ProtocolSweep(**fields, level=level, model_seed=cfg.get("seed", 0))


def run_protocol_sweep(cfg: DictConfig, out_dir: str | os.PathLike) -> dict:
    """Run a sweep scored by a protocol level (see :func:`validate_protocol_sweep`)."""
    from mad_search.study import run_study

    return run_study(cfg, out_dir, sweep=validate_protocol_sweep(cfg))
