"""The MAD protocol (Poli et al. 2024; mad-lab's ``benchmark.py``) for one layer sequence.

A protocol *level* names the tasks, the difficulty settings of each (mad-lab's grid, or a part of
it), a learning-rate x weight-decay grid, the model width and the training budget. Every
(setting, learning rate, weight decay) is one *run*; per setting the run with the best
validation accuracy is selected and its test accuracy is the setting's score (mad-lab selects on
the test set itself; we keep test data out of every choice); a task's score is the mean over its
settings and the MAD score the mean over tasks. A run whose training diverges (non-finite loss)
counts as accuracy 0, with its reason recorded; it never stops the protocol.

Levels live in ``conf/protocol/mad.yaml`` (``protocol.levels``); :class:`Level` checks one, and
:func:`expand` turns a level and a model configuration into the runs' plans. :func:`aggregate`
is the scoring, kept free of any training so it can be checked on fabricated results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mad_search.errors import ConfigError

MAD_TASKS = (
    "in_context_recall",
    "fuzzy_in_context_recall",
    "noisy_in_context_recall",
    "selective_copying",
    "compression",
    "memorization",
)
LEVEL_KEYS = {
    "description",
    "tasks",
    "settings",
    "max_seq_len",
    "lrs",
    "weight_decays",
    "d_model",
    "batch_size",
    "epochs",
    "max_steps",
    "max_train_examples",
    "num_test_examples",
    "eval_every",
    "target_accuracy",
    "min_lr",
    "warmup_steps",
    "accuracy",
    "per_task",
    "seeds",
}
# What a run's training depends on besides its id (setting, learning rate, weight decay, seed):
# every level key but those that choose the runs (and ``per_task``, laid over the rest). Sorted,
# so a changed budget is named by the same key each time.
RUN_BUDGET_KEYS = tuple(
    sorted(
        LEVEL_KEYS
        - {"description", "tasks", "settings", "max_seq_len", "lrs", "weight_decays", "seeds"}
        - {"per_task"}
    )
)
# What a level's ``per_task`` may set for one task (its budget and learning-rate grid); the width,
# the settings and the scoring stay the level's, so the tasks of one level stay comparable.
PER_TASK_KEYS = {
    "lrs",
    "weight_decays",
    "batch_size",
    "epochs",
    "max_steps",
    "max_train_examples",
    "eval_every",
    "warmup_steps",
    "min_lr",
    "seeds",
}


def _number_list(value: Any, key: str, minimum: float, strict: bool) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key} must be a non-empty list of numbers, got {value!r}")
    out = []
    for v in value:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v <= minimum if strict else v < minimum):
            bound = f"> {minimum}" if strict else f">= {minimum}"
            raise ConfigError(f"{key} must hold numbers {bound}, got {v!r}")
        out.append(float(v))
    return tuple(out)


def _optional_int(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer or null, got {value!r}")
    return value


@dataclass(frozen=True)
class Level:
    """One protocol level, checked. ``settings``: ``all`` (mad-lab's grid), ``baseline`` (each
    task's baseline only) or a list of grid ids (``task/baseline``, ``task/key=value``)."""

    name: str
    description: str
    tasks: tuple[str, ...]
    settings: str | tuple[str, ...]
    max_seq_len: int | None
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    d_model: int | None
    batch_size: int
    epochs: float | None
    max_steps: int | None
    max_train_examples: int | None
    num_test_examples: int | None
    eval_every: int | None
    target_accuracy: float
    min_lr: float
    accuracy: str = "macro"  # mad-lab's average; micro for a level of your own
    warmup_steps: int = 0  # linear warm-up before the cosine (mad-lab: none)
    # (task, the level as that task runs it): budgets that differ by task (``per_task``)
    per_task: tuple[tuple[str, Level], ...] = ()
    # model seeds per (setting, learning rate, weight decay): their accuracies are averaged
    # before the best pair is selected (1: mad-lab's single run); per_task may set its own
    seeds: int = 1

    def for_task(self, task: str) -> Level:
        """The level as ``task``'s runs see it: ``per_task``'s settings for it laid over the
        level's own."""
        return dict(self.per_task).get(task, self)

    @classmethod
    def from_config(cls, name: str, node: Any) -> Level:
        where = f"protocol.levels.{name}"
        if not isinstance(node, dict):
            raise ConfigError(f"{where} must be a mapping of level settings, got {node!r}")
        unknown = sorted(set(node) - LEVEL_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown setting {unknown[0]!r} in {where}; valid: {', '.join(sorted(LEVEL_KEYS))}"
            )
        task_names = node.get("tasks") or list(MAD_TASKS)
        for task in task_names:
            if task not in MAD_TASKS:
                raise ConfigError(
                    f"{where}.tasks names {task!r}, which has no MAD difficulty grid; valid: "
                    f"{', '.join(MAD_TASKS)}"
                )
        settings = node.get("settings", "all")
        if isinstance(settings, (list, tuple)):
            if not settings:
                raise ConfigError(f"{where}.settings is an empty list; name grid ids or use all")
            settings = tuple(str(s) for s in settings)
        elif settings not in ("all", "baseline"):
            raise ConfigError(
                f"{where}.settings must be all, baseline or a list of grid ids, got {settings!r}"
            )
        epochs = node.get("epochs")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0
        ):
            raise ConfigError(f"{where}.epochs must be a positive number or null, got {epochs!r}")
        max_steps = _optional_int(node.get("max_steps"), f"{where}.max_steps")
        if epochs is None and max_steps is None:
            raise ConfigError(f"{where} needs a budget: set epochs, max_steps or both")
        target = node.get("target_accuracy", 0.999)
        if not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ConfigError(f"{where}.target_accuracy must be in (0, 1], got {target!r}")
        min_lr = node.get("min_lr", 1e-6)
        if not isinstance(min_lr, (int, float)) or min_lr < 0:
            raise ConfigError(f"{where}.min_lr must be >= 0, got {min_lr!r}")
        warmup = node.get("warmup_steps", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"{where}.warmup_steps must be an integer >= 0, got {warmup!r}")
        accuracy = node.get("accuracy", "macro")
        if accuracy not in ("macro", "micro"):
            raise ConfigError(f"{where}.accuracy must be macro or micro, got {accuracy!r}")
        per_task = node.get("per_task") or {}
        if not isinstance(per_task, dict):
            raise ConfigError(f"{where}.per_task must map task names to settings, got {per_task!r}")
        tasks = []
        for task, override in per_task.items():
            if task not in task_names:
                raise ConfigError(
                    f"{where}.per_task names {task!r}, which the level does not run; valid: "
                    f"{', '.join(task_names)}"
                )
            if not isinstance(override, dict) or not override:
                raise ConfigError(
                    f"{where}.per_task.{task} must map settings to values, got {override!r}"
                )
            bad = sorted(set(override) - PER_TASK_KEYS)
            if bad:
                raise ConfigError(
                    f"{where}.per_task.{task} cannot set {bad[0]!r}; valid: "
                    f"{', '.join(sorted(PER_TASK_KEYS))}"
                )
            merged = {k: v for k, v in node.items() if k != "per_task"}
            tasks.append((task, cls.from_config(f"{name}.per_task.{task}", {**merged, **override})))
        return cls(
            name=name,
            description=str(node.get("description") or ""),
            tasks=tuple(task_names),
            settings=settings,
            max_seq_len=_optional_int(node.get("max_seq_len"), f"{where}.max_seq_len"),
            lrs=_number_list(node.get("lrs"), f"{where}.lrs", 0.0, strict=True),
            weight_decays=_number_list(
                node.get("weight_decays", [0.0]), f"{where}.weight_decays", 0.0, strict=False
            ),
            d_model=_optional_int(node.get("d_model"), f"{where}.d_model"),
            batch_size=_optional_int(node.get("batch_size", 128), f"{where}.batch_size"),
            epochs=None if epochs is None else float(epochs),
            max_steps=max_steps,
            max_train_examples=_optional_int(
                node.get("max_train_examples"), f"{where}.max_train_examples"
            ),
            num_test_examples=_optional_int(
                node.get("num_test_examples"), f"{where}.num_test_examples"
            ),
            eval_every=_optional_int(node.get("eval_every"), f"{where}.eval_every"),
            target_accuracy=float(target),
            min_lr=float(min_lr),
            accuracy=accuracy,
            warmup_steps=warmup,
            per_task=tuple((t, dataclasses.replace(lv, name=name)) for t, lv in tasks),
            seeds=_optional_int(node.get("seeds", 1), f"{where}.seeds") or 1,
        )

    def steps(self, num_train_examples: int) -> int:
        """The training budget of one run: ``epochs`` over the training set, capped by
        ``max_steps`` (either alone where the other is null)."""
        budget = []
        if self.epochs is not None:
            per_epoch = math.ceil(num_train_examples / self.batch_size)
            budget.append(max(1, math.ceil(self.epochs * per_epoch)))
        if self.max_steps is not None:
            budget.append(self.max_steps)
        return min(budget)


def select_settings(level: Level, grid: list[dict]) -> list[dict]:
    """The grid entries a level runs, in grid order; the level's size caps applied to each
    entry's settings (``id`` unchanged: it names mad-lab's setting)."""
    by_id = {e["id"]: e for e in grid}
    if isinstance(level.settings, tuple):
        for sid in level.settings:
            if sid not in by_id:
                raise ConfigError(
                    f"protocol.levels.{level.name}.settings names unknown setting {sid!r}; "
                    f"valid ids look like {grid[0]['id']!r} or {grid[1]['id']!r}"
                )
        chosen = [e for e in grid if e["id"] in level.settings]
    elif level.settings == "baseline":
        chosen = [e for e in grid if e["varied"] is None]
    else:
        chosen = list(grid)
    chosen = [e for e in chosen if e["task"] in level.tasks]
    if level.max_seq_len is not None:
        chosen = [e for e in chosen if e["settings"]["seq_len"] <= level.max_seq_len]
    out = []
    for entry in chosen:
        settings = dict(entry["settings"])
        cap = level.for_task(entry["task"]).max_train_examples
        if cap is not None:
            settings["num_train_examples"] = min(settings["num_train_examples"], cap)
        if level.num_test_examples is not None:
            settings["num_test_examples"] = level.num_test_examples
            settings["num_valid_examples"] = level.num_test_examples
        out.append({**entry, "settings": settings})
    if not out:
        raise ConfigError(f"protocol level {level.name!r} selects no setting; widen its settings")
    return out


def run_id(setting_id: str, lr: float, weight_decay: float, seed: int = 0) -> str:
    """The name of one run, stable across processes (the key that makes a protocol resumable);
    ``seed``: the run's model seed after the first (a level's ``seeds``), named only when > 0
    so that a level's first seed keeps the name runs had before levels had seeds."""
    name = f"{setting_id}|lr={lr:g}|wd={weight_decay:g}"
    return f"{name}|seed={seed}" if seed else name


def aggregate(runs: list[dict], tasks: list[str] | None = None) -> dict:
    """MAD scores from run results.

    Each run: ``task``, ``setting``, ``lr``, ``weight_decay``, ``val_accuracy``,
    ``test_accuracy`` and optionally ``seed`` (a diverged run has ``stop_reason`` starting with
    ``diverged`` and accuracies 0). The runs of one (setting, learning rate, weight decay) at
    different model seeds are averaged, both accuracies (a level's ``seeds``); per setting the
    (learning rate, weight decay) with the best validation accuracy is selected (ties: the first
    in ``runs``' order) and its test accuracy is the setting's score; a task's score is the mean
    over its settings; the MAD score is the mean over ``tasks`` (default: every task seen).
    Returns ``{"mad_score", "tasks": {task: score}, "settings": {setting: {...selected run}}}``
    plus the same from the selected runs' validation accuracies (``mad_score_val``,
    ``tasks_val``): what a search may optimise without looking at the test split.
    """
    pairs: dict[tuple, list[dict]] = {}  # (setting, lr, wd) -> its runs, one per seed
    for run in runs:
        pairs.setdefault((run["setting"], run["lr"], run["weight_decay"]), []).append(run)
    selected: dict[str, dict] = {}
    for group in pairs.values():
        run = {
            **group[0],
            "val_accuracy": sum(_val(r) for r in group) / len(group),
            "test_accuracy": sum(_test(r) for r in group) / len(group),
            "seeds": len(group),
        }
        best = selected.get(run["setting"])
        if best is None or _val(run) > _val(best):
            selected[run["setting"]] = run
    names = list(tasks) if tasks is not None else list(dict.fromkeys(r["task"] for r in runs))

    def means(accuracy) -> tuple[float | None, dict]:
        per_task: dict[str, list[float]] = {}
        for run in selected.values():
            per_task.setdefault(run["task"], []).append(accuracy(run))
        scores = {t: sum(v) / len(v) for t, v in per_task.items()}
        complete = names and all(t in scores for t in names)
        mad = sum(scores[t] for t in names) / len(names) if complete else None
        return mad, {t: scores.get(t) for t in names}

    mad, task_scores = means(_test)
    mad_val, task_val = means(_val)
    return {
        "mad_score": mad,
        "tasks": task_scores,
        "mad_score_val": mad_val,
        "tasks_val": task_val,
        "settings": {
            sid: {
                "task": r["task"],
                "lr": r["lr"],
                "weight_decay": r["weight_decay"],
                "val_accuracy": _val(r),
                "score": _test(r),
                "seeds": r["seeds"],
            }
            for sid, r in selected.items()
        },
    }


def _val(run: dict) -> float:
    v = run.get("val_accuracy")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0


def _test(run: dict) -> float:
    v = run.get("test_accuracy")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0
