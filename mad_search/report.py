"""What a study leaves behind: a leaderboard, ``results.csv``, PNG plots, ``study_summary.json``
in the run directory, and a markdown note on the study that optuna-dashboard shows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mad_search.storage import mask_url

COLUMNS = [
    "number",
    "state",
    "pattern",
    "d_model",
    "params",
    "state_size",
    "val_accuracy",
    "test_accuracy",
    "tokens_per_s",
    "hogwild.collision_rate",
    "hogwild.staleness_mean",
    "worker",
    "fail_reason",
]


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        row = {"number": t.number, "state": t.state.name, "value": first_value(t)}
        if t.values and len(t.values) > 1:
            row["values"] = list(t.values)
        row.update({k: v for k, v in t.user_attrs.items() if not isinstance(v, (list, dict))})
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def first_value(t: optuna.trial.FrozenTrial) -> float | None:
    """A trial's (first) objective value; a multi-objective study has several."""
    return t.values[0] if t.values else None


def _sign(study: optuna.Study) -> float:
    """+1 where the (first) objective is maximised, -1 where it is minimised (a loss)."""
    return -1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else 1.0


def leaderboard(
    study: optuna.Study, top: int = 15, labels: tuple[str, str] = ("val acc", "test acc"),
    test_key: str = "test_accuracy",
) -> str:
    """The best complete trials by (first) objective, in its direction; ``labels`` name its
    value and the test column (``MAD val`` / ``MAD test`` for a protocol-scored sweep, ``val
    loss`` / ``test loss`` for language modelling), ``test_key`` the user attr of the latter."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    sign = _sign(study)
    done.sort(key=lambda t: (-sign * (first_value(t) or 0.0), t.number))
    header = (
        f"{'#':>4}  {'pattern':<34} {'params':>9} {'state':>9} {labels[0]:>8} "
        f"{labels[1]:>8} {'tok/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for t in done[:top]:
        a = t.user_attrs
        lines.append(
            f"{t.number:>4}  {str(a.get('pattern', '?'))[:34]:<34} {a.get('params', 0):>9,} "
            f"{a.get('state_size', 0):>9,} {first_value(t):>8.4f} "
            f"{a.get(test_key, float('nan')):>8.4f} "
            f"{a.get('tokens_per_s', 0):>8,.0f}"
        )
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    lines.append(
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed"
    )
    return "\n".join(lines)


def write_csv(study: optuna.Study, path: Path) -> None:
    rows = trial_rows(study)
    keys = list(dict.fromkeys(COLUMNS + [k for r in rows for k in r]))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def write_plots(study: optuna.Study, out_dir: Path) -> list[str]:
    """accuracy vs parameters, accuracy vs state size, learning curves (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    for key, label, fname in (
        ("params", "parameters", "accuracy_vs_params.png"),
        ("state_size", "state size (floats per sequence)", "accuracy_vs_state.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in done:
            x = t.user_attrs.get(key)
            if x:
                ax.scatter(x, first_value(t), s=18)
                ax.annotate(
                    str(t.user_attrs.get("pattern", t.number))[:24],
                    (x, first_value(t)),
                    fontsize=6,
                    alpha=0.7,
                )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{study.study_name}: accuracy vs {label.split(' ')[0]}")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    write_learning_curves(study, out_dir / "learning_curves.png")
    written.append("learning_curves.png")
    return written


def write_pareto_front(study: optuna.Study, path: Path, names: tuple[str, str]) -> list[int]:
    """For a two-objective study: every complete trial, the Pareto front (Optuna's
    ``best_trials``) drawn and labelled; returns the front's trial numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [t.values[1] for t in done], [t.values[0] for t in done], s=16, c="0.6", label="trials"
    )
    ax.plot(
        [t.values[1] for t in front],
        [t.values[0] for t in front],
        "o-",
        c="tab:red",
        ms=5,
        label="Pareto front",
    )
    for t in front:
        ax.annotate(
            f"#{t.number} {str(t.user_attrs.get('pattern', ''))[:24]}",
            (t.values[1], t.values[0]),
            fontsize=6,
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"{names[1]} (lower is better)")
    ax.set_ylabel(f"{names[0]} (higher is better)")
    ax.set_title(f"{study.study_name}: Pareto front")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [t.number for t in front]


def store_artifacts(study: optuna.Study, out_dir: Path, files: list[str], artifact_dir: Path):
    """Attach the report's files to the study as Optuna artifacts (optuna-dashboard shows them
    when started with ``--artifact-dir``); returns the artifact ids."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    artifact_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(artifact_dir)
    return [
        upload_artifact(artifact_store=store, file_path=str(out_dir / f), study_or_trial=study)
        for f in files
    ]


LEGEND_MAX = 20  # curves named in the learning-curves legend (the best by last value)


def write_learning_curves(study: optuna.Study, path: Path) -> list[str]:
    """Validation accuracy against step, one line per complete (solid) or pruned (dotted) trial,
    each named in the legend by trial number and layer sequence (the ``LEGEND_MAX`` best when
    there are more). Returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.intermediate_values
    ]
    last = {t.number: t.intermediate_values[max(t.intermediate_values)] for t in curves}
    sign = _sign(study)
    named = set(sorted(last, key=lambda n: -sign * last[n])[:LEGEND_MAX])
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = []
    for i, t in enumerate(curves):
        steps = sorted(t.intermediate_values)
        label = None
        if t.number in named:
            label = f"#{t.number} {str(t.user_attrs.get('pattern', '?'))[:32]}"
            labels.append(label)
        ax.plot(
            steps,
            [t.intermediate_values[s] for s in steps],
            color=colours(i % 20),
            alpha=0.8,
            linestyle="-" if t.state == TrialState.COMPLETE else ":",
            label=label,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    shown = "" if len(curves) <= LEGEND_MAX else f"; legend: the {LEGEND_MAX} best"
    ax.set_title(f"learning curves (dotted: pruned{shown})")
    if labels:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return labels


def dashboard_command(url: str, artifact_dir: Path | None = None) -> str:
    """The optuna-dashboard command for ``url`` that runs as printed from the directory the
    user is in: the script beside this interpreter (a virtual environment's ``bin/`` is often
    not on PATH), a SQLite path made absolute, a password masked, the artifact folder."""
    import shlex
    import shutil
    import sys

    from mad_search.storage import sqlite_file

    script = Path(sys.executable).parent / "optuna-dashboard"
    exe = str(script) if script.exists() else shutil.which("optuna-dashboard") or "optuna-dashboard"
    path = sqlite_file(url)
    if path is not None:
        url = "sqlite:///" + str(path.resolve())
    command = f"{shlex.quote(exe)} {shlex.quote(mask_url(url))}"
    if artifact_dir is not None:
        command += f" --artifact-dir {shlex.quote(str(Path(artifact_dir).resolve()))}"
    return command


def save_note(study: optuna.Study, board: str, extra: str = "") -> None:
    """Put the leaderboard on the study as an optuna-dashboard note (markdown)."""
    from optuna_dashboard import save_note as _save

    _save(study, f"# {study.study_name}: leaderboard\n\n```\n{board}\n```\n\n{extra}")


def finish(
    study: optuna.Study,
    out_dir: Path,
    tables: dict,
    sweep,
    wall: float,
    restarts: int,
    interrupted: bool = False,
) -> dict:
    protocol = sweep.objectives[0] == "mad_score"
    if protocol:
        board = leaderboard(study, labels=("MAD val", "MAD test"))
    elif sweep.objectives[0] == "val_loss":
        board = leaderboard(study, labels=("val loss", "test loss"), test_key="test_loss")
    else:
        board = leaderboard(study)
    print("\n" + board)
    write_csv(study, out_dir / "results.csv")
    plots = write_plots(study, out_dir)
    front = None
    if len(sweep.objectives) == 2:
        front = write_pareto_front(study, out_dir / "pareto_front.png", sweep.objectives)
        plots.append("pareto_front.png")
    artifact_dir = sweep.storage.artifact_dir
    artifacts = store_artifacts(study, out_dir, plots, artifact_dir)
    summary = {
        "study": study.study_name,
        "storage": sweep.storage.masked,
        "wall_seconds": wall,
        "workers": sweep.hogwild.workers,
        "threads_per_worker": sweep.hogwild.threads_per_worker,
        "embedding": sweep.hogwild.embedding,
        "worker_restarts": restarts,
        "interrupted": interrupted,
        "tables": {
            k: {"table_mb": t.weight.numel() * 4 / 2**20, **t.summary()} for k, t in tables.items()
        },
        "trials": trial_rows(study),
        "files": ["results.csv", *plots],
        "objectives": list(sweep.objectives),
        "pareto_front": front,
        "artifacts": {"dir": str(artifact_dir), "ids": artifacts},
    }
    done = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    for key in (
        "hogwild.rows_per_step",
        "hogwild.collision_rate",
        "hogwild.staleness_mean",
        "tokens_per_s",
    ):
        vals = [r[key] for r in done if isinstance(r.get(key), (int, float))]
        summary[f"mean_{key}"] = sum(vals) / len(vals) if vals else None
    (out_dir / "study_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    note = (
        f"Run directory: `{out_dir}`; {sweep.hogwild.workers} workers x "
        f"{sweep.hogwild.threads_per_worker} threads, "
        f"{summary['embedding']} embedding; wall {wall:.0f}s."
    )
    save_note(study, board, note)
    print(f"\nrun directory: {out_dir} (results.csv, {', '.join(plots)}, study_summary.json)")
    print(f"dashboard: {dashboard_command(sweep.storage.url, artifact_dir)}")
    return summary
