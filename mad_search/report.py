"""What a study leaves behind: a leaderboard, ``results.csv``, PNG plots, ``study_summary.json``
in the run directory, and a markdown note on the study that optuna-dashboard shows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mad_search.study import mask_url

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
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(
                steps,
                [t.intermediate_values[s] for s in steps],
                alpha=0.6,
                linestyle="-" if t.state == TrialState.COMPLETE else ":",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_title("learning curves (dotted: pruned)")
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append("learning_curves.png")
    return written


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
        "storage": mask_url(sweep.storage_url),
        "wall_seconds": wall,
        "workers": sweep.workers,
        "threads_per_worker": sweep.threads,
        "embedding": sweep.hogwild.get("embedding", "shared"),
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
        f"Run directory: `{out_dir}`; {sweep.workers} workers x {sweep.threads} threads, "
        f"{summary['embedding']} embedding; wall {wall:.0f}s."
    )
    save_note(study, board, note)
    url = sweep.storage_url
    print(f"\nrun directory: {out_dir} (results.csv, {', '.join(plots)}, study_summary.json)")
    print(f"dashboard: optuna-dashboard {url if '@' not in url else mask_url(url)}")
    return summary
