"""What the search benchmarks (``scaling``, ``vs_independent``, ``sharing``) share.

* building a study config for a fixed list of trials: the benchmark's patterns are enqueued in
  order as reference trials (``search.reference``), with a random sampler of fixed seed and no
  pruner, into a fresh storage, so every setup trains exactly the same trials with the same seeds
  (a trial's seed is ``seed + trial.number``);
* running it through the Hogwild pool (:func:`mad_search.study.run_study`) or in-process the way a
  user would without the pool (``study.optimize`` with an objective that calls
  :func:`mad_search.train.train` on a dense ``nn.Embedding`` with AdamW);
* one record per run: wall time, trials/hour, aggregate tokens/s, mean accuracy, per-trial rows;
* proportional set size (PSS) of process trees, read from ``/proc/<pid>/smaps_rollup``;
* Kendall's tau-b.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from mad_search.bench import BenchError, compose_config
from mad_search.settings import available_cores

# --- configs -------------------------------------------------------------------------------


def compose_base(sweep: str | None = "layer_patterns", task: str | None = None) -> DictConfig:
    """``config`` composed with ``+sweep=<sweep>`` and ``task=<task>`` (Hydra's compose API)."""
    overrides = [f"+sweep={sweep}"] if sweep else []
    if task:
        overrides.append(f"task={task}")
    return compose_config(overrides)


def compose_study_config(
    *,
    patterns: Sequence[str],
    storage: str,
    study_name: str,
    task: str | None = None,
    d_model: int | None = None,
    workers: int = 1,
    threads_per_worker: int = 1,
    embedding: str = "shared",
    task_settings: dict | None = None,
    train: dict | None = None,
    seed: int = 0,
    sweep: str | None = "layer_patterns",
) -> DictConfig:
    """A study config (Hydra's compose API) that trains ``patterns`` in order, one trial each.

    Starts from ``+sweep=<sweep>`` (the default study's task and model sizes), then sets the
    fixed trial list, the pool size and the given task / train settings. Values with spaces or
    brackets (patterns) are set on the composed config, not through Hydra's override grammar.
    """
    cfg = compose_base(sweep, task)
    values: dict[str, Any] = {
        "seed": seed,
        "study.name": study_name,
        "study.storage": storage,
        "study.n_trials": len(patterns),
        "study.timeout": None,
        "study.tasks": None,
        "study.sampler": {"name": "random", "seed": seed},
        "study.pruner": {"name": "none"},
        "hogwild.workers": workers,
        "hogwild.threads_per_worker": threads_per_worker,
        "hogwild.embedding": embedding,
        "train.progress": False,
        "search": {
            "pattern": {"kind": "choice", "choices": unique(patterns)},
            "params": {},
            "reference": list(patterns),
        },
    }
    if d_model is not None:
        values["model.d_model"] = d_model
    for key, value in (task_settings or {}).items():
        values[f"task.{key}"] = value
    for key, value in (train or {}).items():
        values[f"train.{key}"] = value
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def trial_patterns(patterns: Sequence[str], trials: int) -> list[str]:
    """``trials`` patterns: the list in order, repeated as often as needed."""
    if not patterns:
        raise BenchError("option patterns must name at least one layer sequence")
    if trials < 1:
        raise BenchError(f"option trials must be at least 1, got {trials}")
    return [patterns[i % len(patterns)] for i in range(trials)]


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_at_least_one(opts: dict, keys: Sequence[str]) -> None:
    """Each of ``opts[key]`` must be at least 1 (one clear line naming the first that is not)."""
    for key in keys:
        if opts[key] < 1:
            raise BenchError(f"option {key} must be at least 1, got {opts[key]}")


def check_patterns(patterns: Sequence[str]) -> None:
    """Parse every pattern now (one clear line if one is bad), before anything is started."""
    import blocks
    from mad_search.spec import SpecError, parse

    for p in patterns:
        try:
            parse(p, blocks.names())
        except SpecError as exc:
            raise BenchError(f"pattern {p!r}: {exc}") from None


def tokens_per_step(cfg: DictConfig) -> int:
    return int(cfg.train.batch_size) * int(cfg.task.seq_len)


# --- running a study -------------------------------------------------------------------------


@contextlib.contextmanager
def stdout_to(path: Path) -> Iterator[None]:
    """Send file descriptor 1 (this process and the workers it spawns) to ``path``."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def run_pool(cfg: DictConfig, workdir: Path) -> dict:
    """Run the study in ``cfg`` through the Hogwild pool; a run record (see :func:`record`).

    The wall time is the coordinator's own (``run_study``'s ``wall_seconds``): from starting the
    workers to the last trial told. Config validation, building the task data cache and writing
    the report (plots, CSV) are the same fixed work for every pool size and are left out.
    """
    from mad_search.study import run_study

    workdir.mkdir(parents=True, exist_ok=True)
    cpu = CpuMeter()
    with stdout_to(workdir / "run_study.log"):
        summary = run_study(cfg, workdir / "run")
    cpu = cpu.stop()
    study = optuna.load_study(study_name=cfg.study.name, storage=cfg.study.storage)
    rec = record(study, summary["wall_seconds"], tokens_per_step(cfg))
    rec["cpu"] = cpu
    rec["hogwild"] = {
        k: summary.get(f"mean_hogwild.{k}")
        for k in ("rows_per_step", "collision_rate", "staleness_mean")
    }
    rec["worker_restarts"] = summary.get("worker_restarts")
    rec["tables"] = summary.get("tables")
    return rec


def make_objective(cfg: DictConfig, data: dict, build_lock: threading.Lock | None = None):
    """The objective a user writes without the pool: the trial's model (dense embedding, AdamW
    on everything) trained in this process by :func:`mad_search.train.train_plan`; reports
    intermediate accuracies."""
    from mad_search.spec import parse
    from mad_search.sweep import plans_for
    from mad_search.train import train_plan

    task_cfgs = [dict(OmegaConf.to_container(cfg.task, resolve=True))]
    choices = list(cfg.search.pattern.choices)
    lock = build_lock or threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        spec = trial.suggest_categorical("pattern.spec", choices)
        # torch's global RNG is process-wide: resolving a plan builds probe blocks (and restores
        # the RNG afterwards), so no thread may resolve while another seeds and initialises.
        with lock:
            plan = plans_for(cfg, task_cfgs, {"model.pattern": parse(spec, check=False)})[0]

        def on_eval(step: int, metrics: dict) -> bool:
            trial.report(float(metrics["accuracy"]), step)
            return trial.should_prune()

        _, res = train_plan(
            plan, data, on_eval=on_eval, seed=plan.seed + trial.number, build_lock=lock
        )
        trial.set_user_attr("pattern", plan.pattern)
        trial.set_user_attr("val_accuracy", res.val_accuracy)
        trial.set_user_attr("test_accuracy", res.test_accuracy)
        trial.set_user_attr("tokens_per_s", res.tokens_per_s)
        trial.set_user_attr(f"{plan.task_name}.steps", res.steps)
        trial.set_user_attr("pid", os.getpid())
        return res.val_accuracy

    return objective


def load_data(cfg: DictConfig) -> dict:
    """The task data of the config's trials, as tensors (from the on-disk cache once built)."""
    from mad_search import tasks
    from mad_search.spec import parse
    from mad_search.sweep import plans_for

    task_cfgs = [dict(OmegaConf.to_container(cfg.task, resolve=True))]
    ref = cfg.search.reference[0] if "search" in cfg else None  # a sweep's first reference
    spec = ref if isinstance(ref, str) or ref is None else ref.get("spec")
    overrides = {"model.pattern": parse(spec, check=False)} if spec else {}
    plan = plans_for(cfg, task_cfgs, overrides)[0]
    return tasks.as_tensors(tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings))


def warm_up(cfg: DictConfig) -> None:
    """An untimed one-step training run (optimiser step and evaluation included) of every
    pattern on a few examples, so that an in-process baseline is not charged for first-call
    costs (lazy imports, kernel set-up) that a long study pays once; each pool worker pays its
    own inside the pool's wall time."""
    import dataclasses

    from mad_search.spec import parse
    from mad_search.sweep import plans_for
    from mad_search.train import train_plan

    tiny = {split: tuple(t[:4] for t in pair) for split, pair in load_data(cfg).items()}
    task_cfgs = [dict(OmegaConf.to_container(cfg.task, resolve=True))]
    for spec in cfg.search.pattern.choices:
        plan = plans_for(cfg, task_cfgs, {"model.pattern": parse(spec, check=False)})[0]
        steps = dataclasses.replace(
            plan.train, max_steps=1, eval_every=1, batch_size=2, eval_batch_size=4
        )
        train_plan(dataclasses.replace(plan, train=steps), tiny)


def enqueue(study: optuna.Study, patterns: Sequence[str]) -> None:
    for p in patterns:
        study.enqueue_trial({"pattern.spec": p})


def run_inprocess(cfg: DictConfig, n_jobs: int, threads: int) -> dict:
    """The same trials with ``study.optimize(objective, n_jobs=n_jobs)`` in this process, torch
    using ``threads`` threads (process-wide, so shared by the ``n_jobs`` threads). The wall time
    covers loading the task data and every trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    patterns = list(cfg.search.reference)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=int(cfg.seed)),
        pruner=optuna.pruners.NopPruner(),
    )
    enqueue(study, patterns)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        warm_up(cfg)
        cpu = CpuMeter()
        data = load_data(cfg)
        study.optimize(make_objective(cfg, data), n_trials=len(patterns), n_jobs=n_jobs)
        cpu = cpu.stop()
    finally:
        torch.set_num_threads(previous)
    rec = record(study, cpu["elapsed_s"], tokens_per_step(cfg))
    rec["cpu"] = cpu
    return rec


def record(study: optuna.Study, wall: float, step_tokens: int) -> dict:
    """Throughput and accuracy of one finished run of the benchmark's trial list.

    ``trials_per_hour`` counts complete trials over ``wall``; ``tokens_per_s`` is the aggregate
    (training tokens of every trial over ``wall``); ``mean_trial_tokens_per_s`` is each trial's
    own training throughput, averaged; ``span_s`` runs from the first trial's start to the last
    trial's end (start-up left out).
    """
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    rows, tokens = [], 0
    for t in sorted(trials, key=lambda t: t.number):
        steps = sum(v for k, v in t.user_attrs.items() if k.endswith(".steps") and v)
        trial_tokens = steps * step_tokens
        if t.state == TrialState.COMPLETE:
            tokens += trial_tokens
        seconds = None
        if t.datetime_start and t.datetime_complete:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "number": t.number,
                "pattern": t.user_attrs.get("pattern"),
                "state": t.state.name,
                "val_accuracy": t.value,
                "tokens": trial_tokens,
                "tokens_per_s": t.user_attrs.get("tokens_per_s"),
                "seconds": seconds,
                "worker": t.user_attrs.get("worker", t.user_attrs.get("pid")),
                "fail_reason": t.user_attrs.get("fail_reason"),
            }
        )
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    speeds = [r["tokens_per_s"] for r in rows if r["state"] == "COMPLETE" and r["tokens_per_s"]]
    values = [t.value for t in done]
    return {
        "wall_s": wall,
        "span_s": span,
        "trials": len(trials),
        "complete": len(done),
        "trials_per_hour": 3600.0 * len(done) / wall if wall > 0 else None,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "mean_trial_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "mean_accuracy": sum(values) / len(values) if values else None,
        "per_trial": rows,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


# --- CPU: how much of the machine a run had ------------------------------------------------


class CpuMeter:
    """CPU time used by this process and its reaped children, and by the whole machine
    (``/proc/stat``), between construction and :meth:`stop`; in cores (CPU seconds / second).

    On a machine that others are loading, ``others_cores`` says how much they took: a ratio
    measured while others took more cores in one run than in the other is not a clean one.
    """

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ours0 = _own_cpu_seconds()
        self.machine0 = _machine_busy_seconds()

    def stop(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        ours = _own_cpu_seconds() - self.ours0
        busy0, busy1 = self.machine0, _machine_busy_seconds()
        machine = None if busy0 is None or busy1 is None else (busy1 - busy0) / elapsed
        return {
            "elapsed_s": elapsed,
            "ours_cores": ours / elapsed,
            "machine_busy_cores": machine,
            "others_cores": None if machine is None else max(0.0, machine - ours / elapsed),
        }


def _own_cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


# --- memory: proportional set size ---------------------------------------------------------

PSS_FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def read_pss(pid: int) -> dict[str, int] | None:
    """PSS and its parts (KiB) of one process from ``/proc/<pid>/smaps_rollup``; None if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in PSS_FIELDS:
            out[key] = int(rest.split()[0])
    return out if "Pss" in out else None


def pss_available() -> bool:
    return read_pss(os.getpid()) is not None


def descendants(roots: Sequence[int]) -> list[int]:
    """``roots`` and every live process below them (from the parent ids in ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class PeakPss(threading.Thread):
    """Samples the summed PSS of ``roots()`` and their descendants every ``interval`` seconds
    and keeps the peak (KiB), with its parts at that moment."""

    def __init__(self, roots: Callable[[], Sequence[int]], interval: float = 0.2):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.peak: dict[str, int] = {k: 0 for k in PSS_FIELDS}
        self.peak_processes = 0
        self.peak_anon_shmem = 0  # the peak of Pss_Anon + Pss_Shmem (shared library code left out)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        total = {k: 0 for k in PSS_FIELDS}
        n = 0
        for pid in descendants(list(self.roots())):
            pss = read_pss(pid)
            if pss is None:
                continue
            n += 1
            for k in PSS_FIELDS:
                total[k] += pss.get(k, 0)
        self.samples += 1
        if total["Pss"] > self.peak["Pss"]:
            self.peak, self.peak_processes = total, n
        self.peak_anon_shmem = max(self.peak_anon_shmem, total["Pss_Anon"] + total["Pss_Shmem"])

    def stop(self) -> dict:
        self._stop_event.set()
        self.join()
        return {
            "peak_pss_mb": self.peak["Pss"] / 1024,
            "peak_parts_mb": {k.lower(): v / 1024 for k, v in self.peak.items() if k != "Pss"},
            "peak_pss_anon_shmem_mb": self.peak_anon_shmem / 1024,
            "processes_at_peak": self.peak_processes,
            "samples": self.samples,
        }


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``ys`` against ``xs``."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pairs) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


# --- rank correlation ----------------------------------------------------------------------


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two paired samples, ties allowed, in O(n log n) (Knight 1966).

    ``(n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2))`` with ``n_0 = n(n-1)/2`` pairs, ``n_1`` /
    ``n_2`` the pairs tied in ``x`` / ``y``. Sort by (x, y); the discordant pairs are the
    inversions of the y sequence, counted by a merge sort. None when undefined (fewer than two
    items, or every value of one sample tied).
    """
    n = len(x)
    if n != len(y):
        raise ValueError(f"kendall_tau_b needs samples of equal length, got {n} and {len(y)}")
    if n < 2:
        return None
    pairs = sorted(zip(x, y))
    n0 = n * (n - 1) // 2
    n1 = _tied_pairs([p[0] for p in pairs])
    n3 = _tied_pairs(pairs)  # tied in both
    ys = [p[1] for p in pairs]
    swaps = _sort_count_inversions(ys)  # ys is sorted afterwards
    n2 = _tied_pairs(ys)
    denominator = (n0 - n1) * (n0 - n2)
    if denominator == 0:
        return None
    return (n0 - n1 - n2 + n3 - 2 * swaps) / math.sqrt(denominator)


def _tied_pairs(sorted_values: Sequence) -> int:
    """Pairs of equal values in a sorted sequence: sum of t(t-1)/2 over runs of length t."""
    total, run = 0, 1
    for a, b in zip(sorted_values, sorted_values[1:]):
        if a == b:
            run += 1
        else:
            total += run * (run - 1) // 2
            run = 1
    return total + run * (run - 1) // 2


def _sort_count_inversions(values: list) -> int:
    """Sort ``values`` in place (stable merge sort); return the pairs i < j with v_i > v_j."""
    n = len(values)
    buffer = list(values)
    swaps, width = 0, 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if values[j] < values[i]:
                    buffer[k] = values[j]
                    swaps += mid - i
                    j += 1
                else:
                    buffer[k] = values[i]
                    i += 1
                k += 1
            buffer[k : k + mid - i] = values[i:mid]
            k += mid - i
            buffer[k : k + hi - j] = values[j:hi]
        values[:] = buffer
        width *= 2
    return swaps


def ranking(values: dict[str, float]) -> list[dict]:
    """Patterns best first (ties keep the given order), with their rank (1 = best) and value."""
    order = sorted(values, key=lambda p: -values[p])
    return [{"rank": i + 1, "pattern": p, "val_accuracy": values[p]} for i, p in enumerate(order)]


# --- environment ---------------------------------------------------------------------------


def machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),
        "load_average_at_start": load,
    }


def fmt(value: Any, spec: str = ".2f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


_T0 = time.perf_counter()


def verdict(flag: bool | None) -> str:
    """A target check for a table: met, MISSED, or n/a where it could not be computed."""
    return "n/a" if flag is None else ("met" if flag else "MISSED")


def note(text: str) -> None:
    """Progress for the person waiting (stderr, so the table on stdout stays clean)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)
