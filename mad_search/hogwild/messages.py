"""What the coordinator and its Hogwild workers say to each other over a worker's pipe.

Coordinator -> worker: :class:`TrialJob` (train this trial), :class:`Verdict` (the answer to a
:class:`Report`: go on or stop, Optuna's pruning decision), :class:`Stop`.
Worker -> coordinator: :class:`Ready` (imports done, waiting for a job), :class:`Report` (a
validation accuracy at a step), :class:`TrialEnd` (the trial is done, pruned or failed, with its
result). All are small picklable dataclasses; shared tensors travel in shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mad_search.settings import HogwildSettings


@dataclass
class TrialJob:
    """Everything a worker needs to run one trial."""

    number: int
    plans: list  # one mad_search.plan.RunPlan per task
    table_keys: list[str]  # key of each task's shared table
    hogwild: HogwildSettings
    tables: dict = field(default_factory=dict)  # key -> SharedTable (shared memory, not copied)
    data: list = field(default_factory=list)  # per task: {split: (inputs, targets)}, shared memory
    block_modules: list[str] = field(default_factory=list)
    model_seed: int | None = None  # None: each plan's seed + the trial number
    diverged_is_zero: bool = False  # a diverging plan scores 0 (the MAD protocol), not a failure


@dataclass(frozen=True)
class Stop:
    """Finish: the worker process exits."""


@dataclass(frozen=True)
class Verdict:
    """The coordinator's answer to a :class:`Report`: prune or not, and how many threads the
    worker trains with from now on (its own, plus idle workers' lent to it once no trial is
    left to start; 0: unchanged)."""

    prune: bool
    threads: int = 0


@dataclass(frozen=True)
class Ready:
    slot: int
    pid: int


@dataclass(frozen=True)
class Report:
    """Validation accuracy (validation loss for a task judged by loss) of trial ``number`` at
    ``step`` (steps count across its tasks)."""

    number: int
    step: int
    value: float


@dataclass(frozen=True)
class TrialEnd:
    """Trial ``number`` ended: ``done`` (result has every metric), ``pruned`` or ``failed``
    (``reason`` says why; ``result`` may hold a traceback)."""

    number: int
    status: Literal["done", "pruned", "failed"]
    result: dict
    reason: str = ""
