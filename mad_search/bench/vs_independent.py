"""The pool against the standard way to parallelise Optuna: independent processes, one storage.

    python -m mad_search.bench vs_independent [workers=[1,2,4]] [trials=8] [throughput=true]
        [throughput_steps=0] [repeats=2] [d_model=512] [vocab_size=50000] [max_steps=6] [out=PATH]

Two phases, each running the same fixed trials (patterns repeated up to ``trials``, enqueued in
order, trial seed ``seed + trial number``) two ways at each W in ``workers``:

1. throughput: the default study's trials as a user runs them (``+sweep=layer_patterns``: its
   task, width and steps per trial, ``throughput_patterns``); ``throughput_ratio`` comes from
   here (``throughput=false`` skips the phase and takes it from phase 2);
2. memory: the language-modelling task with a big word vocabulary (``patterns``, ``task``,
   ``vocab_size``, ``d_model``, ``max_steps``, ...), where the table's size shows.

The two ways:

* ``pool``: one ``run_study`` process (the coordinator) with W Hogwild workers sharing one
  embedding table per task in shared memory;
* ``independent``: W copies of a script that calls ``study.optimize(objective, n_trials=k)`` on
  one shared study storage (a journal file by default, Optuna's advice for several processes on
  one machine; ``storage=sqlite`` for a SQLite file), the k adding up to ``trials``; each trains
  its trials in-process with its own dense ``nn.Embedding`` and AdamW.

Phase 1 runs each setup ``repeats`` times per W, in alternating order (pool then independent,
then independent then pool, ...): on a shared machine whose speed drifts by 10-20% within minutes
(seen here), one pair of runs can land either way; alternating cancels a steady drift, and the
times are summed before the ratio is taken (each round's own ratio is kept under ``rounds``).

Both get ``threads_per_worker`` torch threads per process (0: cores // W, the pool's own rule).
Each setup is started in fresh processes; its time runs from the launch to the last trial told
(start-up included, the pool's final report left out), and ``throughput_ratio`` is pool trials
per hour over independent trials per hour (at W = 2). Memory (phase 2) is the proportional set
size (PSS, from ``/proc/<pid>/smaps_rollup``) summed over every process of the setup, sampled
every ``sample_interval`` seconds; the peak is kept. The slope of peak PSS against W is each extra
worker's cost; the shared table should save at least its own size (``table_mb``) per extra
worker. Phase 2's defaults are the language-modelling task with a word vocabulary of 50,000
and d_model 512, and a few training steps: memory is the point. The bundled corpus has fewer
distinct words than that; the table (and the model's head) are still allocated at 50,000 rows,
and the JSON reports how many rows the data uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mad_search.bench import BenchError
from mad_search.bench import _common as common
from mad_search.bench.scaling import PATTERNS

DEFAULTS: dict[str, Any] = {
    "workers": [1, 2, 4],
    "trials": 8,
    # phase 1 (throughput): the default study's task, width and steps
    "throughput": True,
    "throughput_patterns": PATTERNS,
    "throughput_steps": 0,  # steps per trial; 0: the default study's (train.max_steps)
    "throughput_task_settings": {"num_test_examples": 256},  # task.<key> on the default study's
    "repeats": 2,  # phase 1 runs per setup and W, in alternating order (ABBA: drift cancels)
    # phase 2 (memory): a big vocabulary
    "patterns": ["attention swiglu", "mlstm swiglu", "swiglu attention", "mlstm"],
    "task": "text",
    "tokenizer": "word",
    "vocab_size": 50000,
    "d_model": 512,
    "seq_len": 32,
    "batch_size": 8,
    "max_steps": 6,
    "task_settings": {"num_train_examples": 512, "num_test_examples": 16},
    "train": {"eval_batch_size": 16},
    "threads_per_worker": 0,  # 0: cores // W (at least 1), for both setups
    "storage": "journal",  # the independent processes' shared storage: journal | sqlite
    "sample_interval": 0.2,  # seconds between PSS samples
    "seed": 0,
}

CHILD = "from mad_search.bench._child import main; main()"


def run(**options: Any) -> dict:
    """Run both setups at every W; return the JSON result."""
    opts = _validate(options)
    if not common.pss_available():
        raise BenchError(
            "this benchmark reads /proc/<pid>/smaps_rollup (Linux 4.14+), which is "
            "not readable here"
        )
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    patterns = common.trial_patterns(opts["patterns"], opts["trials"])
    common.check_patterns(patterns)
    cores = common.available_cores()
    throughput_patterns = common.trial_patterns(opts["throughput_patterns"], opts["trials"])
    steps = opts["throughput_steps"] or int(common.compose_base().train.max_steps)
    if opts["throughput"]:
        common.check_patterns(throughput_patterns)
    throughput_by_workers: dict[str, dict] = {}
    by_workers: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mad-bench-vs-independent-") as tmp:
        tmp = Path(tmp)
        if opts["throughput"]:

            def study_config(tag, workers, threads, storage=None):
                return _study_config(
                    tmp, tag, throughput_patterns, opts, steps, workers, threads, storage
                )

            common.load_data(study_config("probe-study", 1, 1))  # data cache, before timing
            throughput_by_workers = _phase(
                tmp,
                "throughput",
                study_config,
                throughput_patterns,
                opts,
                cores,
                repeats=opts["repeats"],
            )

        def text_config(tag, workers, threads, storage=None):
            return _config(tmp, tag, patterns, opts, workers, threads, storage)

        data = common.load_data(text_config("probe", 1, 1))  # data cache, before any timing
        rows_used = _rows_used(data)
        by_workers = _phase(tmp, "memory", text_config, patterns, opts, cores)
    ws = [int(w) for w in by_workers]

    def peaks(setup: str, key: str) -> list[float]:
        return [by_workers[str(w)][setup]["memory"][key] for w in ws]

    table_mb = opts["vocab_size"] * opts["d_model"] * 4 / 2**20
    slope_pool = common.slope(ws, peaks("pool", "peak_pss_mb"))
    slope_indep = common.slope(ws, peaks("independent", "peak_pss_mb"))
    saving = common.diff(slope_indep, slope_pool)
    result = {
        "config": {
            **opts,
            "trial_patterns": patterns,
            "throughput_trial_patterns": throughput_patterns if opts["throughput"] else None,
            "throughput_steps": steps if opts["throughput"] else None,
            "cores": cores,
        },
        "machine": common.machine(),
        "task": {
            "name": opts["task"],
            "tokenizer": opts["tokenizer"],
            "vocab_size": opts["vocab_size"],
            "rows_used_by_data": rows_used,
            "note": (
                f"table and head allocated at vocab_size {opts['vocab_size']}; the data uses "
                f"{rows_used} distinct token ids"
            ),
        },
        "independent_setup": (
            f"W processes, each study.optimize(objective, n_trials=k) on one {opts['storage']} "
            "storage; objective: mad_search.train.train_plan (dense nn.Embedding) + "
            "mad_search.train.train (AdamW on everything)"
        ),
        "timing": "from launching the setup's processes to its last trial told",
        "memory_method": (
            "PSS from /proc/<pid>/smaps_rollup summed over the setup's processes and their "
            f"children, sampled every {opts['sample_interval']} s, peak kept; MB = 2**20 bytes"
        ),
        "table_mb": table_mb,
        "throughput_phase": (
            f"the default study's trials ({len(throughput_patterns)} trials, {steps} steps each, "
            "its task and width)"
            if opts["throughput"]
            else "skipped (throughput=false): throughput_ratio is the memory phase's"
        ),
        "throughput_ratio": ((throughput_by_workers or by_workers).get("2") or {}).get(
            "throughput_ratio"
        ),
        "throughput_ratio_by_workers": {
            w: r["throughput_ratio"] for w, r in (throughput_by_workers or by_workers).items()
        },
        "trial_phase_ratio_by_workers": {
            w: r["trial_phase_ratio"] for w, r in (throughput_by_workers or by_workers).items()
        },
        "throughput_ratio_memory_phase_by_workers": {
            w: r["throughput_ratio"] for w, r in by_workers.items()
        },
        "throughput_by_workers": throughput_by_workers,
        "pss_total_mb": {
            setup: dict(zip(map(str, ws), peaks(setup, "peak_pss_mb")))
            for setup in ("pool", "independent")
        },
        "pss_per_extra_worker_pool_mb": slope_pool,
        "pss_per_extra_worker_independent_mb": slope_indep,
        "pss_saving_per_extra_worker_mb": saving,
        "anon_shmem_per_extra_worker_pool_mb": common.slope(
            ws, peaks("pool", "peak_pss_anon_shmem_mb")
        ),
        "anon_shmem_per_extra_worker_independent_mb": common.slope(
            ws, peaks("independent", "peak_pss_anon_shmem_mb")
        ),
        "by_workers": by_workers,
    }
    ratio = result["throughput_ratio"]
    result["met"] = {
        "throughput_ratio": None if ratio is None else ratio >= 1.0,
        "memory": None if saving is None else saving >= table_mb,
    }
    return result


def _phase(
    tmp: Path, name: str, make_cfg, patterns: list[str], opts: dict, cores: int, repeats: int = 1
):
    """Both setups at every W; per W the two records and their throughput ratio.

    With ``repeats`` > 1 each W runs both setups ``repeats`` times in alternating order (pool
    first, then independent first, ...: ABBA), so that a machine whose speed drifts during the
    benchmark favours neither; the records are then the runs combined (:func:`_combine`) and
    ``rounds`` keeps each round's own ratio.
    """
    out: dict[str, dict] = {}
    for w in opts["workers"]:
        threads = opts["threads_per_worker"] or max(1, cores // w)
        what = f"vs_independent {name}: {w} worker(s) x {threads} thread(s)"
        runs: dict[str, list[dict]] = {"pool": [], "independent": []}
        rounds = []
        for r in range(repeats):
            order = ("pool", "independent") if r % 2 == 0 else ("independent", "pool")
            suffix = f"-r{r}" if r else ""
            for setup in order:
                rnd = f" (round {r + 1}/{repeats})" if repeats > 1 else ""
                if setup == "pool":
                    common.note(f"{what}: pool{rnd} ...")
                    rec = _run_pool(tmp, f"{name}-pool{w}{suffix}", make_cfg, w, threads, opts)
                else:
                    common.note(f"{what}: {w} independent process(es){rnd} ...")
                    rec = _run_independent(
                        tmp,
                        f"{name}-independent{w}{suffix}",
                        make_cfg,
                        patterns,
                        w,
                        threads,
                        opts,
                    )
                runs[setup].append(rec)
            rounds.append(
                {
                    "order": list(order),
                    "pool_wall_s": runs["pool"][-1]["wall_s"],
                    "independent_wall_s": runs["independent"][-1]["wall_s"],
                    "throughput_ratio": common.ratio(
                        runs["pool"][-1]["trials_per_hour"],
                        runs["independent"][-1]["trials_per_hour"],
                    ),
                }
            )
        pool, indep = (_combine(runs[s]) for s in ("pool", "independent"))
        out[str(w)] = {
            "threads_per_process": threads,
            "pool": pool,
            "independent": indep,
            "throughput_ratio": common.ratio(pool["trials_per_hour"], indep["trials_per_hour"]),
            # the same, from each setup's first trial start to its last trial end (start-up out)
            "trial_phase_ratio": common.ratio(
                common.ratio(pool["complete"], pool["span_s"]),
                common.ratio(indep["complete"], indep["span_s"]),
            ),
            "rounds": rounds,
        }
    return out


def _combine(runs: list[dict]) -> dict:
    """Several runs of one setup as one record: times, trials and tokens summed (so
    ``trials_per_hour`` is over all of them), accuracies averaged, the highest memory peak;
    ``per_trial`` is the first run's and ``runs`` holds every run's record."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    total = {k: sum(r[k] for r in runs) for k in ("wall_s", "trials", "complete", "tokens")}
    wall = total["wall_s"]

    def mean(key: str):
        values = [r[key] for r in runs if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    out = dict(first)
    out.update(
        total,
        span_s=sum(r["span_s"] or 0.0 for r in runs),
        start_s=sum(r["start_s"] or 0.0 for r in runs),
        until_exit_s=sum(r["until_exit_s"] for r in runs),
        trials_per_hour=3600.0 * total["complete"] / wall if wall > 0 else None,
        tokens_per_s=total["tokens"] / wall if wall > 0 else None,
        mean_trial_tokens_per_s=mean("mean_trial_tokens_per_s"),
        mean_accuracy=mean("mean_accuracy"),
        memory=max((r["memory"] for r in runs), key=lambda m: m["peak_pss_mb"] or 0.0),
        cpu={
            key: sum(r["cpu"][key] * r["cpu"]["elapsed_s"] for r in runs)
            / sum(r["cpu"]["elapsed_s"] for r in runs)
            for key in ("ours_cores", "machine_busy_cores", "others_cores")
            if all(r["cpu"].get(key) is not None for r in runs)
        }
        | {"elapsed_s": sum(r["cpu"]["elapsed_s"] for r in runs)},
        runs=[{k: v for k, v in r.items() if k != "per_trial"} for r in runs],
    )
    return out


def _study_config(
    tmp: Path,
    tag: str,
    patterns: list[str],
    opts: dict,
    steps: int,
    workers: int,
    threads: int,
    storage: str | None = None,
):
    """Phase 1: the default study's task, width and training, with the fixed trials."""
    return common.compose_study_config(
        patterns=patterns,
        storage=storage or f"sqlite:///{tmp}/{tag}.db",
        study_name=f"vs-independent-{tag}",
        workers=workers,
        threads_per_worker=threads,
        task_settings=opts["throughput_task_settings"],
        train={"max_steps": steps, "eval_every": steps},
        seed=opts["seed"],
    )


def _config(
    tmp: Path,
    tag: str,
    patterns: list[str],
    opts: dict,
    workers: int,
    threads: int,
    storage: str | None = None,
):
    settings = {
        "tokenizer": opts["tokenizer"],
        "vocab_size": opts["vocab_size"],
        "seq_len": opts["seq_len"],
        **opts["task_settings"],
    }
    if opts["task"] != "text":
        settings.pop("tokenizer")
    train = {
        "max_steps": opts["max_steps"],
        "eval_every": opts["max_steps"],
        "batch_size": opts["batch_size"],
        **opts["train"],
    }
    return common.compose_study_config(
        patterns=patterns,
        storage=storage or f"sqlite:///{tmp}/{tag}.db",
        study_name=f"vs-independent-{tag}",
        task=opts["task"],
        d_model=opts["d_model"],
        workers=workers,
        threads_per_worker=threads,
        task_settings=settings,
        train=train,
        seed=opts["seed"],
        sweep=None,
    )


def _rows_used(data: dict) -> int:
    import torch

    ids = torch.cat([t.flatten() for split in data.values() for t in split])
    return int(torch.unique(ids[ids >= 0]).numel())


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    import mad_search

    root = str(Path(mad_search.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )


def _watch(
    procs: list[subprocess.Popen], logs: list[Path], interval: float, cpu: common.CpuMeter
) -> tuple[dict, dict]:
    sampler = common.PeakPss(lambda: [p.pid for p in procs], interval)
    sampler.start()
    try:
        codes = [p.wait() for p in procs]
    finally:
        memory = sampler.stop()
        usage = cpu.stop()
    for code, log in zip(codes, logs):
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(
                f"a benchmark process exited with code {code}; its log ends:\n{tail}"
            )
    return memory, usage


def _run_pool(tmp: Path, tag: str, make_cfg, w: int, threads: int, opts: dict) -> dict:
    import optuna
    from omegaconf import OmegaConf

    cfg = make_cfg(tag, w, threads)
    spec = tmp / f"{tag}.json"
    spec.write_text(
        json.dumps({"cfg": OmegaConf.to_container(cfg, resolve=True), "out_dir": str(tmp / tag)})
    )
    log = tmp / f"{tag}.log"
    t0, cpu = time.time(), common.CpuMeter()
    memory, usage = _watch([_launch(["pool", str(spec)], log)], [log], opts["sample_interval"], cpu)
    exited = time.time() - t0
    study = optuna.load_study(study_name=cfg.study.name, storage=cfg.study.storage)
    return _finish(study, t0, exited, cfg, memory, usage, f"1 coordinator + {w} workers")


def _run_independent(
    tmp: Path, tag: str, make_cfg, patterns: list[str], w: int, threads: int, opts: dict
) -> dict:
    import optuna
    from omegaconf import OmegaConf

    url = (
        f"journal:{tmp}/{tag}.journal"
        if opts["storage"] == "journal"
        else f"sqlite:///{tmp}/{tag}.db"
    )
    cfg = make_cfg(tag, 1, threads, url)
    study = optuna.create_study(
        study_name=cfg.study.name, storage=open_storage(url), direction="maximize"
    )
    common.enqueue(study, patterns)
    shares = [len(patterns) // w + (1 if i < len(patterns) % w else 0) for i in range(w)]
    procs, logs = [], []
    t0, cpu = time.time(), common.CpuMeter()
    for i, k in enumerate(s for s in shares if s):
        spec = tmp / f"{tag}-{i}.json"
        spec.write_text(
            json.dumps(
                {
                    "cfg": OmegaConf.to_container(cfg, resolve=True),
                    "storage": url,
                    "n_trials": k,
                    "threads": threads,
                }
            )
        )
        logs.append(tmp / f"{tag}-{i}.log")
        procs.append(_launch(["independent", str(spec)], logs[-1]))
    memory, usage = _watch(procs, logs, opts["sample_interval"], cpu)
    exited = time.time() - t0
    study = optuna.load_study(study_name=cfg.study.name, storage=open_storage(url))
    return _finish(study, t0, exited, cfg, memory, usage, f"{len(procs)} processes")


def _finish(
    study, t0: float, exited: float, cfg, memory: dict, usage: dict, processes: str
) -> dict:
    trials = study.get_trials(deepcopy=False)
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    wall = (max(ends) - t0) if ends else exited
    rec = common.record(study, wall, common.tokens_per_step(cfg))
    rec.update(
        start_s=(min(starts) - t0) if starts else None,
        until_exit_s=exited,
        processes=processes,
        memory=memory,
        cpu=usage,
    )
    return rec


def open_storage(url: str):
    """An Optuna storage for ``journal:PATH`` (a journal file) or a database URL."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal:") :]))
    return optuna.storages.RDBStorage(url)


def table(result: dict) -> str:
    """Per W: both setups' time, trials/hour and peak PSS; then the slopes and the verdict."""
    cfg, task = result["config"], result["task"]
    lines = [
        f"vs_independent benchmark: {len(cfg['trial_patterns'])} fixed trials, "
        f"{cfg['max_steps']} steps each; task {task['name']} ({task['tokenizer']} vocab "
        f"{task['vocab_size']:,}, {task['rows_used_by_data']:,} ids used by the data), "
        f"d_model {cfg['d_model']}; {cfg['cores']} cores; table {result['table_mb']:.1f} MB",
        f"independent: {result['independent_setup']}",
        f"memory: {result['memory_method']}",
        "",
    ]
    if result.get("throughput_by_workers"):
        lines.append(f"phase 1, throughput: {result['throughput_phase']}")
        lines += _rows(result["throughput_by_workers"])
        lines.append("")
        lines.append(
            f"phase 2, memory: task {task['name']}, vocab {task['vocab_size']:,}, "
            f"d_model {cfg['d_model']}, {cfg['max_steps']} steps per trial"
        )
    lines += _rows(result["by_workers"])
    met = result["met"]
    phase = "phase 1" if result.get("throughput_by_workers") else "phase 2"
    lines += [
        "",
        f"PSS per extra worker: pool {common.fmt(result['pss_per_extra_worker_pool_mb'], ',.0f')}"
        f" MB, independent {common.fmt(result['pss_per_extra_worker_independent_mb'], ',.0f')} MB"
        f" -> saving {common.fmt(result['pss_saving_per_extra_worker_mb'], ',.0f')} MB per "
        f"extra worker (target >= table {result['table_mb']:.1f} MB: "
        f"{common.verdict(met['memory'])})",
        f"(anon+shmem only: pool "
        f"{common.fmt(result['anon_shmem_per_extra_worker_pool_mb'], ',.0f')} MB, independent "
        f"{common.fmt(result['anon_shmem_per_extra_worker_independent_mb'], ',.0f')} MB)",
        f"throughput_ratio at 2 workers ({phase}) "
        f"{common.fmt(result['throughput_ratio'])} "
        f"(target >= 1.0: {common.verdict(met['throughput_ratio'])}); from each setup's first "
        f"trial start (start-up left out): "
        + ", ".join(
            f"W={w} {common.fmt(r)}" for w, r in result["trial_phase_ratio_by_workers"].items()
        ),
    ]
    return "\n".join(lines)


def _rows(by_workers: dict) -> list[str]:
    cols = (
        "W",
        "thr",
        "setup",
        "first trial s",
        "to last trial s",
        "trials/h",
        "mean acc",
        "peak PSS MB",
        "anon+shm MB",
        "procs",
        "pool/indep",
        "cores us/others",
    )
    fmt = "{:>3} {:>4} {:<12} {:>13} {:>15} {:>9} {:>9} {:>12} {:>12} {:>6} {:>10} {:>15}"
    lines = [fmt.format(*cols), "-" * len(fmt.format(*cols))]
    for w, res in by_workers.items():
        for setup in ("pool", "independent"):
            rec = res[setup]
            mem = rec["memory"]
            r = res["throughput_ratio"] if setup == "pool" else None
            lines.append(
                fmt.format(
                    w,
                    res["threads_per_process"],
                    setup,
                    common.fmt(rec.get("start_s"), ".1f"),
                    common.fmt(rec["wall_s"], ".1f"),
                    common.fmt(rec["trials_per_hour"], ",.0f"),
                    common.fmt(rec["mean_accuracy"], ".4f"),
                    common.fmt(mem["peak_pss_mb"], ",.0f"),
                    common.fmt(mem["peak_pss_anon_shmem_mb"], ",.0f"),
                    mem["processes_at_peak"],
                    "" if r is None else f"{r:.2f}x",
                    f"{common.fmt(rec['cpu']['ours_cores'], '.1f')}/"
                    f"{common.fmt(rec['cpu']['others_cores'], '.1f')}",
                )
            )
        if len(res.get("rounds") or []) > 1:
            lines.append(
                f"    W={w}, {len(res['rounds'])} rounds (times summed above): "
                + "; ".join(
                    f"{'pool first' if rnd['order'][0] == 'pool' else 'independent first'} "
                    f"{common.fmt(rnd['pool_wall_s'], '.1f')} s vs "
                    f"{common.fmt(rnd['independent_wall_s'], '.1f')} s = "
                    f"{common.fmt(rnd['throughput_ratio'])}x"
                    for rnd in res["rounds"]
                )
            )
    return lines


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    common.check_at_least_one(
        opts, ("trials", "repeats", "max_steps", "d_model", "vocab_size", "seq_len", "batch_size")
    )
    if opts["threads_per_worker"] < 0:
        raise BenchError(
            f"option threads_per_worker must be 0 or more, got {opts['threads_per_worker']}"
        )
    if not opts["workers"] or any(w < 1 for w in opts["workers"]):
        raise BenchError(f"option workers must be positive integers, got {opts['workers']}")
    if opts["storage"] not in ("journal", "sqlite"):
        raise BenchError(f"option storage must be journal or sqlite, got {opts['storage']!r}")
    if opts["sample_interval"] <= 0:
        raise BenchError(f"option sample_interval must be positive, got {opts['sample_interval']}")
    opts["workers"] = sorted(dict.fromkeys(opts["workers"]))
    return opts
