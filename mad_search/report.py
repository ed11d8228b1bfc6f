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
        row = {"number": t.number, "state": t.state.name, "value": t.value}
        row.update({k: v for k, v in t.user_attrs.items() if not isinstance(v, (list, dict))})
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    return rows


def leaderboard(study: optuna.Study, top: int = 15) -> str:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    done.sort(key=lambda t: (-(t.value or 0.0), t.number))
    header = (
        f"{'#':>4}  {'pattern':<34} {'params':>9} {'state':>9} {'val acc':>8} "
        f"{'test acc':>8} {'tok/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for t in done[:top]:
        a = t.user_attrs
        lines.append(
            f"{t.number:>4}  {str(a.get('pattern', '?'))[:34]:<34} {a.get('params', 0):>9,} "
            f"{a.get('state_size', 0):>9,} {t.value:>8.4f} "
            f"{a.get('test_accuracy', float('nan')):>8.4f} "
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
                ax.scatter(x, t.value, s=18)
                ax.annotate(
                    str(t.user_attrs.get("pattern", t.number))[:24],
                    (x, t.value),
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
    named = set(sorted(last, key=lambda n: -last[n])[:LEGEND_MAX])
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


def dashboard_command(url: str) -> str:
    """The optuna-dashboard command for ``url`` that runs as printed from the directory the
    user is in: the script beside this interpreter (a virtual environment's ``bin/`` is often
    not on PATH), a SQLite path made absolute, a password masked."""
    import shlex
    import shutil
    import sys

    from mad_search.storage import sqlite_file

    script = Path(sys.executable).parent / "optuna-dashboard"
    exe = str(script) if script.exists() else shutil.which("optuna-dashboard") or "optuna-dashboard"
    path = sqlite_file(url)
    if path is not None:
        url = "sqlite:///" + str(path.resolve())
    return f"{shlex.quote(exe)} {shlex.quote(mask_url(url))}"


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
    board = leaderboard(study)
    print("\n" + board)
    write_csv(study, out_dir / "results.csv")
    plots = write_plots(study, out_dir)
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
    print(f"dashboard: {dashboard_command(sweep.storage.url)}")
    return summary
