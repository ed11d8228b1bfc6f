"""What the coordinator (:mod:`mad_search.study`) runs: a *job source*, checked before any worker
starts. A sweep (:class:`mad_search.sweep.SweepPlan`) and the MAD protocol
(:class:`mad_search.protocol_run.ProtocolPlan`) are the two; each says how to prepare the study,
which run plans a trial trains, and how a finished trial is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mad_search.plan import RunPlan
from mad_search.settings import HogwildSettings, StudySettings
from mad_search.storage import StudyStorage

if TYPE_CHECKING:
    import optuna


@dataclass
class TrialOutcome:
    """A finished trial's objective values, extra user attributes and intermediate values (step,
    value) to record before ``tell``."""

    values: list[float]
    attrs: dict = field(default_factory=dict)
    intermediate: list[tuple[int, float]] = field(default_factory=list)


@dataclass(kw_only=True)
class JobSource:
    """Settings and hooks every job source has; ``prepare`` and ``plans`` are its own."""

    study: StudySettings
    hogwild: HogwildSettings
    storage: StudyStorage
    block_modules: list[str] = field(default_factory=list)
    probe_plans: list[RunPlan] = field(default_factory=list)  # every task setting and width
    directions: tuple[str, ...] = ("maximize",)  # of the study's objectives
    reports_intermediate: bool = True  # relay the workers' validation reports to the pruner

    def prepare(self, study: optuna.Study) -> tuple[int, str]:
        """Set the study up (enqueue trials, record attributes); returns the number of trials
        this invocation runs and a phrase for the start line."""
        raise NotImplementedError

    def plans(self, trial: optuna.Trial) -> list[RunPlan]:
        """The run plans one trial trains (a ``UserError`` for one that cannot be built)."""
        raise NotImplementedError

    def job_fields(self, trial: optuna.Trial) -> dict:
        """Extra :class:`~mad_search.hogwild.messages.TrialJob` fields for the trial."""
        return {}

    def outcome(self, trial: optuna.Trial, result: dict) -> TrialOutcome:
        """The values to tell Optuna for a finished trial's worker ``result`` (default: its
        validation accuracy, the mean over its plans)."""
        return TrialOutcome(values=[result["val_accuracy"]])

    def label(self, trial: optuna.Trial, plans: list[RunPlan]) -> str:
        """How the display names the trial (default: its layer sequence)."""
        return plans[0].pattern
