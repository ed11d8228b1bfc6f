"""Trial results the coordinator could not write yet, and ``python -m mad_search.replay``.

The coordinator keeps, for every trial, what it still has to write to the study (a
:class:`TrialLog`: user attributes, intermediate values, the final ``tell``). While the storage is
unreachable the logs of finished trials are held in memory and saved in the run directory
(``held_trials.json``, rewritten whenever a trial ends; removed once all are recorded). When the
storage comes back they are written; if it does not come back within ``study.outage_timeout`` the
coordinator stops and

    python -m mad_search.replay RUN_DIR [--storage URL]

writes them into the study later. Each held result is recorded exactly once (its ``held_key``
user attribute says it was): into its own trial if that is still RUNNING; else into the retry
that the heartbeat enqueued for it, if that is still waiting (the retry keeps its link
``failed_trial`` to the original); else as a new finished trial linked by the system attribute
``replayed_from``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

HELD_FILE = "held_trials.json"
FORMAT = 1


@dataclass
class TrialLog:
    """Everything the coordinator writes for one trial, and what of it the storage has."""

    trial: Any  # optuna.Trial
    attrs: dict = field(default_factory=dict)  # every user attribute, in order
    reports: dict = field(default_factory=dict)  # step -> intermediate value
    state: str | None = None  # COMPLETE | PRUNED | FAIL once the trial has ended
    values: list[float] | None = None
    event: str = ""  # what the display says once the result is recorded
    written_attrs: set = field(default_factory=set)
    written_reports: set = field(default_factory=set)
    recorded: bool = False
    elsewhere: bool = False  # its trial was finished by someone else: record the result apart

    @property
    def number(self) -> int:
        return self.trial.number

    def set_attrs(self, attrs: dict) -> None:
        for key, value in attrs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None
            self.attrs[key] = value
            self.written_attrs.discard(key)

    @classmethod
    def from_record(cls, trial: Any, rec: dict) -> TrialLog:
        """A log that writes the held record ``rec`` into ``trial`` (an ``optuna.Trial``)."""
        log = cls(trial, state=rec["state"], values=rec["values"])
        log.set_attrs(rec["user_attrs"])
        log.reports = {int(s): v for s, v in rec["intermediate"]}
        return log

    def end(self, state: str, values: list[float] | None = None, event: str = "") -> None:
        self.state, self.values, self.event = state, values, event

    def record(self, study_name: str) -> dict:
        """The log as a JSON-ready record that :func:`replay_record` can write on its own. The
        first call gives the log its ``held_key`` attribute (written with the others), which
        is how a replay knows the result is already in the study."""
        import optuna

        if "held_key" not in self.attrs:
            self.set_attrs({"held_key": uuid.uuid4().hex})
        return {
            "study": study_name,
            "number": self.trial.number,
            "key": self.attrs["held_key"],
            "params": self.trial.params,
            "distributions": {
                k: optuna.distributions.distribution_to_json(d)
                for k, d in self.trial.distributions.items()
            },
            "user_attrs": dict(self.attrs),
            "intermediate": sorted([int(s), float(v)] for s, v in self.reports.items()),
            "state": self.state,
            "values": self.values,
        }


class FinishedElsewhere(Exception):
    """The trial was finished by someone else (failed as stale by another coordinator)."""


def write(study: optuna.Study, log: TrialLog) -> None:
    """Write what the storage does not have yet of ``log``: attributes, intermediate values,
    then, once the trial has ended, its result. Storage errors propagate (the caller decides
    whether the storage is unreachable); :class:`FinishedElsewhere` if the trial was finished by
    someone else meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trial = log.trial
    try:
        for key, value in list(log.attrs.items()):
            if key not in log.written_attrs:
                trial.set_user_attr(key, value)
                log.written_attrs.add(key)
        for step, value in list(log.reports.items()):
            if step not in log.written_reports:
                if step not in trial._cached_frozen_trial.intermediate_values:
                    trial.report(value, step)
                log.written_reports.add(step)
        if log.state is not None and not log.recorded:
            if log.state == "COMPLETE":
                values = log.values
                study.tell(trial, values[0] if len(values) == 1 else values)
            else:
                study.tell(trial, state=TrialState[log.state])
            log.recorded = True
    except UpdateFinishedTrialError:
        raise FinishedElsewhere from None
    except ValueError as exc:
        if str(exc).startswith("Cannot tell a"):
            raise FinishedElsewhere from None
        raise


def record_elsewhere(study: optuna.Study, rec: dict) -> str:
    """Record ``rec`` whose own trial is already finished: into the waiting retry of that
    trial if there is one, else as a new trial; returns where it went."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if t.system_attrs.get("failed_trial") == rec["number"]:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                for name, dist in _distributions(rec).items():  # the retry's fixed params
                    storage.set_trial_param(
                        t._trial_id, name, dist.to_internal_repr(rec["params"][name]), dist
                    )
                write(study, TrialLog.from_record(optuna.trial.Trial(study, t._trial_id), rec))
                return f"into trial {t.number}, the waiting retry of trial {rec['number']}"
    frozen = optuna.trial.create_trial(
        state=TrialState[rec["state"]],
        values=rec["values"] if rec["state"] == "COMPLETE" else None,
        params=rec["params"],
        distributions=_distributions(rec),
        user_attrs=rec["user_attrs"],
        system_attrs={"replayed_from": rec["number"]},
        intermediate_values={int(s): v for s, v in rec["intermediate"]},
    )
    study.add_trial(frozen)
    number = study.get_trials(deepcopy=False)[-1].number
    return f"as new trial {number} (trial {rec['number']} was finished meanwhile)"


def replay_record(study: optuna.Study, rec: dict) -> str:
    """Write one held record into ``study`` exactly once; returns what was done."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.user_attrs.get("held_key") == rec["key"] and t.state.is_finished():
            return f"already recorded (trial {t.number})"
    own = next((t for t in trials if t.number == rec["number"]), None)
    if own is not None and own.state == TrialState.RUNNING:
        try:
            write(study, TrialLog.from_record(optuna.trial.Trial(study, own._trial_id), rec))
            return f"into trial {rec['number']}"
        except FinishedElsewhere:
            pass
    return record_elsewhere(study, rec)


def _distributions(rec: dict) -> dict:
    import optuna

    return {
        k: optuna.distributions.json_to_distribution(v)
        for k, v in rec["distributions"].items()
    }


# --- the file in the run directory ----------------------------------------------------------------


def save_held(run_dir: Path, study_name: str, storage: str, records: list[dict]) -> Path:
    """Write (atomically) or, with no records, remove ``run_dir/held_trials.json``.
    ``storage`` must be the masked URL: no password is written."""
    path = Path(run_dir) / HELD_FILE
    if not records:
        path.unlink(missing_ok=True)
        return path
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"format": FORMAT, "study": study_name, "storage": storage, "trials": records},
            indent=1,
        )
    )
    os.replace(tmp, path)
    return path


def load_held(run_dir: Path) -> dict:
    path = Path(run_dir) / HELD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no held trials at {path}")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {data.get('format')!r}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mad_search.replay",
        description="Record the trial results a coordinator held when the storage went away "
        f"(RUN_DIR/{HELD_FILE}) into the study.",
    )
    parser.add_argument("run_dir", help="the run directory of the stopped coordinator")
    parser.add_argument(
        "--storage",
        help="the study's storage URL (default: $MAD_SEARCH_STORAGE, else the URL in the file "
        "if it has no password)",
    )
    args = parser.parse_args(argv)
    from mad_search.errors import UserError
    from mad_search.storage import StudyStorage, mask_url

    try:
        data = load_held(Path(args.run_dir))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = args.storage or os.environ.get("MAD_SEARCH_STORAGE") or data["storage"]
    if "***" in url:
        print(
            f"error: the study's storage {data['storage']} needs its password: pass --storage "
            "URL or set MAD_SEARCH_STORAGE",
            file=sys.stderr,
        )
        return 2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = StudyStorage(url).open()
        study = optuna.load_study(study_name=data["study"], storage=storage)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"error: no study {data['study']!r} at {mask_url(url)}", file=sys.stderr)
        return 2
    held = data["trials"]
    for i, rec in enumerate(held):
        what = replay_record(study, rec)
        print(f"trial {rec['number']} ({rec['state'].lower()}): {what}")
        save_held(Path(args.run_dir), data["study"], data["storage"], held[i + 1 :])
    print(f"{len(data['trials'])} held trial(s) recorded in study {data['study']!r} at "
          f"{mask_url(url)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
