"""What sharing the embedding table does to a study's ranking of layer sequences.

    python -m mad_search.bench sharing [patterns=[...]] [workers=2] [max_steps=0] [out=PATH]

The same fixed trials (``patterns``, at least 8 by default, each once, enqueued in order, trial
seed ``seed + trial number``) run twice through the Hogwild pool: ``hogwild.embedding=shared``
(every trial reads and writes one table per task, so later trials start from what earlier and
concurrent ones learned) and ``hogwild.embedding=private`` (the control: each trial its own table
from the same initial weights). Both rank the patterns by validation accuracy; ``kendall_tau``
is Kendall's tau-b between the two rankings (1: same order, 0: unrelated, ties handled), over
the patterns complete in both runs. Task and sizes are the default study's
(``+sweep=layer_patterns``), by default also its steps per trial.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mad_search.bench import BenchError
from mad_search.bench import _common as common
from mad_search.bench.scaling import PATTERNS

DEFAULTS: dict[str, Any] = {
    "patterns": PATTERNS,
    "workers": 2,
    "threads_per_worker": 1,
    "max_steps": 0,  # 0: the default study's (train.max_steps); short runs rank noise
    "d_model": 0,  # 0: the default study's width
    "task_settings": {"num_test_examples": 256},  # task.<key> on top of the default study's
    "train": {},  # train.<key> on top of the default study's (max_steps and eval_every set)
    "seed": 0,
}


def run(**options: Any) -> dict:
    """Run the trials with a shared and with private tables; return the JSON result."""
    opts = _validate(options)
    base = common.compose_base()  # the default study: its width and steps fill the 0s
    opts["d_model"] = opts["d_model"] or int(base.model.d_model)
    opts["max_steps"] = opts["max_steps"] or int(base.train.max_steps)
    patterns = list(opts["patterns"])
    common.check_patterns(patterns)
    train = {
        "max_steps": opts["max_steps"],
        "eval_every": max(1, opts["max_steps"] // 2),
        **opts["train"],
    }
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mad-bench-sharing-") as tmp:
        for embedding in ("shared", "private"):
            cfg = common.compose_study_config(
                patterns=patterns,
                storage=f"sqlite:///{tmp}/{embedding}.db",
                study_name=f"sharing-{embedding}",
                d_model=opts["d_model"],
                workers=opts["workers"],
                threads_per_worker=opts["threads_per_worker"],
                embedding=embedding,
                task_settings=opts["task_settings"],
                train=train,
                seed=opts["seed"],
            )
            if embedding == "shared":
                common.load_data(cfg)  # build the data cache before either run
            common.note(
                f"sharing: {len(patterns)} trials, {embedding} embedding, "
                f"{opts['workers']} workers ..."
            )
            runs[embedding] = common.run_pool(cfg, Path(tmp) / embedding)

    def scores(rec: dict, key: str = "val_accuracy") -> dict[str, float]:
        return {
            r["pattern"]: r[key]
            for r in rec["per_trial"]
            if r["state"] == "COMPLETE" and r[key] is not None
        }

    shared, private = scores(runs["shared"]), scores(runs["private"])
    both = [p for p in patterns if p in shared and p in private]
    tau = common.kendall_tau_b([shared[p] for p in both], [private[p] for p in both])
    rank_shared = common.ranking({p: shared[p] for p in both})
    rank_private = common.ranking({p: private[p] for p in both})
    where = {r["pattern"]: r["rank"] for r in rank_private}
    return {
        "config": {**opts, "cores": common.available_cores()},
        "machine": common.machine(),
        "kendall_tau": tau,
        "patterns_compared": len(both),
        "left_out": [p for p in patterns if p not in both],
        "ranking_shared": rank_shared,
        "ranking_private": rank_private,
        "rank_moves": {r["pattern"]: where[r["pattern"]] - r["rank"] for r in rank_shared},
        "mean_accuracy_shared": runs["shared"]["mean_accuracy"],
        "mean_accuracy_private": runs["private"]["mean_accuracy"],
        "accuracy_diff_shared_vs_private": common.diff(
            runs["shared"]["mean_accuracy"], runs["private"]["mean_accuracy"]
        ),
        "shared": runs["shared"],
        "private": runs["private"],
    }


def table(result: dict) -> str:
    """Both rankings side by side, then tau."""
    cfg = result["config"]
    lines = [
        f"sharing benchmark: {len(cfg['patterns'])} fixed trials, {cfg['max_steps']} steps each, "
        f"d_model {cfg['d_model']}, {cfg['workers']} workers x {cfg['threads_per_worker']} "
        "thread(s); ranked by validation accuracy",
        "",
    ]
    cols = ("rank", "shared table", "val acc", "private tables", "val acc")
    fmt = "{:>4}  {:<26} {:>8}   {:<26} {:>8}"
    lines.append(fmt.format(*cols))
    lines.append("-" * len(fmt.format(*cols)))
    for a, b in zip(result["ranking_shared"], result["ranking_private"]):
        lines.append(
            fmt.format(
                a["rank"],
                a["pattern"][:26],
                f"{a['val_accuracy']:.4f}",
                b["pattern"][:26],
                f"{b['val_accuracy']:.4f}",
            )
        )
    if result["left_out"]:
        lines.append(f"left out (not complete in both runs): {', '.join(result['left_out'])}")
    lines += [
        "",
        f"kendall_tau (tau-b, {result['patterns_compared']} patterns): "
        f"{common.fmt(result['kendall_tau'], '.3f')}; mean val accuracy shared "
        f"{common.fmt(result['mean_accuracy_shared'], '.4f')}, private "
        f"{common.fmt(result['mean_accuracy_private'], '.4f')}; wall shared "
        f"{common.fmt(result['shared']['wall_s'], '.1f')} s, private "
        f"{common.fmt(result['private']['wall_s'], '.1f')} s",
    ]
    return "\n".join(lines)


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    common.check_at_least_one(opts, ("workers", "threads_per_worker"))
    if opts["max_steps"] < 0:
        raise BenchError(
            f"option max_steps must be positive (0: the default study's), got {opts['max_steps']}"
        )
    if opts["d_model"] < 0:
        raise BenchError(
            f"option d_model must be positive (0: the default study's width), got {opts['d_model']}"
        )
    if len(opts["patterns"]) < 2:
        raise BenchError("option patterns needs at least 2 layer sequences to rank")
    if len(set(opts["patterns"])) != len(opts["patterns"]):
        raise BenchError("option patterns must not repeat a layer sequence (each is ranked once)")
    return opts
