"""A sweep's configuration, checked once: the study and Hogwild settings (typed), the search
space, the tasks, and the run plan of each trial.

:func:`validate_sweep` checks everything before any worker starts and returns a
:class:`SweepPlan`; :func:`plans_for` turns one trial's suggested overrides into one validated
:class:`~mad_search.plan.RunPlan` per task. Every problem is a one-line
:class:`~mad_search.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

import blocks
from mad_search import space as space_mod
from mad_search import tasks
from mad_search.config import check_pool_backends, resolve, to_plain
from mad_search.errors import ConfigError
from mad_search.jobs import JobSource, TrialOutcome
from mad_search.plan import RunPlan
from mad_search.settings import HogwildSettings, StudySettings, packaged_config
from mad_search.storage import StudyStorage
from mad_search.train import selects_by_loss

# Settings a single run honours that a sweep does not (the pool decides them), with the value
# that means "not set" and what to use instead. Setting one in a sweep is refused, not ignored.
SWEEP_IGNORES: dict[str, tuple[Any, str]] = {
    "device": ("cpu", "the pool's workers use hogwild.device"),
    "threads": (None, "each worker uses hogwild.threads_per_worker"),
    "train.embedding_optimizer": (
        "adamw",
        "the shared table is trained by hogwild.rule and hogwild.lr",
    ),
    "train.embedding_lr": (None, "the shared table is trained by hogwild.rule and hogwild.lr"),
    "model.sparse_embedding": (False, "every trial's embedding is the Hogwild table"),
}


def _refuse_ignored(cfg: Any, params: dict) -> None:
    for key, (unset, instead) in SWEEP_IGNORES.items():
        value = OmegaConf.select(cfg, key, default=unset) if OmegaConf.is_config(cfg) else unset
        if key in params or value != unset:
            shown = f"search.params.{key}" if key in params else f"{key}={value!r}"
            raise ConfigError(f"{shown} is not used in a sweep ({instead}); remove it")


@dataclass(kw_only=True)
class SweepPlan(JobSource):
    """A sweep checked from end to end: what the coordinator needs to run it."""

    cfg: DictConfig
    space: dict
    task_cfgs: list[dict]
    # What a trial is scored on: validation accuracy (mean over its tasks), reported as it
    # trains, so the pruner can stop it.
    objectives: tuple[str, ...] = ("val_accuracy",)

    def prepare(self, study: optuna.Study) -> tuple[int, str]:
        """Enqueue the reference trials and record the search on the study; returns the number
        of trials to run and a phrase for the start line."""
        enqueued = _enqueue_references(study, self.space)
        study.set_user_attr("search_space", json.loads(json.dumps(self.space, default=str)))
        study.set_user_attr("sampler", self.study.sampler)
        study.set_user_attr("pruner", self.study.pruner)
        study.set_user_attr("tasks", [t["name"] for t in self.task_cfgs])
        return self.study.n_trials, f"{enqueued} reference trials enqueued"

    def plans(self, trial: optuna.Trial) -> list[RunPlan]:
        """The trial's run plans (one per task) from the sampler's suggestions; a
        ``UserError`` for a suggestion that cannot be built."""
        return plans_for(self.cfg, self.task_cfgs, space_mod.suggest(trial, self.space))

    def outcome(self, trial: optuna.Trial, result: dict) -> TrialOutcome:
        """Validation accuracy, or validation loss where the tasks are judged by loss (the mean
        over the trial's tasks either way)."""
        return TrialOutcome(values=[result[self.objectives[0]]])


def sweep_objective(plans: list[RunPlan]) -> tuple[str, str]:
    """(objective, direction) of a sweep whose trials train ``plans``: validation accuracy
    (maximise), or validation loss (minimise) where every task is judged by loss (language
    modelling, or ``train.select=loss``); tasks judged differently cannot share one study."""
    by_loss = {selects_by_loss(p.train, p.task_info) for p in plans}
    if len(by_loss) > 1:
        names = sorted({p.task_name for p in plans if selects_by_loss(p.train, p.task_info)})
        raise ConfigError(
            f"study.tasks mixes tasks judged by loss ({', '.join(names)}) with tasks judged by "
            "accuracy; one study has one objective: run them as separate studies, or set "
            "train.select for all"
        )
    return ("val_loss", "minimize") if by_loss == {True} else ("val_accuracy", "maximize")


def _params(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's parameters; for one still waiting, the values it was enqueued with."""
    return trial.params or trial.system_attrs.get("fixed_params") or {}


def _enqueue_references(study: optuna.Study, space: dict) -> int:
    existing = study.get_trials(deepcopy=False)
    added = 0
    params = space.get("params") or {}
    for ref in space.get("reference") or []:
        if isinstance(ref, str) or "spec" in ref:
            spec, fixed, settings = space_mod.reference_spec(ref, params)
            if any(
                t.user_attrs.get("reference_pattern") == spec
                and all(_params(t).get(k) == v for k, v in fixed.items())
                and (t.user_attrs.get("reference_overrides") or {}) == settings
                for t in existing
            ):
                continue
            attrs = {"reference_pattern": spec, "reference": True}
            if settings:
                attrs["reference_overrides"] = settings
            study.enqueue_trial(fixed, user_attrs=attrs)
        else:
            ref = dict(ref)
            if any(
                all(_params(t).get(k) == v for k, v in ref.items())
                for t in existing
                if t.user_attrs.get("reference")
            ):
                continue
            study.enqueue_trial(ref, user_attrs={"reference": True})
        added += 1
    return added


def task_cfgs(cfg: Any, study: StudySettings) -> list[dict]:
    """The tasks each trial trains on: ``study.tasks`` (names or mappings) or the ``task``
    group. A listed task starts from its ``conf/task`` YAML (a plug-in task without one: its
    registered defaults)."""
    if not study.tasks:
        return [dict(to_plain(cfg.get("task")))]
    out = []
    for item in study.tasks:
        item = dict(to_plain(item)) if not isinstance(item, str) else {"name": item}
        name = item.get("name")
        if name not in tasks.names():
            raise ConfigError(
                f"study.tasks names unknown task {name!r}; valid: {', '.join(tasks.names())}"
            )
        yaml_file = resources.files("conf").joinpath("task", f"{name}.yaml")
        base = (
            packaged_config(f"task/{name}.yaml")
            if yaml_file.is_file()
            else {
                "name": name,
                **tasks.defaults(name),
            }
        )
        base.update(item)
        out.append(base)
    return out


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


def trial_config(cfg: DictConfig, overrides: dict[str, Any]) -> Any:
    """The sweep's config with one trial's overrides set: plain containers (a deep copy of an
    OmegaConf tree costs about ten times more), or a config where it has interpolations, so they
    see the overridden values."""
    # to_container builds a fresh tree, ours to change; a plain dict is the caller's: copy it.
    is_config = OmegaConf.is_config(cfg)
    base = OmegaConf.to_container(cfg, resolve=False) if is_config else copy.deepcopy(cfg)
    # The study section's interpolation (study.storage from MAD_SEARCH_STORAGE) plays no part
    # in a run plan: it alone does not send every trial down the slow path.
    if _has_interpolation({k: v for k, v in base.items() if k != "study"}):
        return _apply(cfg, overrides)
    for key, value in overrides.items():
        _set_dotted(base, key, copy.deepcopy(to_plain(value)))
    return base


def plans_for(cfg: DictConfig, task_cfgs: list[dict], overrides: dict[str, Any]) -> list[RunPlan]:
    """One validated run plan per task for a trial's overrides (the coordinator calls this for
    every probe at start-up and for every trial)."""
    trial_cfg = trial_config(cfg, overrides)
    out = []
    for task_cfg in task_cfgs:
        if isinstance(trial_cfg, dict):
            c: Any = {**trial_cfg, "task": copy.deepcopy(task_cfg)}
        else:
            c = copy.deepcopy(trial_cfg)
            c.task = OmegaConf.create(task_cfg)
        plan = resolve(c)
        out.append(dataclasses.replace(plan, train=dataclasses.replace(plan.train, progress=False)))
    return out


def validate_sweep(cfg: DictConfig, plans=None) -> SweepPlan:
    """Check the whole sweep before any worker starts; raises a one-line ``UserError``.
    ``plans(cfg, task_cfgs, overrides)`` makes a trial's probe plans (default
    :func:`plans_for`)."""
    plans = plans or plans_for
    study = StudySettings.from_config(cfg.get("study"))
    hogwild = HogwildSettings.from_config(cfg.get("hogwild"))
    block_modules = list(to_plain(cfg.model.get("block_modules")) or [])
    for module in block_modules:
        blocks.load_module(module)
    search = to_plain(cfg.get("search"))
    patterns = space_mod.validate(search, blocks.names())
    params = (search or {}).get("params") or {}
    _refuse_ignored(cfg, params)
    d_dist = params.get("model.d_model")
    if d_dist is not None and d_dist["type"] != "categorical":
        raise ConfigError(
            "search.params.model.d_model must be categorical (one shared embedding "
            "table per task and width)"
        )
    tasks_ = task_cfgs(cfg, study)
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
            probe_plans += plans(cfg, tasks_, overrides)
    for ref in (search or {}).get("reference") or []:  # references that set other settings
        if isinstance(ref, dict) and "spec" in ref:
            spec, _, settings = space_mod.reference_spec(ref, params)
            if settings:
                layers = space_mod.parse(spec, blocks.names())
                probe_plans += plans(cfg, tasks_, {"model.pattern": layers, **settings})
    check_pool_backends(hogwild, probe_plans)
    objective, direction = sweep_objective(probe_plans)
    return SweepPlan(
        objectives=(objective,),
        directions=(direction,),
        cfg=cfg,
        space=search,
        task_cfgs=tasks_,
        study=study,
        hogwild=hogwild,
        storage=StudyStorage(study.storage, study.storage_options()),
        block_modules=block_modules,
        probe_plans=probe_plans,
    )
