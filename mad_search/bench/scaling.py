"""Scaling benchmark: one fixed list of trials through the Hogwild pool at several pool sizes.

    python -m mad_search.bench scaling [workers=[1,2,4]] [sizes=[0,128]] [trials=8]
        [max_steps=0] [threads_per_worker=1] [optuna_n_jobs=2] [out=PATH]

The trials are the same in every setup: ``patterns`` (repeated up to ``trials``) enqueued in
order into a fresh SQLite study, random sampler with a fixed seed, no pruner, trial seed
``seed + trial number``; the task and training settings of the default study
(``+sweep=layer_patterns``: its task, selective copying since 2026-12-05, its sequence length,
batch and learning rate) with ``max_steps`` steps, at each width in ``sizes`` (0: the default
study's width). Per width, back to back:

* ``serial``: what a user does without the pool: one process, torch using every core, one trial
  at a time (``study.optimize`` with ``n_jobs=1``; the objective builds the model with a dense
  ``nn.Embedding`` and trains it with :func:`mad_search.train.train`, AdamW on everything);
* ``pool``: :func:`mad_search.study.run_study` with ``hogwild.workers=W`` and
  ``threads_per_worker`` threads each, for every W in ``workers`` (W above the core count is
  oversubscribed, and reported as such);
* ``optuna_n_jobs``: Optuna's own parallelism, ``study.optimize(n_jobs=optuna_n_jobs)``: threads
  in one process, the same in-process objective, torch threads 1 (process-wide).

Wall time: the pool's is ``run_study``'s (worker start-up included; config checks and the final
report left out); the in-process runs' covers loading the data and every trial. Ratios are of
trials per hour (the same trials everywhere, so also of wall time): ``speedup_2`` is 2 workers
over 1 worker, ``speedup_vs_serial`` 2 workers over ``serial``; both, with
``accuracy_diff_2_vs_1``, are given for the first width (the default study's) at the top level
and per width under ``by_size``. Every setup runs at the first width; at further widths only
``serial`` and the 2-worker pool run (``speedup_vs_serial`` per width), unless
``every_size=true``. ``span`` numbers (first trial start to last trial end) leave the one-off
start-up out.

A pool run pays a fixed cost that the in-process runs do not: spawning the workers, their
imports, and each worker's first-call costs (PyTorch imports ``torch._dynamo`` on the first
optimiser step), several seconds on 2 cores. The speedups therefore grow with trial length
(``max_steps``; by default the default study's 300 steps per trial). The in-process runs get an
untimed warm-up (one tiny training run per pattern) so that they are not charged the same
first-call costs. ``cpu`` in each record (the table's "cores us/others") says how many cores
the benchmark's processes and everything else on the machine used during that run: on a machine
that others are loading, a ratio is only as clean as those numbers are steady (and torch's
multi-threaded serial baseline suffers most from others' load).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mad_search.bench import BenchError
from mad_search.bench import _common as common

PATTERNS = [
    "mlstm*4",  # xLSTM 1:0
    "(mlstm slstm)*2",  # 1:1
    "mlstm*3 slstm",  # 3:1
    "(attention swiglu)*2",  # transformer baseline
    "mlstm*2",
    "mlstm attention",  # hybrid
    "slstm*2",  # 0:1
    "attention swiglu",
]
"""Layer sequences of the default study's families, shallow enough for minutes on 2 cores;
costliest first, so the greedy hand-out of trials to free workers ends evenly."""

DEFAULTS: dict[str, Any] = {
    "workers": [1, 2, 4],
    "threads_per_worker": 1,
    "trials": 8,
    "max_steps": 0,  # steps per trial; 0: the default study's (train.max_steps)
    "sizes": [0, 128],  # model.d_model of each run; 0: the default study's; the first is primary
    "patterns": PATTERNS,
    "serial": True,  # run the serial baseline (speedup_vs_serial needs it)
    "serial_threads": 0,  # torch threads of the serial baseline; 0 = every core
    "optuna_n_jobs": 2,  # Optuna's threads-in-one-process comparison; 0 = skip
    "task_settings": {"num_test_examples": 256},  # task.<key> on top of the default study's
    "train": {},  # train.<key> on top of the default study's (max_steps and eval_every set)
    "every_size": False,  # every setup at every width; false: serial and pool 2 after the first
    "seed": 0,
}

TARGETS = {
    "speedup_2": 1.8,
    "speedup_vs_serial": 1.1,
    "speedup_vs_serial_min": 1.0,
    "accuracy_diff_2_vs_1_abs": 0.02,
}


def run(**options: Any) -> dict:
    """Run every setup at every width; return the JSON result."""
    opts = _validate(options)
    base = common.compose_base()  # the default study: its width and steps fill the 0s
    opts["max_steps"] = opts["max_steps"] or int(base.train.max_steps)
    opts["sizes"] = list(dict.fromkeys(s or int(base.model.d_model) for s in opts["sizes"]))
    cores = common.available_cores()
    serial_threads = opts["serial_threads"] or cores
    patterns = common.trial_patterns(opts["patterns"], opts["trials"])
    common.check_patterns(patterns)
    by_size: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mad-bench-scaling-") as tmp:
        for i, d_model in enumerate(opts["sizes"]):
            size_opts = opts
            if i and not opts["every_size"]:  # further widths: what speedup_vs_serial needs
                size_opts = {**opts, "workers": [2], "optuna_n_jobs": 0, "serial": True}
            by_size[str(d_model)] = _one_size(
                Path(tmp), d_model, patterns, size_opts, serial_threads
            )
    first = by_size[str(opts["sizes"][0])]
    per_workers = {
        w: {
            k: rec[k]
            for k in (
                "trials_per_hour",
                "tokens_per_s",
                "mean_accuracy",
                "wall_s",
                "span_s",
                "complete",
                "trials",
            )
        }
        for w, rec in first["pool"].items()
    }
    vs_serial = {s: r["speedup_vs_serial"] for s, r in by_size.items()}
    known = [v for v in vs_serial.values() if v is not None]
    result = {
        "config": {
            **opts,
            "trial_patterns": patterns,
            "cores": cores,
            "serial_threads": serial_threads,
        },
        "machine": common.machine(),
        "serial_baseline": (
            f"in-process, one trial at a time (study.optimize n_jobs=1), torch threads "
            f"{serial_threads} (cores: {cores}), model from mad_search.train.train_plan with a "
            "dense nn.Embedding, mad_search.train.train with AdamW on everything; no pool"
        ),
        "optuna_n_jobs_mode": (
            f"study.optimize(n_jobs={opts['optuna_n_jobs']}) in one process: Python threads "
            "running the same in-process objective (dense embedding, AdamW); torch threads 1, "
            "process-wide"
            if opts["optuna_n_jobs"]
            else "skipped (optuna_n_jobs=0)"
        ),
        "wall_time": (
            "pool: run_study's wall_seconds (worker start-up and every trial; config checks and "
            "the report left out); in-process runs: loading the data and every trial"
        ),
        "primary_size": opts["sizes"][0],
        "workers": per_workers,
        "speedup_2": first["speedup_2"],
        "speedup_vs_serial": first["speedup_vs_serial"],
        "accuracy_diff_2_vs_1": first["accuracy_diff_2_vs_1"],
        "speedup_2_by_size": {s: r["speedup_2"] for s, r in by_size.items()},
        "speedup_vs_serial_by_size": vs_serial,
        "speedup_vs_serial_min": min(known) if known else None,
        "targets": TARGETS,
        "by_size": by_size,
    }
    result["met"] = _met(result)
    return result


def _one_size(tmp: Path, d_model: int, patterns: list[str], opts: dict, serial_threads: int):
    train = {"max_steps": opts["max_steps"], "eval_every": opts["max_steps"], **opts["train"]}

    def config(tag: str, workers: int = 1):
        return common.compose_study_config(
            patterns=patterns,
            storage=f"sqlite:///{tmp}/{tag}-d{d_model}.db",
            study_name=f"scaling-{tag}-d{d_model}",
            d_model=d_model,
            workers=workers,
            threads_per_worker=opts["threads_per_worker"],
            task_settings=opts["task_settings"],
            train=train,
            seed=opts["seed"],
        )

    cfg = config("probe")
    common.load_data(cfg)  # build the task's data cache once, outside every timing
    out: dict[str, Any] = {"d_model": d_model, "serial": None, "pool": {}, "optuna_n_jobs": None}
    if opts["serial"]:
        common.note(f"scaling d_model {d_model}: serial, {serial_threads} threads ...")
        out["serial"] = common.run_inprocess(cfg, n_jobs=1, threads=serial_threads)
        out["serial"]["threads"] = serial_threads
    for w in opts["workers"]:
        common.note(
            f"scaling d_model {d_model}: pool, {w} workers x "
            f"{opts['threads_per_worker']} threads ..."
        )
        rec = common.run_pool(config(f"pool{w}", w), tmp / f"pool{w}-d{d_model}")
        rec["threads_per_worker"] = opts["threads_per_worker"]
        rec["oversubscribed"] = w * opts["threads_per_worker"] > common.available_cores()
        out["pool"][str(w)] = rec
    if opts["optuna_n_jobs"]:
        n = opts["optuna_n_jobs"]
        common.note(f"scaling d_model {d_model}: optuna n_jobs={n}, torch threads 1 ...")
        out["optuna_n_jobs"] = common.run_inprocess(cfg, n_jobs=n, threads=1)
        out["optuna_n_jobs"].update(n_jobs=n, threads=1)

    def tph(rec):
        return rec["trials_per_hour"] if rec else None

    def span_rate(rec):
        return rec["complete"] / rec["span_s"] if rec and rec.get("span_s") else None

    pool = out["pool"]
    one, two = pool.get("1"), pool.get("2")
    out["speedup_2"] = common.ratio(tph(two), tph(one))
    out["speedup_vs_serial"] = common.ratio(tph(two), tph(out["serial"]))
    out["speedup_by_workers"] = {w: common.ratio(tph(r), tph(one)) for w, r in pool.items()}
    out["speedup_vs_serial_by_workers"] = {
        w: common.ratio(tph(r), tph(out["serial"])) for w, r in pool.items()
    }
    out["speedup_2_span"] = common.ratio(span_rate(two), span_rate(one))
    out["speedup_vs_serial_span"] = common.ratio(span_rate(two), span_rate(out["serial"]))
    out["pool_2_vs_optuna_n_jobs"] = common.ratio(tph(two), tph(out["optuna_n_jobs"]))
    out["accuracy_diff_2_vs_1"] = common.diff(
        two and two["mean_accuracy"], one and one["mean_accuracy"]
    )
    return out


def _met(result: dict) -> dict:
    def at_least(value, target):
        return None if value is None else value >= target

    diff = result["accuracy_diff_2_vs_1"]
    return {
        "speedup_2": at_least(result["speedup_2"], TARGETS["speedup_2"]),
        "speedup_vs_serial": at_least(result["speedup_vs_serial"], TARGETS["speedup_vs_serial"]),
        "speedup_vs_serial_min": at_least(result["speedup_vs_serial_min"], 1.0),
        "accuracy_diff_2_vs_1": None if diff is None else abs(diff) <= 0.02,
    }


def table(result: dict) -> str:
    """One block per width: each setup's wall time, throughput, accuracy and speedups."""
    cfg = result["config"]
    lines = [
        f"scaling benchmark: {len(cfg['trial_patterns'])} fixed trials, {cfg['max_steps']} steps "
        f"each, default study's task; {cfg['cores']} cores; pool workers x "
        f"{cfg['threads_per_worker']} thread(s); torch {result['machine']['torch']}",
        f"serial baseline: {result['serial_baseline']}",
        f"optuna n_jobs: {result['optuna_n_jobs_mode']}",
        "",
    ]
    cols = (
        "setup",
        "procs x thr",
        "wall s",
        "trials/h",
        "tokens/s",
        "trial tok/s",
        "mean acc",
        "vs 1 worker",
        "vs serial",
        "cores us/others",
    )
    fmt = "{:<16} {:>11} {:>8} {:>9} {:>10} {:>11} {:>9} {:>11} {:>9} {:>15}"
    for size, res in result["by_size"].items():
        lines.append(f"d_model {size}")
        lines.append(fmt.format(*cols))
        lines.append("-" * len(fmt.format(*cols)))
        rows = []
        if res["serial"]:
            rows.append(("serial", f"1 x {res['serial']['threads']}", res["serial"], None, 1.0))
        for w, rec in res["pool"].items():
            label = f"pool {w}" + (" (over)" if rec["oversubscribed"] else "")
            rows.append(
                (
                    label,
                    f"{w} x {rec['threads_per_worker']}",
                    rec,
                    res["speedup_by_workers"][w],
                    res["speedup_vs_serial_by_workers"][w],
                )
            )
        if res["optuna_n_jobs"]:
            rec = res["optuna_n_jobs"]
            serial = res["serial"]
            rows.append(
                (
                    f"optuna n_jobs={rec['n_jobs']}",
                    f"1 x {rec['threads']}",
                    rec,
                    None,
                    common.ratio(rec["trials_per_hour"], serial and serial["trials_per_hour"]),
                )
            )
        for label, procs, rec, vs1, vss in rows:
            lines.append(
                fmt.format(
                    label,
                    procs,
                    common.fmt(rec["wall_s"], ".1f"),
                    common.fmt(rec["trials_per_hour"], ",.0f"),
                    common.fmt(rec["tokens_per_s"], ",.0f"),
                    common.fmt(rec["mean_trial_tokens_per_s"], ",.0f"),
                    common.fmt(rec["mean_accuracy"], ".4f"),
                    common.fmt(vs1, ".2f") + ("x" if vs1 is not None else ""),
                    common.fmt(vss, ".2f") + ("x" if vss is not None else ""),
                    _cores(rec.get("cpu")),
                )
            )
        lines.append(
            f"speedup_2 {common.fmt(res['speedup_2'])} (span {common.fmt(res['speedup_2_span'])})"
            f" | speedup_vs_serial {common.fmt(res['speedup_vs_serial'])} "
            f"(span {common.fmt(res['speedup_vs_serial_span'])})"
            f" | pool 2 / optuna n_jobs {common.fmt(res['pool_2_vs_optuna_n_jobs'])}"
            f" | accuracy_diff_2_vs_1 {common.fmt(res['accuracy_diff_2_vs_1'], '+.4f')}"
        )
        lines.append("")
    met = result["met"]
    lines.append(
        "cores us/others: CPU seconds per second used by the benchmark's processes / by every "
        "other process on the machine during that run (others' load makes ratios unclean)"
    )
    lines.append(
        f"d_model {result['primary_size']}: speedup_2 {common.fmt(result['speedup_2'])} "
        f"(target >= 1.8: {common.verdict(met['speedup_2'])}), speedup_vs_serial "
        f"{common.fmt(result['speedup_vs_serial'])} (target >= 1.1: "
        f"{common.verdict(met['speedup_vs_serial'])}), lowest over sizes "
        f"{common.fmt(result['speedup_vs_serial_min'])} (>= 1.0: "
        f"{common.verdict(met['speedup_vs_serial_min'])}), accuracy_diff_2_vs_1 "
        f"{common.fmt(result['accuracy_diff_2_vs_1'], '+.4f')} (within 0.02: "
        f"{common.verdict(met['accuracy_diff_2_vs_1'])})"
    )
    return "\n".join(lines)


def _cores(cpu: dict | None) -> str:
    if not cpu:
        return "-"
    return f"{common.fmt(cpu['ours_cores'], '.1f')}/{common.fmt(cpu['others_cores'], '.1f')}"


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    common.check_at_least_one(opts, ("trials", "threads_per_worker"))
    for key in ("optuna_n_jobs", "serial_threads", "max_steps"):
        if opts[key] < 0:
            raise BenchError(f"option {key} must be 0 or more, got {opts[key]}")
    if not opts["workers"] or any(w < 1 for w in opts["workers"]):
        raise BenchError(f"option workers must be positive integers, got {opts['workers']}")
    if not opts["sizes"] or any(s < 0 for s in opts["sizes"]):
        raise BenchError(
            f"option sizes must be positive integers (0: the default study's), got {opts['sizes']}"
        )
    opts["workers"] = list(dict.fromkeys(opts["workers"]))
    return opts
